"""`precise-prefix-cache-scorer`: llm-d's deprecated wrapper around the precise producer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import ConfigError, PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.prefix import PREFIX_CACHE_MATCH_INFO
from plugins.prefix.precise import PRECISE_PRODUCER_TYPE, PRECISE_SCORER_TYPE
from plugins.prefix.precise.producer import PrecisePrefixCacheProducer, PrecisePrefixParams

log = logging.getLogger(__name__)


@register
class PrecisePrefixCacheScorer:
    """Scores each endpoint by the fraction of the request's prompt blocks its KV cache holds as a
    consecutive prefix, tier-weighted (GPU 1.0, CPU 0.8 by default): `match_blocks / total_blocks` of
    the `PrefixMatchInfo` the precise producer writes. A prompt shorter than one block scores 0 everywhere.

    llm-d keeps this type as a deprecated wrapper: its parameters are the producer's, and the config loader
    creates a `precise-prefix-cache-producer` with them when none is declared. New configs use
    `prefix-cache-scorer` with `prefixMatchInfoProducerName: precise-prefix-cache-producer` instead.

    Signal and errors: those of the precise producer (KV events; wrong when events are lost, between a
    decision and its events without speculative indexing, or when the request-side tokenizer differs
    from the model servers'). Like any prefix scorer it ignores load: pair it with load scorers.
    """

    type: ClassVar[str] = PRECISE_SCORER_TYPE
    requires: ClassVar[tuple[str, ...]] = (PRECISE_PRODUCER_TYPE,)
    consumes: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    Params = PrecisePrefixParams

    def __init__(self, name: str, params: PrecisePrefixParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.attribute = PRECISE_PRODUCER_TYPE

    def bind(self, handle: PluginHandle) -> None:
        """Read the producer that exists: the one named `precise-prefix-cache-producer`, else the only
        producer of that type."""
        producer = handle.plugins.get(PRECISE_PRODUCER_TYPE)
        if not isinstance(producer, PrecisePrefixCacheProducer):
            found = [p for p in handle.plugins.values() if isinstance(p, PrecisePrefixCacheProducer)]
            if len(found) != 1:
                raise ConfigError(
                    f"needs exactly one {PRECISE_PRODUCER_TYPE!r} plugin to read, found {len(found)}; declare "
                    f"one, or use prefix-cache-scorer with prefixMatchInfoProducerName naming the producer"
                )
            producer = found[0]
        if producer.params != self.params and self.params != PrecisePrefixParams():
            log.warning(
                "plugin %r: its parameters differ from those of producer %r, which are the ones in effect",
                self.name, producer.name,
            )
        self.attribute = producer.name

    def score(self, state: CycleState, request: LLMRequest, endpoints: Sequence[Endpoint]) -> dict[Endpoint, float]:
        key = self.attribute
        scores: dict[Endpoint, float] = {}
        for ep in endpoints:
            info = ep.attributes.get(key)
            total = getattr(info, "total_blocks", 0)
            scores[ep] = info.match_blocks / total if total > 0 else 0.0
        return scores
