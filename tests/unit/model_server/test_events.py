import msgpack
import pytest

from epp_model_server.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_event,
    encode_batch,
    encode_event,
)

STORED = BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=list(range(32)), block_size=16,
                     lora_id=None, medium="GPU")
STORED_LORA = BlockStored(block_hashes=[(1 << 64) - 1], parent_block_hash=7, token_ids=list(range(16)),
                          block_size=16, lora_id=3, medium="GPU", lora_name="ad", extra_keys=[("salt",)])
REMOVED = BlockRemoved(block_hashes=[2], medium="GPU")


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (STORED, {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                  "token_ids": list(range(32)), "block_size": 16, "lora_id": None, "medium": "GPU"}),
        (STORED_LORA, {"type": "BlockStored", "block_hashes": [(1 << 64) - 1], "parent_block_hash": 7,
                       "token_ids": list(range(16)), "block_size": 16, "lora_id": 3, "medium": "GPU",
                       "lora_name": "ad", "extra_keys": [("salt",)]}),
        (REMOVED, {"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"}),
        (AllBlocksCleared(), {"type": "AllBlocksCleared"}),
    ],
)
def test_map_format_tags_by_type_and_omits_default_fields(event, expected):
    assert encode_event(event, "map") == expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (STORED, ["BlockStored", [1, 2], None, list(range(32)), 16, None, "GPU"]),
        (STORED_LORA, ["BlockStored", [(1 << 64) - 1], 7, list(range(16)), 16, 3, "GPU", "ad", [("salt",)]]),
        (BlockStored([5], 4, [0] * 16, 16, None, "GPU", None, [None]),
         ["BlockStored", [5], 4, [0] * 16, 16, None, "GPU", None, [None]]),
        (REMOVED, ["BlockRemoved", [2], "GPU"]),
        (AllBlocksCleared(), ["AllBlocksCleared"]),
    ],
)
def test_array_format_is_tag_then_fields_with_trailing_defaults_dropped(event, expected):
    assert encode_event(event, "array") == expected


@pytest.mark.parametrize("fmt", ["map", "array"])
def test_batch_is_a_three_element_array_plain_msgpack_can_read(fmt):
    payload = encode_batch(1700000000.5, [STORED, REMOVED], fmt, data_parallel_rank=0)
    ts, events, rank = msgpack.unpackb(payload, raw=False)
    assert (ts, rank) == (1700000000.5, 0)
    assert [decode_event(e) for e in events] == [STORED, REMOVED]


def test_full_64_bit_hashes_survive_msgpack():
    payload = encode_batch(0.0, [STORED_LORA], "map")
    assert msgpack.unpackb(payload)[1][0]["block_hashes"] == [(1 << 64) - 1]


def test_unknown_format_and_event_type_are_refused():
    with pytest.raises(ValueError, match="map, array"):
        encode_event(REMOVED, "json")
    with pytest.raises(ValueError, match="unknown KV event type"):
        decode_event({"type": "Mystery"})
