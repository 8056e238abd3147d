"""`random-picker`: endpoints chosen uniformly at random, ignoring scores."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState, ProfileResult
from plugins.max_score_picker import PickerParams


@register
class RandomPicker:
    """Picks `maxNumOfEndpoints` distinct candidates uniformly at random; scores are ignored.

    Useful as a baseline and where the filters alone decide (e.g. a profile with only a label filter). It is
    wrong whenever endpoints differ in load or cache contents: it spreads requests evenly by count, not by
    cost, and throws away all prefix-cache affinity.
    """

    type: ClassVar[str] = "random-picker"
    Params = PickerParams

    def __init__(self, name: str, params: PickerParams, handle: PluginHandle) -> None:
        self.name = name
        self.max_num_of_endpoints = params.max_num_of_endpoints
        self.rng = random.Random()

    def pick(self, state: CycleState, scores: Mapping[Endpoint, float]) -> ProfileResult:
        candidates = list(scores)
        n = len(candidates)
        if n == 0:
            return ProfileResult(())
        if self.max_num_of_endpoints == 1:
            return ProfileResult((candidates[self.rng.randrange(n)],))
        return ProfileResult(tuple(self.rng.sample(candidates, min(self.max_num_of_endpoints, n))))
