"""`single-profile-handler`: run every configured profile once (there is exactly one) and make it primary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from epp.request import LLMRequest
from epp.scheduling.registry import NoParams, PluginHandle, register
from epp.scheduling.scheduler import SchedulerProfile
from epp.scheduling.types import CycleState, ProfileResult, SchedulingError, SchedulingResult


@register
class SingleProfileHandler:
    """The profile handler for configs with one scheduling profile (the reference EPP's default).

    The first `pick_profiles` call of a cycle returns every profile (the one there is); once it has run, later
    calls return none. `process_results` makes that profile primary. It decides nothing from request or
    endpoint data, so it is never wrong about load; a config with more than one profile is refused by the
    loader (`max_profiles`), because which of several results is primary would be arbitrary.
    """

    type: ClassVar[str] = "single-profile-handler"
    max_profiles: ClassVar[int] = 1

    def __init__(self, name: str, params: NoParams, handle: PluginHandle) -> None:
        self.name = name

    def pick_profiles(
        self,
        state: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[SchedulerProfile]:
        if results:
            return []
        return list(profiles.values())

    def process_results(
        self, state: CycleState, request: LLMRequest, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        if len(results) != 1:
            raise SchedulingError(
                f"{self.type} {self.name!r} expects exactly one profile result, got {len(results)} "
                f"({', '.join(sorted(results)) or 'none'}); configure one scheduling profile or use a "
                "multi-profile handler",
                status=503,
            )
        ((profile_name, result),) = results.items()
        if result is None:
            raise SchedulingError(
                f"failed to find a target endpoint: profile {profile_name!r} found none", status=503
            )
        return SchedulingResult(profile_results=dict(results), primary_profile=profile_name)
