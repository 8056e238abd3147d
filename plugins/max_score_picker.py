"""`max-score-picker`: the highest-scored endpoints, ties broken at random."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.scheduling.registry import PluginHandle, register
from epp.scheduling.types import CycleState, ProfileResult


@dataclass(frozen=True, slots=True)
class PickerParams:
    """Parameters shared by the pickers: how many endpoints to return (the first is the target, the rest are
    fallbacks Envoy may retry on)."""

    max_num_of_endpoints: int = 1

    def validate(self) -> None:
        if self.max_num_of_endpoints < 1:
            raise ValueError(f"`maxNumOfEndpoints` must be at least 1, got {self.max_num_of_endpoints}")


@register
class MaxScorePicker:
    """Picks the `maxNumOfEndpoints` candidates with the highest total score, best first.

    Equal scores are broken uniformly at random, so identical endpoints (e.g. an idle pool where every
    scorer says the same) share the load instead of the first one in pool order taking it all. It is wrong
    when the scores are stale: between two metric scrapes every request sees the same winner and piles onto
    it (the "thundering herd"); `weighted-random-picker` or EPP-side load scorers soften that.

    With one endpoint to pick this is one O(n) pass (a tie replaces the current best with probability
    1/ties); with more it is a sort, O(n log n), then a random order for each tied group that reaches the top N.
    """

    type: ClassVar[str] = "max-score-picker"
    Params = PickerParams

    def __init__(self, name: str, params: PickerParams, handle: PluginHandle) -> None:
        self.name = name
        self.max_num_of_endpoints = params.max_num_of_endpoints
        self.rng = random.Random()

    def pick(self, state: CycleState, scores: Mapping[Endpoint, float]) -> ProfileResult:
        if not scores:
            return ProfileResult(())
        if self.max_num_of_endpoints == 1:
            return ProfileResult((self._best(scores),))
        # Sort by score (C speed), then shuffle only the groups of equal scores that reach into the top n:
        # the same distribution as shuffling everything before a stable sort, without a Python-level shuffle
        # of the whole list.
        ordered = sorted(scores.items(), key=_score, reverse=True)
        size = len(ordered)
        n = min(self.max_num_of_endpoints, size)
        picked: list[Endpoint] = []
        i = 0
        while len(picked) < n:
            score = ordered[i][1]
            j = i + 1
            while j < size and ordered[j][1] == score:
                j += 1
            take = n - len(picked)
            if j - i == 1:
                picked.append(ordered[i][0])
            elif j - i > take:  # the cut falls inside this tie: a uniformly random ordered subset of it
                picked.extend(s[0] for s in self.rng.sample(ordered[i:j], take))
            else:
                group = ordered[i:j]
                self.rng.shuffle(group)
                picked.extend(s[0] for s in group)
            i = j
        return ProfileResult(tuple(picked))

    def pick_values(
        self, state: CycleState, endpoints: Sequence[Endpoint], totals: Sequence[float]
    ) -> ProfileResult:
        """`pick(state, dict(zip(endpoints, totals)))`, without building the dict when the answer is the one
        first maximum (see `_best`): then an endpoint listed twice (the dict would keep it once, with the same
        score) changes nothing either, since the walk draws nothing and ignores scores below the maximum."""
        if self.max_num_of_endpoints == 1 and totals:
            i = _walk_draws_nothing(totals)
            if i is not None:
                return ProfileResult((endpoints[i],))
        return self.pick(state, dict(zip(endpoints, totals, strict=True)))

    def _best(self, scores: Mapping[Endpoint, float]) -> Endpoint:
        """The top endpoint; among `k` tied ones each wins with probability 1/k (reservoir sampling).

        The walk below draws a random number only at a score equal to the best one before it. So when the
        first maximum is the only one and the scores before it are all different, it draws none and ends on
        that first maximum, which `max` and `index` find at C speed: the same endpoint, and the same state of
        `rng` afterwards."""
        i = _walk_draws_nothing(list(scores.values()))
        if i is not None:
            return list(scores)[i]
        rand = self.rng.random
        it = iter(scores.items())
        best, best_score = next(it)
        ties = 1
        for ep, score in it:
            if score > best_score:
                best, best_score, ties = ep, score, 1
            elif score == best_score:
                ties += 1
                if rand() * ties < 1.0:
                    best = ep
        return best


def _walk_draws_nothing(values: Sequence[float]) -> int | None:
    """The index of the first maximum when the tie-breaking walk would draw no random number to reach it (it
    is the only maximum and the values before it are all different), else None."""
    top = max(values)
    i = values.index(top)
    if values.count(top) == 1 and len(set(values[:i])) == i:
        return i
    return None


def _score(item: tuple[Endpoint, float]) -> float:
    return item[1]
