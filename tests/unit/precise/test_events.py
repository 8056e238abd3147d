"""Decoding vLLM's KV-event batches: both wire shapes, built by hand as msgpack frames."""

from __future__ import annotations

import struct

import msgpack
import pytest

from plugins.prefix.precise.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    Topic,
    UnknownEvent,
    decode_batch,
    decode_event,
    encode_event,
    parse_topic,
)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def le32(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


TOKENS = list(range(100, 104))


# -- the two event shapes ---------------------------------------------------------------------------------

STORED_ARRAY = ["BlockStored", [11, 12], None, TOKENS, 2, None, "GPU"]
STORED_MAP = {"type": "BlockStored", "block_hashes": [11, 12], "parent_block_hash": None, "token_ids": TOKENS,
              "block_size": 2, "lora_id": None, "medium": "GPU"}
EXPECTED_STORED = BlockStored((11, 12), None, le32(*TOKENS), 2, "gpu")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (STORED_ARRAY, EXPECTED_STORED),
        (STORED_MAP, EXPECTED_STORED),
        # older vLLM: no medium at all -> the GPU tier
        (["BlockStored", [11, 12], None, TOKENS, 2, None], EXPECTED_STORED),
        ({k: v for k, v in STORED_MAP.items() if k not in ("medium", "lora_id")}, EXPECTED_STORED),
        # every field vLLM has added, in order: lora_name, extra_keys, group_idx, spec kind, sliding window
        (["BlockStored", [11, 12], 10, TOKENS, 2, 7, "CPU", "sql-lora", [["salt"], None], 0, "full_attention", None],
         BlockStored((11, 12), 10, le32(*TOKENS), 2, "cpu", "sql-lora", (["salt"], None), 0, "full_attention")),
        ({**STORED_MAP, "parent_block_hash": 10, "medium": "CPU", "lora_name": "sql-lora",
          "extra_keys": [["salt"], None], "group_idx": 0, "kv_cache_spec_kind": "full_attention"},
         BlockStored((11, 12), 10, le32(*TOKENS), 2, "cpu", "sql-lora", (["salt"], None), 0, "full_attention")),
        # raw digest bytes instead of ints (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
        ({**STORED_MAP, "block_hashes": [b"\x01" * 32], "parent_block_hash": b"\x02" * 32, "token_ids": TOKENS[:2]},
         BlockStored((b"\x01" * 32,), b"\x02" * 32, le32(*TOKENS[:2]), 2, "gpu")),
        # a CPU-offload placeholder: no tokens, block size 0
        ({"type": "BlockStored", "block_hashes": [11], "parent_block_hash": None, "token_ids": [], "block_size": 0,
          "medium": "CPU"}, BlockStored((11,), None, b"", 0, "cpu")),
        (["BlockRemoved", [11, 12], "GPU"], BlockRemoved((11, 12), "gpu")),
        (["BlockRemoved", [11], "CPU", 1], BlockRemoved((11,), "cpu", 1)),
        ({"type": "BlockRemoved", "block_hashes": [11]}, BlockRemoved((11,), "gpu")),
        (["AllBlocksCleared"], AllBlocksCleared()),
        ({"type": "AllBlocksCleared"}, AllBlocksCleared()),
        # fields a newer vLLM may add are ignored
        ({**STORED_MAP, "future_field": {"x": 1}}, EXPECTED_STORED),
        ({"type": "AllBlocksCleared", "medium": "GPU", "reason": "reset"}, AllBlocksCleared()),
        # unknown event types are kept as such (counted, not applied)
        ({"type": "BlockMoved", "block_hashes": [1]}, UnknownEvent("BlockMoved")),
        (["KVCacheWarmed"], UnknownEvent("KVCacheWarmed")),
    ],
)
def test_events_of_both_shapes_decode_to_the_same_value(raw, expected):
    assert decode_event(msgpack.unpackb(pack(raw), raw=False)) == expected


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"block_hashes": [1]}, "needs a string `type`"),
        ([], "must be a map or a tagged array"),
        ([42, [1]], "starts with its type name"),
        ("BlockStored", "must be a map or a tagged array"),
        ({**STORED_MAP, "block_hashes": 11}, "block_hashes must be a list"),
        ({**STORED_MAP, "block_hashes": [1.5]}, "block_hashes must hold ints or bytes"),
        ({**STORED_MAP, "parent_block_hash": "abc"}, "parent_block_hash must be"),
        ({**STORED_MAP, "token_ids": [1, "two"]}, "token_ids must be integers"),
        ({**STORED_MAP, "token_ids": [-1]}, "token_ids must be integers"),
        ({**STORED_MAP, "token_ids": [2**32]}, "token_ids must be integers"),
        ({**STORED_MAP, "block_size": "16"}, "block_size must be"),
        ({**STORED_MAP, "extra_keys": "salt"}, "extra_keys must be a list"),
        ({**STORED_MAP, "lora_name": 3}, "lora_name must be a string"),
        (["BlockRemoved", [1], "GPU", "one"], "group_idx must be an integer"),
    ],
)
def test_malformed_events_are_refused_with_the_reason(raw, message):
    with pytest.raises(DecodeError, match=message):
        decode_event(raw)


# -- batches ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "rank"),
    [
        (pack([1.5, [STORED_MAP, ["BlockRemoved", [11], "GPU"]], 3]), 3),  # vLLM 0.26: array batch, map events
        (pack([1.5, [STORED_ARRAY, ["BlockRemoved", [11], "GPU"]]]), None),  # older: no rank
        (pack({"ts": 1.5, "events": [STORED_ARRAY, {"type": "BlockRemoved", "block_hashes": [11]}],
               "data_parallel_rank": 3}), 3),  # a map-encoded batch
    ],
)
def test_batches_decode_in_every_shape(payload, rank):
    batch = decode_batch(payload)
    assert batch.ts == 1.5
    assert batch.data_parallel_rank == rank
    assert batch.events == [EXPECTED_STORED, BlockRemoved((11,), "gpu")]
    assert batch.errors == []


def test_a_malformed_event_is_skipped_and_reported_without_spoiling_its_batch():
    batch = decode_batch(pack([0.0, [{"type": "BlockStored"}, STORED_MAP, ["AllBlocksCleared"]], 0]))
    assert batch.events == [EXPECTED_STORED, AllBlocksCleared()]
    assert len(batch.errors) == 1 and batch.errors[0].startswith("event 0: block_hashes must be a list")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xc1not msgpack", "not msgpack"),
        (pack(42), "a batch must be"),
        (pack([1.0]), "a batch must be"),
        (pack([1.0, {"not": "a list"}]), "events must be a list"),
        (pack([1.0, []]) + b"trailing", "not msgpack"),
    ],
)
def test_payloads_that_are_no_batch_are_refused(payload, message):
    with pytest.raises(DecodeError, match=message):
        decode_batch(payload)


def test_encode_event_round_trips_through_both_shapes():
    event = BlockStored((1, 2), 9, le32(*TOKENS), 2, "cpu", "lora-a", (["s"], None))
    for shape in ("map", "array"):
        assert decode_event(msgpack.unpackb(pack(encode_event(event, shape)), raw=False)) == event
    removed = BlockRemoved((5,), "gpu")
    assert encode_event(removed, "array") == ["BlockRemoved", [5], "GPU"]
    assert decode_event(encode_event(removed, "map")) == removed


# -- topics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (b"kv@10.0.0.1:8000@meta-llama/Llama-3.1-8B", Topic("10.0.0.1:8000", "meta-llama/Llama-3.1-8B")),
        ("kv@10.0.0.1@m", Topic("10.0.0.1", "m")),  # the older form: no port
        (b"kv@[::1]:8000@m@v2", Topic("[::1]:8000", "m@v2")),  # a model may contain '@'
        (b"kv@10.0.0.1:8000", Topic("10.0.0.1:8000", None)),
        (b"kv@10.0.0.1:8000@", Topic("10.0.0.1:8000", None)),
        (b"", Topic(None, None)),  # vLLM's default empty topic
        (b"kv-events", Topic(None, None)),
    ],
)
def test_topics_name_the_pod_and_the_model(topic, expected):
    assert parse_topic(topic) == expected


def test_a_topic_that_is_not_utf8_is_refused():
    with pytest.raises(DecodeError, match="not UTF-8"):
        parse_topic(b"kv@\xff\xfe@m")
