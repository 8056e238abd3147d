"""`weighted-random-picker`: endpoints sampled with probability proportional to their score."""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from itertools import accumulate
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState, ProfileResult
from plugins.max_score_picker import PickerParams


@register
class WeightedRandomPicker:
    """Samples `maxNumOfEndpoints` distinct candidates without replacement, weighted by total score.

    Weighted reservoir sampling (Efraimidis–Spirakis "A-Res"): each endpoint with score w > 0 draws
    U ~ Uniform(0, 1] and gets the key U^(1/w); the largest keys win. For one pick this chooses endpoint i
    with probability w_i / Σw; for several, each next pick is proportional among those left. Keys are compared
    as log(U)/w, which orders them the same way without underflow for small w. Endpoints scoring 0 get the
    lowest key (they come after every positive one, in random order); when every score is 0 this is exactly
    `random-picker`. A single pick takes the equivalent shortcut of one draw on the cumulative scores.

    Against `max-score-picker` it trades a little cache affinity for spreading: it avoids piling every request
    onto the same best-scored endpoint between two scrapes. It is wrong when score differences are large but
    meaningful only at the top (e.g. one endpoint holds the whole prefix): the others still get picked in
    proportion to their score. A scorer that gives every endpoint the same non-zero score flattens the
    distribution, because this picker sees the sum of all weighted scores.
    """

    type: ClassVar[str] = "weighted-random-picker"
    Params = PickerParams

    def __init__(self, name: str, params: PickerParams, handle: PluginHandle) -> None:
        self.name = name
        self.max_num_of_endpoints = params.max_num_of_endpoints
        self.rng = random.Random()

    def pick(self, state: CycleState, scores: Mapping[Endpoint, float]) -> ProfileResult:
        scored = list(scores.items())
        n_wanted = self.max_num_of_endpoints
        if n_wanted == 1 and scored:
            one = self._pick_one(scored)
            if one is not None:
                return ProfileResult((one,))
        rand = self.rng.random
        log = math.log
        keyed: list[tuple[float, int]] = []
        zero: list[int] = []
        for i, s in enumerate(scored):
            w = s[1]
            if w > 0.0:
                keyed.append((log(1.0 - rand()) / w, i))  # 1 - U is in (0, 1], so the log is finite
            else:
                zero.append(i)  # zero, negative or NaN
        top = heapq.nlargest(n_wanted, keyed) if len(keyed) > n_wanted else sorted(keyed, reverse=True)
        picked = [scored[i][0] for _, i in top]
        missing = n_wanted - len(picked)
        if missing > 0 and zero:
            picked.extend(scored[i][0] for i in self.rng.sample(zero, min(missing, len(zero))))
        return ProfileResult(tuple(picked))

    def _pick_one(self, scored: list[tuple[Endpoint, float]]) -> Endpoint | None:
        """One endpoint with probability score/Σscore, by one draw on the cumulative scores: the distribution
        A-Res gives for a single pick, with one random number instead of one per endpoint. None when no score
        is positive or the sum is not finite (the caller then falls back to the general path)."""
        cumulative = list(accumulate(s[1] if s[1] > 0.0 else 0.0 for s in scored))
        total = cumulative[-1]
        if not 0.0 < total < math.inf:
            return None
        i = bisect_right(cumulative, self.rng.random() * total)
        if i == len(cumulative):  # the draw rounded up to the total: take the last positive score
            i = bisect_left(cumulative, total)
        return scored[i][0]
