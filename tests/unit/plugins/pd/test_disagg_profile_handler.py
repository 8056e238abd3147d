"""Spec: `disagg-profile-handler` runs the decode profile, then the prefill profile when its decider approves;
the decode pod is the destination, and `x-prefiller-host-port` names the prefill pod when one was chosen."""

from __future__ import annotations

import logging

import pytest

from epp.config import ConfigError, load_config
from epp.datastore.endpoint import Endpoint
from epp.datastore.pool import Pool
from epp.scheduling import registry
from epp.scheduling.interfaces import ProfileHandler
from epp.scheduling.registry import PluginHandle
from epp.scheduling.scheduler import Scheduler, SchedulerProfile
from epp.scheduling.types import CycleState, ProfileResult, SchedulingError
from plugins.pd import PREFILLER_HEADER
from plugins.pd.disagg_profile_handler import DisaggProfileHandler
from plugins.pd.roles import ROLE_LABEL

TYPE = "disagg-profile-handler"


class FixedDecider:
    """A decider with a fixed verdict that records which endpoints it was asked about."""

    type = "fixed-decider"

    def __init__(self, verdict: bool, name: str = "decider") -> None:
        self.name = name
        self.verdict = verdict
        self.asked: list[Endpoint] = []

    def disaggregate(self, state, request, endpoint) -> bool:
        self.asked.append(endpoint)
        return self.verdict


def make_handler(verdict: bool | None, **params) -> tuple[DisaggProfileHandler, FixedDecider | None]:
    """A handler bound to a FixedDecider (none when verdict is None), built as the loader builds it."""
    registry.load_builtin_plugins()
    handle = PluginHandle()
    decider = None
    if verdict is not None:
        decider = FixedDecider(verdict)
        handle.plugins[decider.name] = decider
        params.setdefault("deciders", {"prefill": decider.name})
    handler = registry.create(TYPE, TYPE, params, handle)
    handler.bind(handle)
    return handler, decider


PROFILES = {"decode": SchedulerProfile("decode"), "prefill": SchedulerProfile("prefill")}
DEC = Endpoint("dec", "10.0.0.1", 8000)
PRE = Endpoint("pre", "10.0.0.2", 8000)
R_DEC = ProfileResult((DEC,))
R_PRE = ProfileResult((PRE,))


def picks(handler, request, results, state=None):
    return [p.name for p in handler.pick_profiles(CycleState() if state is None else state, request, PROFILES, results)]


def test_is_a_registered_profile_handler(make_plugin):
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is DisaggProfileHandler
    assert isinstance(make_plugin(TYPE), ProfileHandler)


# (stage order, decider verdict or None for no decider, results so far) -> profiles picked next
STAGES = [
    ("decode-first", True, {}, ["decode"]),
    ("decode-first", True, {"decode": R_DEC}, ["prefill"]),
    ("decode-first", False, {"decode": R_DEC}, []),
    ("decode-first", True, {"decode": None}, []),  # decode failed: nothing more runs, the request fails
    ("decode-first", True, {"decode": R_DEC, "prefill": R_PRE}, []),
    ("decode-first", None, {}, ["decode"]),
    ("decode-first", None, {"decode": R_DEC}, []),  # no decider: the prefill stage never runs
    ("prefill-first", True, {}, ["prefill"]),
    ("prefill-first", False, {}, ["prefill"]),  # prefill runs first whatever the verdict will be
    ("prefill-first", True, {"prefill": R_PRE}, ["decode"]),
    ("prefill-first", True, {"prefill": None}, ["decode"]),
    ("prefill-first", True, {"prefill": R_PRE, "decode": R_DEC}, []),
    ("prefill-first", None, {}, ["decode"]),
    ("prefill-first", None, {"decode": R_DEC}, []),
]


@pytest.mark.parametrize("order, verdict, results, expected", STAGES)
def test_stage_order(request_for, order, verdict, results, expected):
    handler, _ = make_handler(verdict, stageOrder=order)
    assert picks(handler, request_for(), results) == expected


def test_decode_first_asks_the_decider_about_the_decode_profiles_first_endpoint_once(request_for):
    handler, decider = make_handler(True)
    state = CycleState()
    other = Endpoint("dec-2", "10.0.0.3", 8000)
    results = {"decode": ProfileResult((DEC, other))}
    assert picks(handler, request_for(), results, state) == ["prefill"]
    handler.process_results(state, request_for(), {**results, "prefill": R_PRE})
    assert decider.asked == [DEC]


def test_a_declined_request_is_not_asked_again_when_results_are_processed(request_for):
    handler, decider = make_handler(False)
    state = CycleState()
    assert picks(handler, request_for(), {"decode": R_DEC}, state) == []
    result = handler.process_results(state, request_for(), {"decode": R_DEC})
    assert decider.asked == [DEC] and result.headers == {}


# (decider verdict, prefill result) -> (header value, profile results kept)
OUTCOMES = [
    pytest.param(True, R_PRE, "10.0.0.2:8000", {"decode": R_DEC, "prefill": R_PRE}, id="disaggregated"),
    pytest.param(True, None, None, {"decode": R_DEC}, id="no-prefill-pod-serves-aggregated"),
    pytest.param(True, ProfileResult(()), None, {"decode": R_DEC}, id="empty-prefill-pick-serves-aggregated"),
    pytest.param(True, R_DEC, None, {"decode": R_DEC}, id="same-pod-for-both-legs-is-aggregated"),
]


@pytest.mark.parametrize("verdict, prefill, header, kept", OUTCOMES)
def test_results_decode_is_primary_and_the_header_only_when_prefill_ran_elsewhere(request_for, verdict, prefill,
                                                                                   header, kept):
    handler, _ = make_handler(verdict)
    state = CycleState()
    picks(handler, request_for(), {"decode": R_DEC}, state)
    result = handler.process_results(state, request_for(), {"decode": R_DEC, "prefill": prefill})
    assert result.primary_profile == "decode"
    assert result.target_endpoints == (DEC,)
    assert result.headers == ({PREFILLER_HEADER: header} if header else {})
    assert result.profile_results == kept


@pytest.mark.parametrize("verdict, header", [(True, "10.0.0.2:8000"), (False, None)])
def test_prefill_first_uses_the_prefill_pick_only_when_the_decider_approves(request_for, verdict, header):
    handler, decider = make_handler(verdict, stageOrder="prefill-first")
    state = CycleState()
    result = handler.process_results(state, request_for(), {"prefill": R_PRE, "decode": R_DEC})
    assert decider.asked == [DEC]
    assert result.headers == ({PREFILLER_HEADER: header} if header else {})
    assert ("prefill" in result.profile_results) is verdict  # an unused pick is not learned by the prefix caches


def test_ipv6_prefill_endpoints_are_bracketed(request_for):
    handler, _ = make_handler(True)
    v6 = ProfileResult((Endpoint("pre6", "fd00::2", 8000),))
    result = handler.process_results(CycleState(), request_for(), {"decode": R_DEC, "prefill": v6})
    assert result.headers == {PREFILLER_HEADER: "[fd00::2]:8000"}


@pytest.mark.parametrize("results", [{"decode": None}, {"decode": None, "prefill": R_PRE}, {"prefill": R_PRE}])
def test_no_decode_endpoint_is_a_503(request_for, results):
    handler, _ = make_handler(True, stageOrder="prefill-first")
    with pytest.raises(SchedulingError, match="decode profile 'decode' found none") as err:
        handler.process_results(CycleState(), request_for(), results)
    assert err.value.status == 503


def test_a_missing_prefill_endpoint_is_logged_at_debug(request_for, caplog):
    handler, _ = make_handler(True)
    with caplog.at_level(logging.DEBUG, logger="plugins.pd.disagg_profile_handler"):
        handler.process_results(CycleState(), request_for(), {"decode": R_DEC, "prefill": None})
    (record,) = caplog.records
    assert record.levelno == logging.DEBUG
    assert "prefill profile 'prefill' found no endpoint; serving it aggregated on 10.0.0.1:8000" in record.message


def test_custom_profile_names(request_for):
    handler, _ = make_handler(True, profiles={"decode": "d", "prefill": "p"})
    profiles = {"d": SchedulerProfile("d"), "p": SchedulerProfile("p")}
    state = CycleState()
    assert [p.name for p in handler.pick_profiles(state, request_for(), profiles, {})] == ["d"]
    assert [p.name for p in handler.pick_profiles(state, request_for(), profiles, {"d": R_DEC})] == ["p"]
    result = handler.process_results(state, request_for(), {"d": R_DEC, "p": R_PRE})
    assert (result.primary_profile, result.headers) == ("d", {PREFILLER_HEADER: "10.0.0.2:8000"})


# ------------------------------------------------------------------------------- driven by a real Scheduler


def role_pool(*roles: str | None) -> list[Endpoint]:
    return [Endpoint(f"pod-{i}", f"10.0.1.{i + 1}", 8000, labels={ROLE_LABEL: r} if r else {})
            for i, r in enumerate(roles)]


def scheduler(make_plugin, verdict: bool) -> tuple[Scheduler, FixedDecider]:
    handler, decider = make_handler(verdict)
    picker = make_plugin("max-score-picker")
    profiles = {
        "decode": SchedulerProfile("decode", filters=[make_plugin("decode-filter")], picker=picker),
        "prefill": SchedulerProfile("prefill", filters=[make_plugin("prefill-filter")], picker=picker),
    }
    return Scheduler(handler, profiles), decider


def test_scheduler_sends_to_the_decode_pod_with_the_prefill_pod_in_the_header(make_plugin, request_for):
    sched, _ = scheduler(make_plugin, True)
    decode, prefill = role_pool("decode", "prefill")
    result = sched.schedule(request_for(), [prefill, decode])
    assert result.target_endpoints == (decode,)
    assert result.headers == {PREFILLER_HEADER: prefill.hostport}


def test_scheduler_serves_aggregated_when_no_pod_can_prefill(make_plugin, request_for):
    sched, decider = scheduler(make_plugin, True)
    pods = role_pool(None, None)  # unlabeled pods decode but never prefill
    result = sched.schedule(request_for(), pods)
    assert result.target_endpoints[0] in pods
    assert result.headers == {} and decider.asked == [result.target_endpoints[0]]


def test_scheduler_fails_with_503_when_no_pod_can_decode(make_plugin, request_for):
    sched, decider = scheduler(make_plugin, True)
    with pytest.raises(SchedulingError) as err:
        sched.schedule(request_for(), role_pool("prefill", "prefill"))
    assert err.value.status == 503 and decider.asked == []


def test_scheduler_without_approval_runs_only_the_decode_profile(make_plugin, request_for):
    sched, _ = scheduler(make_plugin, False)
    decode, prefill = role_pool("decode", "prefill")
    result = sched.schedule(request_for(), [decode, prefill])
    assert result.target_endpoints == (decode,)
    assert result.headers == {} and list(result.profile_results) == ["decode"]


# ------------------------------------------------------------------------------------ configuration errors

CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 64}
- type: disagg-profile-handler
  parameters: %s
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
"""


def load(handler_params: str):
    return load_config(CONFIG % handler_params, "pd.yaml", PluginHandle(Pool()))


def test_the_config_binds_the_named_decider():
    config = load("{deciders: {prefill: prefix-based-pd-decider}}")
    handler = config.scheduler.handler
    assert isinstance(handler, DisaggProfileHandler)
    assert handler.decider is config.plugins["prefix-based-pd-decider"]


@pytest.mark.parametrize(
    "params, message",
    [
        pytest.param("{deciders: {prefill: pd-decider}}",
                     "deciders.prefill names 'pd-decider', but no plugin has that name; declare it under "
                     "`plugins`, e.g. `- type: prefix-based-pd-decider` with `parameters: {nonCachedTokens: 512}`",
                     id="unknown-decider"),
        pytest.param("{deciders: {prefill: queue-scorer}}",
                     "deciders.prefill names plugin 'queue-scorer' (type 'queue-scorer'), which is not a P/D "
                     "decider; name a plugin of type prefix-based-pd-decider or always-disagg-pd-decider",
                     id="not-a-decider"),
        pytest.param("{deciders: {prefill: prefix-based-pd-decider, encode: e}}",
                     "the encode stage (E/P/D) is not supported; remove deciders.encode", id="encode-decider"),
        pytest.param("{profiles: {decode: x, prefill: x}}",
                     "profiles.decode and profiles.prefill are both 'x'", id="same-profile-twice"),
        pytest.param("{profiles: {decoder: x}}",
                     "unknown parameter 'decoder'; allowed: decode, encode, prefill", id="unknown-profiles-key"),
        pytest.param("{stageOrder: decode-last}",
                     "'decode-last' is not allowed; allowed: 'decode-first', 'prefill-first'", id="bad-order"),
    ],
)
def test_config_errors_say_what_to_write(params, message):
    with pytest.raises(ConfigError) as err:
        load(params)
    assert message in str(err.value)
    assert str(err.value).startswith("pd.yaml: ")


@pytest.mark.parametrize(
    "params, message",
    [
        pytest.param("{profiles: {decode: dec}, deciders: {prefill: prefix-based-pd-decider}}",
                     "profiles.decode is 'dec', but no scheduling profile has that name (profiles: decode, "
                     "prefill); add a schedulingProfiles entry named 'dec' (with decode-filter) or set "
                     "profiles.decode to the decode profile's name", id="decode"),
        pytest.param("{profiles: {prefill: pre}, deciders: {prefill: prefix-based-pd-decider}}",
                     "profiles.prefill is 'pre', but no scheduling profile has that name (profiles: decode, "
                     "prefill); add a schedulingProfiles entry named 'pre' (with prefill-filter) or set "
                     "profiles.prefill to the prefill profile's name", id="prefill"),
    ],
)
def test_missing_profiles_are_named_with_what_to_write_when_the_config_loads(params, message):
    with pytest.raises(ConfigError, match="no scheduling profile has that name") as err:
        load(params)
    assert message in str(err.value)
    assert str(err.value).startswith("pd.yaml: plugins[") and "disagg-profile-handler" in str(err.value)


def test_a_prefill_profile_without_a_decider_is_warned_about(caplog):
    config = load("{}")
    with caplog.at_level(logging.WARNING):
        config.scheduler.handler.check_profiles(config.scheduler.profiles)
    assert "profile 'prefill' never runs because deciders.prefill is not set" in caplog.text
