"""Spec: `single-profile-handler` runs the one profile once and makes its result primary."""

from __future__ import annotations

import pytest

from epp.scheduling import registry
from epp.scheduling.interfaces import ProfileHandler
from epp.scheduling.scheduler import Scheduler, SchedulerProfile
from epp.scheduling.types import CycleState, ProfileResult, SchedulingError
from plugins.single_profile_handler import SingleProfileHandler

TYPE = "single-profile-handler"


def test_is_registered_under_its_type_name():
    registry.load_builtin_plugins()
    assert registry.lookup(TYPE) is SingleProfileHandler


def test_is_a_profile_handler_allowed_only_one_profile(make_plugin):
    handler = make_plugin(TYPE)
    assert isinstance(handler, ProfileHandler)
    assert SingleProfileHandler.max_profiles == 1


def test_takes_no_parameters(make_plugin):
    with pytest.raises(registry.ConfigError, match="takes no parameters"):
        make_plugin(TYPE, {"primary": "x"})


def test_first_pick_returns_every_profile_then_none(make_plugin, request_for):
    handler = make_plugin(TYPE)
    profile = SchedulerProfile("default")
    state = CycleState()
    assert handler.pick_profiles(state, request_for(), {"default": profile}, {}) == [profile]
    ep_result = ProfileResult(())
    assert handler.pick_profiles(state, request_for(), {"default": profile}, {"default": ep_result}) == []
    # a failed profile (None result) has still run: it is not picked again
    assert handler.pick_profiles(state, request_for(), {"default": profile}, {"default": None}) == []


def test_the_single_result_becomes_primary(make_plugin, request_for, endpoint):
    handler = make_plugin(TYPE)
    a, b = endpoint("a"), endpoint("b")
    result = handler.process_results(CycleState(), request_for(), {"default": ProfileResult((a, b))})
    assert result.primary_profile == "default"
    assert result.target_endpoints == (a, b)
    assert result.profile_results == {"default": ProfileResult((a, b))}


def test_a_failed_profile_is_a_503(make_plugin, request_for):
    handler = make_plugin(TYPE)
    with pytest.raises(SchedulingError, match="'default' found none") as err:
        handler.process_results(CycleState(), request_for(), {"default": None})
    assert err.value.status == 503


@pytest.mark.parametrize(
    "results", [{}, {"a": ProfileResult(()), "b": ProfileResult(())}], ids=["none", "two"]
)
def test_anything_but_exactly_one_result_is_refused(make_plugin, request_for, results):
    handler = make_plugin(TYPE)
    with pytest.raises(SchedulingError, match="exactly one profile result") as err:
        handler.process_results(CycleState(), request_for(), results)
    assert err.value.status == 503


def test_drives_a_scheduler_to_the_profiles_pick(make_plugin, request_for, endpoint):
    profile = SchedulerProfile(
        "default",
        filters=[make_plugin("by-label-filter", {"label": "role", "validValues": ["decode"]})],
        picker=make_plugin("max-score-picker"),
    )
    scheduler = Scheduler(make_plugin(TYPE), {"default": profile})
    decode = endpoint("decode-1", labels={"role": "decode"})
    result = scheduler.schedule(request_for(), [endpoint("prefill-1", labels={"role": "prefill"}), decode])
    assert result.primary_profile == "default"
    assert result.target_endpoints == (decode,)
