"""`disagg-profile-handler` (llm-d): disaggregated prefill/decode with a decode and a prefill scheduling profile."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from epp.request import LLMRequest
from epp.scheduling.registry import ConfigError, PluginHandle, register
from epp.scheduling.scheduler import SchedulerProfile
from epp.scheduling.types import CycleState, ProfileResult, SchedulingError, SchedulingResult
from plugins.pd import PREFILLER_HEADER, PDDecider

log = logging.getLogger(__name__)

# The profile name under which the prefix producers (approximate and precise) learn the prefill leg.
LEARNED_PREFILL_PROFILE = "prefill"
_DECIDER_EXAMPLE = "`- type: prefix-based-pd-decider` with `parameters: {nonCachedTokens: 512}`"


@dataclass(frozen=True)
class StageProfiles:
    """Which scheduling profile runs each stage (`profiles.decode`, `profiles.prefill`)."""

    decode: str = "decode"
    prefill: str = "prefill"
    encode: str = ""

    def validate(self) -> None:
        if self.encode:
            raise ValueError("the encode stage (E/P/D) is not supported; remove profiles.encode")
        if not self.decode or not self.prefill:
            raise ValueError("profiles.decode and profiles.prefill must name scheduling profiles "
                             "(defaults: decode, prefill)")
        if self.decode == self.prefill:
            raise ValueError(f"profiles.decode and profiles.prefill are both {self.decode!r}; the prefill stage "
                             "needs its own profile (with prefill-filter)")


@dataclass(frozen=True)
class StageDeciders:
    """The decider plugin (by name) that approves each optional stage; a stage without one never runs."""

    prefill: str = ""
    encode: str = ""

    def validate(self) -> None:
        if self.encode:
            raise ValueError("the encode stage (E/P/D) is not supported; remove deciders.encode")


@dataclass(frozen=True)
class DisaggParams:
    """stageOrder  decode-first (default) or prefill-first
    profiles    {decode: <profile>, prefill: <profile>} (defaults decode, prefill)
    deciders    {prefill: <decider plugin name>}; without it the prefill profile never runs
    """

    stage_order: Literal["decode-first", "prefill-first"] = "decode-first"
    profiles: StageProfiles = field(default_factory=StageProfiles)
    deciders: StageDeciders = field(default_factory=StageDeciders)


@register
class DisaggProfileHandler:
    """Runs a decode profile and, when a decider approves, a prefill profile; the request goes to the decode
    pod, told where its prefill runs by the request header `x-prefiller-host-port: ip:port` (for llm-d's routing
    sidecar or epp-model-server's sidecar mode beside the decode server).

    decode-first (default):
      1. run the decode profile (`profiles.decode`); if it finds no endpoint the request fails (503);
      2. ask the prefill decider (`deciders.prefill`, a plugin name) about the decode profile's first endpoint;
         when it approves, run the prefill profile (`profiles.prefill`).
    prefill-first: run the prefill profile first (when a prefill decider is configured), then the decode
    profile, then ask the decider; the prefill pick is simply unused when it declines.

    Result: the decode profile is primary (its endpoints, fallbacks included, are the destination). When the
    decider approved and the prefill profile chose an endpoint other than the decode pod,
    `SchedulingResult.headers["x-prefiller-host-port"]` is that endpoint's `ip:port` and the prefill result is
    kept in `profile_results`, so the prefix caches learn both legs (they learn the first endpoint of the
    profile named `prefill`). Otherwise the request is served aggregated on the decode pod and
    `profile_results` holds the decode result only: in particular, when the prefill profile finds no endpoint
    (no prefill pod passes its filters), the request is *not* failed but served aggregated (logged at debug).

    When it is wrong: its decisions are the decider's and the profiles'; it does not remove an
    `x-prefiller-host-port` header a client sent itself (the EPP only sets headers).
    """

    type: ClassVar[str] = "disagg-profile-handler"
    Params = DisaggParams
    # A client's own x-prefiller-host-port would send the decode sidecar's prefill to a host of its choosing;
    # the EPP removes it unless this handler set it.
    owned_request_headers: ClassVar[tuple[str, ...]] = (PREFILLER_HEADER,)

    def __init__(self, name: str, params: DisaggParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.decode_profile = params.profiles.decode
        self.prefill_profile = params.profiles.prefill
        self.prefill_first = params.stage_order == "prefill-first"
        self.decider_name = params.deciders.prefill
        self.decider: PDDecider | None = None
        self._checked: Mapping[str, SchedulerProfile] | None = None
        self._broken: str | None = None

    # -- configuration -------------------------------------------------------------------------------------

    def bind(self, handle: PluginHandle) -> None:
        """Find the prefill decider named by deciders.prefill."""
        name = self.decider_name
        if not name:
            return
        decider = handle.plugins.get(name)
        if decider is None:
            raise ConfigError(
                f"deciders.prefill names {name!r}, but no plugin has that name; declare it under `plugins`, e.g. "
                f"{_DECIDER_EXAMPLE}, and write its name (the type, unless you give it a `name`) in "
                f"deciders.prefill (defined plugins: {', '.join(sorted(handle.plugins)) or 'none'})"
            )
        if not isinstance(decider, PDDecider):
            kind = getattr(type(decider), "type", type(decider).__name__)
            raise ConfigError(
                f"deciders.prefill names plugin {name!r} (type {kind!r}), which is not a P/D decider; name a "
                "plugin of type prefix-based-pd-decider or always-disagg-pd-decider"
            )
        self.decider = decider

    def check_profiles(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        """Checks the configured profile names against the scheduling profiles; raises ConfigError saying what
        to write. Called on the first scheduling cycle (and by whoever loads the config, once profiles exist)."""
        known = ", ".join(profiles) or "none"
        if self.decode_profile not in profiles:
            raise ConfigError(
                f"profiles.decode is {self.decode_profile!r}, but no scheduling profile has that name (profiles: "
                f"{known}); add a schedulingProfiles entry named {self.decode_profile!r} (with decode-filter) or "
                "set profiles.decode to the decode profile's name"
            )
        if self.decider_name and self.decider is None:
            raise ConfigError(f"deciders.prefill names {self.decider_name!r}, but the handler was never bound to "
                              "the config's plugins")
        used = {self.decode_profile}
        if self.decider is not None:
            if self.prefill_profile not in profiles:
                raise ConfigError(
                    f"profiles.prefill is {self.prefill_profile!r}, but no scheduling profile has that name "
                    f"(profiles: {known}); add a schedulingProfiles entry named {self.prefill_profile!r} (with "
                    "prefill-filter) or set profiles.prefill to the prefill profile's name"
                )
            used.add(self.prefill_profile)
            if self.prefill_profile != LEARNED_PREFILL_PROFILE:
                log.warning(
                    "plugin %r: the prefill profile is named %r; the prefix caches learn the prefill leg only "
                    "from a profile named %r, so name it so", self.name, self.prefill_profile,
                    LEARNED_PREFILL_PROFILE,
                )
        elif self.prefill_profile in profiles:
            log.warning(
                "plugin %r: profile %r never runs because deciders.prefill is not set; add "
                "`deciders: {prefill: <decider plugin name>}` to disaggregate", self.name, self.prefill_profile,
            )
        unused = [p for p in profiles if p not in used and p != self.prefill_profile]
        if unused:
            log.warning("plugin %r: scheduling profiles %s never run (it runs only profiles.decode and "
                        "profiles.prefill)", self.name, ", ".join(unused))

    def _ensure_checked(self, profiles: Mapping[str, SchedulerProfile]) -> None:
        if profiles is self._checked:
            if self._broken is not None:
                raise SchedulingError(self._broken, status=503)
            return
        self._checked = profiles
        try:
            self.check_profiles(profiles)
            self._broken = None
        except ConfigError as exc:
            self._broken = f"{self.type} {self.name!r} is misconfigured: {exc}"
            log.error("%s", self._broken)
            raise SchedulingError(self._broken, status=503) from None

    # -- ProfileHandler ------------------------------------------------------------------------------------

    def _approves(self, state: CycleState, request: LLMRequest, decode: ProfileResult | None) -> bool:
        """Asks the decider once per cycle (the verdict is kept in `state[self.name]`)."""
        verdict = state.get(self.name)
        if verdict is None:
            verdict = bool(
                self.decider is not None
                and decode is not None
                and decode.endpoints
                and self.decider.disaggregate(state, request, decode.endpoints[0])
            )
            state[self.name] = verdict
        return verdict

    def pick_profiles(
        self,
        state: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[SchedulerProfile]:
        self._ensure_checked(profiles)
        decode, prefill = self.decode_profile, self.prefill_profile
        prefill_stage = self.decider is not None
        if decode not in results:
            if self.prefill_first and prefill_stage and prefill not in results:
                return [profiles[prefill]]
            return [profiles[decode]]
        if prefill_stage and not self.prefill_first and prefill not in results:
            if self._approves(state, request, results[decode]):
                return [profiles[prefill]]
        return []

    def process_results(
        self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        decode = results.get(self.decode_profile)
        if decode is None or not decode.endpoints:
            raise SchedulingError(
                f"failed to find a target endpoint: decode profile {self.decode_profile!r} found none", status=503
            )
        kept: dict[str, ProfileResult | None] = {self.decode_profile: decode}
        headers: dict[str, str] = {}
        if self.prefill_profile in results and self._approves(state, request, decode):
            prefill = results[self.prefill_profile]
            target = decode.endpoints[0]
            if prefill is None or not prefill.endpoints:
                log.debug("request %s: prefill profile %r found no endpoint; serving it aggregated on %s",
                          request.request_id, self.prefill_profile, target.hostport)
            elif prefill.endpoints[0] is target:
                log.debug("request %s: prefill and decode chose the same endpoint %s; serving it aggregated",
                          request.request_id, target.hostport)
            else:
                kept[self.prefill_profile] = prefill
                headers[PREFILLER_HEADER] = prefill.endpoints[0].hostport
        return SchedulingResult(profile_results=kept, primary_profile=self.decode_profile, headers=headers)
