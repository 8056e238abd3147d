"""The precise (KV-event) prefix cache: what each model server really holds, learned from its KV events.

Modules, pure ones first:
  events.py        decoding vLLM's event batches (msgpack; the older array-like and the newer map-tagged
                   shapes) and KV-event topics (`kv@<pod-ip>:<port>@<model>`)
  keys.py          our own chained block keys over token ids (xxh3-64), computed the same way from an
                   event's token ids and from a request's, whatever vLLM's hash algorithm and seed are
  index.py         the block index: key -> endpoints holding it (with tiers), engine hash -> key per
                   endpoint (for removals), an LRU cap on entries, speculative entries with a TTL
  tokenize.py      request-side tokenization exactly as the model server does it (HF `tokenizers` or
                   the model server's built-in tokenizer, with the chat template), cached by prefix
  subscriber.py    ZMQ (zmq.asyncio) subscriptions: one SUB per pool endpoint or one bound central SUB,
                   sequence tracking, replay of missed batches, restarts
  producer.py      `precise-prefix-cache-producer`: ties them together; writes a PrefixMatchInfo per
                   candidate endpoint, learns decisions speculatively, exports metrics
  scorer.py        `precise-prefix-cache-scorer`: llm-d's deprecated wrapper (forwards its parameters to
                   the producer and scores its PrefixMatchInfo)
"""

from __future__ import annotations

PRECISE_PRODUCER_TYPE = "precise-prefix-cache-producer"
PRECISE_SCORER_TYPE = "precise-prefix-cache-scorer"
