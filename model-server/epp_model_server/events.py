"""KV-cache events and their wire encoding, byte-compatible with vLLM's ZMQ publisher (pure).

vLLM (`vllm/distributed/kv_events.py`) serialises msgspec structs with `omit_defaults=True`:

- A batch is `[ts, [event, ...], data_parallel_rank]`: an array, in both formats.
- `map` format (vLLM since PR #42892, the default here): each event is a map tagged by `"type"`, e.g.
  `{"type": "BlockStored", "block_hashes": [...], ...}`; fields equal to their default are omitted.
- `array` format (older vLLM): each event is `["BlockStored", field1, field2, ...]` in field order;
  trailing fields equal to their default are dropped.

Field order and defaults (only fields after the required ones have defaults):
  BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
              lora_name=None, extra_keys=None)
  BlockRemoved(block_hashes, medium)
  AllBlocksCleared()

Block hashes are unsigned 64-bit ints (see `hashing.event_hash`). `extra_keys` carries one entry per
stored block (the block's cache_salt as a 1-tuple on block 0, None elsewhere) and is omitted when no
block has any; the LoRA adapter travels in `lora_name`/`lora_id`, not in `extra_keys`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import msgpack

FORMATS = ("map", "array")
MEDIUM_GPU = "GPU"

_REQUIRED = object()


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str | None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


def _fields(event: KVEvent) -> list[tuple[str, Any, Any]]:
    """(name, value, default or _REQUIRED) for each field, in declaration order."""
    out = []
    for f in dataclasses.fields(event):
        default = f.default if f.default is not dataclasses.MISSING else _REQUIRED
        out.append((f.name, getattr(event, f.name), default))
    return out


def encode_event(event: KVEvent, fmt: str = "map") -> dict[str, Any] | list[Any]:
    """The msgpack-ready form of one event in `fmt` ("map" or "array")."""
    tag = type(event).__name__
    fields = _fields(event)
    if fmt == "map":
        out: dict[str, Any] = {"type": tag}
        for name, value, default in fields:
            if default is _REQUIRED or value != default:
                out[name] = value
        return out
    if fmt == "array":
        values = [value for _, value, _ in fields]
        keep = len(fields)
        while keep and fields[keep - 1][2] is not _REQUIRED and fields[keep - 1][1] == fields[keep - 1][2]:
            keep -= 1
        return [tag, *values[:keep]]
    raise ValueError(f"unknown KV event format {fmt!r}; choose one of {', '.join(FORMATS)}")


def encode_batch(ts: float, events: list[KVEvent], fmt: str = "map", data_parallel_rank: int = 0) -> bytes:
    """One `EventBatch` payload: msgpack of `[ts, [events...], data_parallel_rank]`."""
    return msgpack.packb([ts, [encode_event(e, fmt) for e in events], data_parallel_rank], use_bin_type=True)


_EVENT_TYPES: dict[str, type] = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved,
                                  "AllBlocksCleared": AllBlocksCleared}


def decode_event(raw: Any) -> KVEvent:
    """The inverse of `encode_event` for either format (for tests and tools)."""
    if isinstance(raw, dict):
        cls = _EVENT_TYPES.get(raw.get("type"))
        values = {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, list | tuple) and raw:
        cls = _EVENT_TYPES.get(raw[0])
        names = [f.name for f in dataclasses.fields(cls)] if cls else []
        values = dict(zip(names, raw[1:], strict=False))
    else:
        raise ValueError(f"cannot decode KV event {raw!r}")
    if cls is None:
        raise ValueError(f"unknown KV event type in {raw!r}")
    return cls(**values)
