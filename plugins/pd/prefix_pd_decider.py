"""`prefix-based-pd-decider` (llm-d): disaggregate when the chosen decode pod would have to prefill many tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from epp.datastore.endpoint import Endpoint
from epp.request import LLMRequest
from epp.scheduling.registry import ConfigError, PluginHandle, register
from epp.scheduling.types import CycleState
from plugins.prefix import APPROX_PRODUCER_TYPE, PREFIX_CACHE_MATCH_INFO
from plugins.prefix.hashing import CHARS_PER_TOKEN, USER_INPUT_KEY

log = logging.getLogger(__name__)


def prompt_and_cached_tokens(info: Any, request: LLMRequest) -> tuple[int, int]:
    """(prompt tokens, cached prompt tokens) of `request` on the endpoint whose PrefixMatchInfo is `info`, as
    the prefix producers estimate them; nothing is hashed or tokenized again.

    - A producer that counts real tokens (the precise one: its info carries the unweighted `cached_blocks`):
      cached = cached_blocks × block size (a block in the CPU tier counts: it is loaded, not recomputed) and
      prompt = total_blocks × block size, i.e. the prompt's full blocks (a trailing partial block is unseen).
    - The approximate producer (no tokenizer): cached = match_blocks × blockSizeTokens and prompt = the bytes
      of the user input it hashed (`request.scratch[USER_INPUT_KEY]`) / 4, the same characters-per-token
      estimate its blocks use. Blocks beyond its maxPrefixBlocksToMatch cap are never matched, so they count
      as uncached.
    """
    block = int(info.block_size_tokens)
    total = int(info.total_blocks) * block
    exact_blocks = getattr(info, "cached_blocks", None)
    if exact_blocks is not None:
        return total, min(total, int(exact_blocks) * block)
    user_input = request.scratch.get(USER_INPUT_KEY)
    prompt = max(total, len(user_input) // CHARS_PER_TOKEN) if user_input is not None else total
    return prompt, min(prompt, int(info.match_blocks) * block)


@dataclass(frozen=True)
class PrefixPDDeciderParams:
    """nonCachedTokens              approve when the decode pod's uncached prompt tokens are at least this
                                    many; 0 (llm-d's default) turns the decider off: it never approves
    promptTokens                   and only when the prompt has at least this many tokens (0 = any length)
    prefixMatchInfoProducerName    the producer whose PrefixMatchInfo is read (default the approximate one)
    """

    non_cached_tokens: int = 0
    prompt_tokens: int = 0
    prefix_match_info_producer_name: str = APPROX_PRODUCER_TYPE

    def validate(self) -> None:
        if self.non_cached_tokens < 0:
            raise ValueError(f"nonCachedTokens must be >= 0 (0 = never disaggregate), got {self.non_cached_tokens}")
        if self.prompt_tokens < 0:
            raise ValueError(f"promptTokens must be >= 0 (0 = any prompt length), got {self.prompt_tokens}")


@register
class PrefixBasedPDDecider:
    """Approves disaggregated serving for a request when the decode pod the decode profile chose would have to
    compute many prompt tokens itself: uncached = prompt tokens − tokens of the prompt prefix that pod is
    believed to hold, and the decider approves when nonCachedTokens > 0, prompt tokens ≥ promptTokens and
    uncached ≥ nonCachedTokens. A pod without the producer's attribute is never disaggregated.

    Why: a long uncached prefill on the decode pod stalls the decoding of every request batched with it, and
    sending it to a prefill pod costs a KV transfer plus a hop; a mostly cached prompt is cheap to finish where
    it is.

    Signal: the `PrefixMatchInfo` written by the producer named prefixMatchInfoProducerName (see
    `prompt_and_cached_tokens` for how tokens are counted). When it is wrong: it inherits its producer's
    errors; with the approximate producer, token counts are characters / 4 (JSON of chat messages included),
    so a threshold in tokens is only approximate.
    """

    type: ClassVar[str] = "prefix-based-pd-decider"
    consumes: ClassVar[frozenset[str]] = frozenset({PREFIX_CACHE_MATCH_INFO})
    Params = PrefixPDDeciderParams

    def __init__(self, name: str, params: PrefixPDDeciderParams, handle: PluginHandle) -> None:
        self.name = name
        self.params = params
        self.non_cached_tokens = params.non_cached_tokens
        self.prompt_tokens = params.prompt_tokens
        self.attribute = params.prefix_match_info_producer_name or APPROX_PRODUCER_TYPE
        # The default (approximate) producer is created by the config loader when missing; a named one must be
        # declared.
        self.requires = (APPROX_PRODUCER_TYPE,) if self.attribute == APPROX_PRODUCER_TYPE else ()
        if self.non_cached_tokens == 0:
            log.warning(
                "plugin %r (type %s): nonCachedTokens is 0, so it never approves disaggregation; set it to the "
                "uncached prompt tokens above which prefill should run on a prefill pod (e.g. 512)",
                name, self.type,
            )

    def bind(self, handle: PluginHandle) -> None:
        """The producer read must exist and produce PrefixMatchInfo, or the decider would silently never
        approve."""
        producer = handle.plugins.get(self.attribute)
        if producer is None or PREFIX_CACHE_MATCH_INFO not in getattr(producer, "produces", ()):
            producers = sorted(
                n for n, p in handle.plugins.items() if PREFIX_CACHE_MATCH_INFO in getattr(p, "produces", ())
            )
            what = "no plugin is named" if producer is None else "the plugin named"
            tail = "" if producer is None else f" does not produce {PREFIX_CACHE_MATCH_INFO}"
            raise ConfigError(
                f"{what} {self.attribute!r}{tail}, which prefixMatchInfoProducerName names; set it to the "
                f"name of a {PREFIX_CACHE_MATCH_INFO} producer (defined: {', '.join(producers) or 'none'})"
            )

    def disaggregate(self, state: CycleState, request: LLMRequest, endpoint: Endpoint) -> bool:
        if self.non_cached_tokens <= 0:
            return False
        info = endpoint.attributes.get(self.attribute)
        if info is None:
            return False
        prompt, cached = prompt_and_cached_tokens(info, request)
        if prompt < self.prompt_tokens:
            return False
        return prompt - cached >= self.non_cached_tokens
