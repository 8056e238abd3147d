"""Prefix-cache routing: send a request where its prompt prefix is most likely already in the KV cache.

Modules:
  hashing.py          pure functions: the text hashed for each OpenAI API, chained block hashes
  index.py            the approximate index (hash -> endpoints, per-endpoint LRU of hashes)
  approx_producer.py  `approx-prefix-cache-producer`: looks requests up in the index and learns decisions
  scorer.py           `prefix-cache-scorer`: turns a `PrefixMatchInfo` into a score in [0, 1]

What passes between them, per request:
  request.scratch[hashing.USER_INPUT_KEY]  the bytes hashed for the request (shared by every prefix plugin)
  request.scratch[hashes_key(producer)]    the request's chained block hashes, kept by that producer for
                                           its pre_request hook
  endpoint.attributes[producer name]       a PrefixMatchInfo for every candidate endpoint, read by scorers
"""

from __future__ import annotations

from dataclasses import dataclass

# The data key a producer of PrefixMatchInfo declares in `produces` and its readers in `consumes`
# (the reference EPP's name for it).
PREFIX_CACHE_MATCH_INFO = "PrefixCacheMatchInfo"

# The type (and default instance name) of the approximate producer; scorers read its attribute by default.
APPROX_PRODUCER_TYPE = "approx-prefix-cache-producer"


@dataclass(frozen=True, slots=True)
class PrefixMatchInfo:
    """How much of a request's prompt prefix one endpoint is believed to hold.

    `match_blocks` of the request's `total_blocks` blocks matched; a block is `block_size_tokens` tokens
    (approximated as 4 characters per token by the approximate producer). `total_blocks` is 0 when the
    prompt is shorter than one block.
    """

    match_blocks: int
    total_blocks: int
    block_size_tokens: int

    @property
    def match_tokens(self) -> int:
        return self.match_blocks * self.block_size_tokens

    @property
    def ratio(self) -> float:
        """Matched fraction of the prompt's blocks, in [0, 1]; 0 when there are no blocks."""
        return self.match_blocks / self.total_blocks if self.total_blocks > 0 else 0.0


def hashes_key(producer_name: str) -> str:
    """The `request.scratch` key under which producer `producer_name` keeps the request's block hashes."""
    return f"prefix.hashes/{producer_name}"
