"""`prefix-cache-scorer`: prefer endpoints that already hold the request's prompt prefix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import ConfigError, PluginHandle, register
from epp.scheduling.scheduler import clamped_scores
from epp.scheduling.types import CycleState
from plugins.prefix import APPROX_PRODUCER_TYPE, PREFIX_CACHE_MATCH_INFO
from plugins.prefix.approx_producer import ApproxPrefixParams


@dataclass(frozen=True)
class PrefixCacheScorerParams(ApproxPrefixParams):
    """The producer's parameters (accepted here and passed to the auto-created producer, unused by the
    scorer itself), plus:

    prefixMatchInfoProducerName  the producer whose PrefixMatchInfo attribute is read (empty = the default)
    matchLengthWeight            w in [0, 1]: weight of the absolute matched length against the ratio
    matchLengthScaleTokens       matched tokens at which the length term saturates at 1
    """

    prefix_match_info_producer_name: str = APPROX_PRODUCER_TYPE
    match_length_weight: float = 0.0
    match_length_scale_tokens: int = 8192

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.match_length_weight <= 1.0:
            raise ValueError(f"matchLengthWeight must be in [0, 1], got {self.match_length_weight}")
        if self.match_length_scale_tokens <= 0:
            raise ValueError(f"matchLengthScaleTokens must be > 0, got {self.match_length_scale_tokens}")


@register
class PrefixCacheScorer:
    """Scores each endpoint by how much of the request's prompt prefix it is believed to have cached, so
    that the prefill of those tokens is skipped:

        score = w · min(1, matched_tokens / scale)² + (1 − w) · matched_blocks / total_blocks

    with w = matchLengthWeight (default 0: the plain matched-block ratio) and scale = matchLengthScaleTokens.
    An endpoint without the producer's attribute, or a prompt shorter than one block, scores 0.

    Signal: the `PrefixMatchInfo` written by the producer named prefixMatchInfoProducerName (by default the
    approximate producer, which the config loader creates from this scorer's parameters when missing).

    When it is wrong: it inherits its producer's errors (the approximate one learns from decisions, not
    outcomes, counts characters rather than tokens, and sees one EPP replica's traffic only); and a high
    score says nothing about load, so with a max-score picker and a large weight it piles traffic sharing a
    prefix onto one endpoint unless load scorers balance it.
    """

    type: ClassVar[str] = "prefix-cache-scorer"
    requires: ClassVar[tuple[str, ...]] = (APPROX_PRODUCER_TYPE,)
    consumes: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    Params = PrefixCacheScorerParams

    def __init__(self, name: str, params: PrefixCacheScorerParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.attribute = params.prefix_match_info_producer_name or APPROX_PRODUCER_TYPE
        # Only the default (approximate) producer is auto-created; a named producer must be declared.
        self.requires = (APPROX_PRODUCER_TYPE,) if self.attribute == APPROX_PRODUCER_TYPE else ()
        self._w = params.match_length_weight
        self._scale = float(params.match_length_scale_tokens)

    def bind(self, handle: PluginHandle) -> None:
        """Called by the config loader once every plugin exists: the producer read must exist and produce
        PrefixMatchInfo, or every endpoint would silently score 0."""
        producer = handle.plugins.get(self.attribute)
        producers = sorted(
            name for name, p in handle.plugins.items() if PREFIX_CACHE_MATCH_INFO in getattr(p, "produces", ())
        )
        if producer is None or PREFIX_CACHE_MATCH_INFO not in getattr(producer, "produces", ()):
            what = "no plugin is named" if producer is None else "the plugin named"
            tail = "" if producer is None else f" does not produce {PREFIX_CACHE_MATCH_INFO}"
            raise ConfigError(
                f"{what} {self.attribute!r}{tail}, which prefixMatchInfoProducerName names; set it to the "
                f"name of a {PREFIX_CACHE_MATCH_INFO} producer (defined: {', '.join(producers) or 'none'})"
            )

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        key = self.attribute
        w = self._w
        scores: dict[Endpoint, float] = {}
        for ep in endpoints:
            info = ep.attributes.get(key)
            total = getattr(info, "total_blocks", 0)
            if total <= 0:
                scores[ep] = 0.0
                continue
            matched = info.match_blocks
            ratio = matched / total
            if w:
                length = min(1.0, matched * info.block_size_tokens / self._scale)
                scores[ep] = w * length * length + (1.0 - w) * ratio
            else:
                scores[ep] = ratio
        return scores

    def score_values(
        self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]
    ) -> list[float]:
        """`score()` as a list aligned with `endpoints`, clamped to [0, 1] as the scheduler clamps."""
        if not self._w:
            key = self.attribute
            try:
                # The plain ratio, clamped inline (most endpoints match nothing: 0 needs no division); an
                # endpoint without the attribute (None has no total_blocks) takes the general path below.
                return [
                    (0.0 if (m := info.match_blocks) == 0 else m / t if 0 <= m <= t else 1.0 if m > t else 0.0)
                    if (t := (info := ep.attributes.get(key)).total_blocks) > 0 else 0.0
                    for ep in endpoints
                ]
            except AttributeError:
                pass
        return clamped_scores(self.score(state, request, endpoints), endpoints)
