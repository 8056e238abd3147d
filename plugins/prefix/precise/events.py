"""Decoding vLLM's KV-event batches and topics (pure functions, no I/O).

A ZMQ message from a vLLM publisher is `[topic, seq (8 bytes big-endian), payload]`; the payload is a
msgpack `KVEventBatch`. Its shape changed over vLLM versions (reference notes 3.4), so decoding is
defensive and accepts every shape seen in the wild:

  batch   `[ts, [event, ...], data_parallel_rank?]` (array-like), or a map `{"ts", "events",
          "data_parallel_rank"}`
  event   array-like `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
          medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window]`
          with trailing defaults omitted (vLLM before PR #42892), or a map tagged by `"type"`
          (`{"type": "BlockStored", "block_hashes": ..., ...}`, vLLM since), fields at their default
          omitted. `BlockRemoved(block_hashes, medium, group_idx)` and `AllBlocksCleared()` likewise.

Unknown fields are ignored, unknown event types become `UnknownEvent` (counted, not applied), and a
malformed event is reported in `EventBatch.errors` without spoiling the rest of its batch. Block hashes
are kept as sent (an unsigned 64-bit int by default, the raw digest bytes with
VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): they are only ever compared with each other.

Token ids are returned as uint32 little-endian bytes (the layout `keys.py` hashes), which also checks
them: a non-integer or out-of-range id makes the event malformed.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

EngineHash = int | bytes

BLOCK_STORED = "BlockStored"
BLOCK_REMOVED = "BlockRemoved"
ALL_BLOCKS_CLEARED = "AllBlocksCleared"
EVENT_TYPES = (BLOCK_STORED, BLOCK_REMOVED, ALL_BLOCKS_CLEARED)

# The tier a store or removal without a `medium` refers to.
DEFAULT_MEDIUM = "gpu"

# Field order of the array-like encoding (after the tag).
STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

_BIG_ENDIAN = sys.byteorder == "big"


class DecodeError(ValueError):
    """A payload, topic or event that is not a vLLM KV-event shape; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks newly cached by the engine: `block_hashes[i]` covers `token_bytes[i*block_size*4 : …]`
    (uint32 little-endian ids) and chains from `parent_block_hash` (None: the start of a sequence).
    `token_bytes` is empty for a CPU-offload placeholder that only moves known blocks to a tier."""

    block_hashes: tuple[EngineHash, ...]
    parent_block_hash: EngineHash | None
    token_bytes: bytes
    block_size: int
    medium: str = DEFAULT_MEDIUM
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_bytes) // 4


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks the engine dropped from tier `medium`."""

    block_hashes: tuple[EngineHash, ...]
    medium: str = DEFAULT_MEDIUM
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine's prefix cache was reset: it holds nothing any more."""


@dataclass(frozen=True, slots=True)
class UnknownEvent:
    """An event of a type this decoder does not know (a newer vLLM); counted and skipped."""

    tag: str


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared | UnknownEvent


@dataclass(slots=True)
class EventBatch:
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    errors: list[str] = field(default_factory=list)  # one message per malformed event (skipped)


@dataclass(frozen=True, slots=True)
class Topic:
    """What a topic `<prefix>@<pod>@<model>` says: the pod (`ip:port`, or `ip` in the older form) and the
    model; either is None when the topic does not carry it."""

    pod: str | None
    model: str | None


# --------------------------------------------------------------------------------------------------------
# Topics


def parse_topic(topic: bytes | str) -> Topic:
    """Split llm-d's topic convention `kv@<pod-ip>:<port>@<model>` (or `kv@<pod-ip>@<model>`).

    A topic without `@` (e.g. vLLM's default empty topic) names neither; `kv@<pod>` names only the pod.
    The model may itself contain `@` (everything after the second `@` is the model)."""
    if isinstance(topic, bytes):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError(f"topic {topic[:64]!r} is not UTF-8") from None
    parts = topic.split("@", 2)
    if len(parts) < 2:
        return Topic(None, None)
    pod = parts[1] or None
    model = parts[2] if len(parts) == 3 and parts[2] else None
    return Topic(pod, model)


# --------------------------------------------------------------------------------------------------------
# Batches


def decode_batch(payload: bytes) -> EventBatch:
    """Decode one msgpack `KVEventBatch` payload. Raises DecodeError when the payload as a whole is not a
    batch; a malformed event inside a good batch is skipped and described in `errors`."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types (ExtraData, ValueError, …)
        raise DecodeError(f"payload is not msgpack: {exc}") from None
    if isinstance(raw, Mapping):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
        rank = raw[2] if len(raw) > 2 else None
    else:
        raise DecodeError(f"a batch must be [ts, events, rank?] or a map, got {_describe(raw)}")
    if not isinstance(events, list):
        raise DecodeError(f"a batch's events must be a list, got {_describe(events)}")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        ts = 0.0
    if isinstance(rank, bool) or not isinstance(rank, int):
        rank = None
    batch = EventBatch(float(ts), [], rank)
    for i, raw_event in enumerate(events):
        try:
            batch.events.append(decode_event(raw_event))
        except DecodeError as exc:
            batch.errors.append(f"event {i}: {exc}")
    return batch


def decode_event(raw: Any) -> KVEvent:
    """One event in either shape (see the module docstring). Raises DecodeError."""
    if isinstance(raw, Mapping):
        tag = _text(raw.get("type"))
        if tag is None:
            raise DecodeError(f"a map-encoded event needs a string `type`, got {_describe(raw)}")
        values: Mapping[str, Any] = raw
    elif isinstance(raw, list) and raw:
        tag = _text(raw[0])
        if tag is None:
            raise DecodeError(f"an array-encoded event starts with its type name, got {_describe(raw)}")
        names = STORED_FIELDS if tag == BLOCK_STORED else REMOVED_FIELDS if tag == BLOCK_REMOVED else ()
        values = dict(zip(names, raw[1:], strict=False))
    else:
        raise DecodeError(f"an event must be a map or a tagged array, got {_describe(raw)}")
    if tag == BLOCK_STORED:
        return _stored(values)
    if tag == BLOCK_REMOVED:
        return BlockRemoved(_hashes(values.get("block_hashes")), _medium(values.get("medium")),
                            _opt_int(values.get("group_idx"), "group_idx"))
    if tag == ALL_BLOCKS_CLEARED:
        return AllBlocksCleared()
    return UnknownEvent(tag)


def _stored(values: Mapping[str, Any]) -> BlockStored:
    hashes = _hashes(values.get("block_hashes"))
    parent = values.get("parent_block_hash")
    if parent is not None and not _is_hash(parent):
        raise DecodeError(f"parent_block_hash must be an int, bytes or null, got {_describe(parent)}")
    block_size = values.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
        raise DecodeError(f"block_size must be a non-negative integer, got {_describe(block_size)}")
    token_bytes = _token_bytes(values.get("token_ids"))
    extra = values.get("extra_keys")
    if extra is not None:
        if not isinstance(extra, list):
            raise DecodeError(f"extra_keys must be a list (one entry per block) or null, got {_describe(extra)}")
        extra = tuple(extra)
    lora = values.get("lora_name")
    if lora is not None and not isinstance(lora, str):
        raise DecodeError(f"lora_name must be a string or null, got {_describe(lora)}")
    kind = values.get("kv_cache_spec_kind")
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_bytes=token_bytes,
        block_size=block_size,
        medium=_medium(values.get("medium")),
        lora_name=lora or None,
        extra_keys=extra,
        group_idx=_opt_int(values.get("group_idx"), "group_idx"),
        kv_cache_spec_kind=kind if isinstance(kind, str) else None,
    )


def _is_hash(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, bytes)


_HASH_TYPES = frozenset({int, bytes})


def _hashes(value: Any) -> tuple[EngineHash, ...]:
    if not isinstance(value, list):
        raise DecodeError(f"block_hashes must be a list, got {_describe(value)}")
    if not _HASH_TYPES.issuperset(map(type, value)):  # msgpack gives exactly int or bytes for hashes
        bad = next(h for h in value if type(h) not in _HASH_TYPES)
        raise DecodeError(f"block_hashes must hold ints or bytes, got {_describe(bad)}")
    return tuple(value)


def _token_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, list):
        raise DecodeError(f"token_ids must be a list of integers, got {_describe(value)}")
    try:
        ids = array("I", value)  # checks every id is an integer in [0, 2**32) at C speed
    except (TypeError, OverflowError) as exc:
        raise DecodeError(f"token_ids must be integers in [0, 2**32): {exc}") from None
    if _BIG_ENDIAN:
        ids.byteswap()
    return ids.tobytes()


def _medium(value: Any) -> str:
    text = _text(value)
    return text.lower() if text else DEFAULT_MEDIUM


def _opt_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeError(f"{name} must be an integer or null, got {_describe(value)}")
    return value


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------------------------------------
# Encoding (for tests, tools and benchmarks: the inverse of decode_event for BlockStored/BlockRemoved)


def encode_event(event: KVEvent, shape: str = "map", token_ids: Sequence[int] | None = None) -> Any:
    """The msgpack-ready form of `event` in `shape` ("map" or "array"), with `token_ids` as the stored
    tokens (default: decoded from `event.token_bytes`)."""
    if isinstance(event, AllBlocksCleared):
        return {"type": ALL_BLOCKS_CLEARED} if shape == "map" else [ALL_BLOCKS_CLEARED]
    if isinstance(event, BlockRemoved):
        fields = {"block_hashes": list(event.block_hashes), "medium": event.medium.upper()}
        if event.group_idx is not None:
            fields["group_idx"] = event.group_idx
        names: tuple[str, ...] = REMOVED_FIELDS
        tag = BLOCK_REMOVED
    elif isinstance(event, BlockStored):
        if token_ids is None:
            ids = array("I", event.token_bytes)
            if _BIG_ENDIAN:
                ids.byteswap()
            token_ids = ids.tolist()
        fields = {
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium.upper(),
        }
        for name in ("lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind"):
            value = getattr(event, name)
            if value is not None:
                fields[name] = list(value) if name == "extra_keys" else value
        names = STORED_FIELDS
        tag = BLOCK_STORED
    else:
        return {"type": event.tag} if shape == "map" else [event.tag]
    if shape == "map":
        return {"type": tag, **fields}
    values = [fields.get(n) for n in names]
    while values and names[len(values) - 1] not in fields:
        values.pop()
    return [tag, *values]
