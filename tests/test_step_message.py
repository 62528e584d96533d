"""A tensor-parallel step message survives packing into int64 tensors and back, field for field."""

import torch

from runtime.forward_batch import ForwardBatch
from runtime.step_message import HEADER, KVCopy, pack, payload_size, unpack


def _same(a: ForwardBatch, b: ForwardBatch) -> None:
    for name in ("token_ids", "positions", "slot_mapping", "block_tables", "logits_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int64 and torch.equal(x, y), name
    assert a.seqs == b.seqs and a.decode_rows == b.decode_rows


def _roundtrip(msg):
    header, payload = pack(msg)
    assert header.shape == (HEADER,) and header.dtype == payload.dtype == torch.int64
    assert payload.numel() == payload_size(header)
    return unpack(header, payload.clone())


def test_a_mixed_step_with_context_shift_moves():
    # a prefill chunk, two decodes and one prompt that wants no logits yet
    batch = ForwardBatch.build(
        [[5, 6, 7], [8], [9], [10, 11]], [0, 40, 3, 16], [[2, 3], [4, 5, 6], [7], [1, 8]], 16, [True, True, True, False]
    )
    moves = [((1, 2, 3), (10, 11, 12), -7), ((4,), (9,), 2), ((), (), 0)]
    got_moves, got = _roundtrip((moves, batch))
    assert got_moves == moves
    assert got is not None
    _same(got, batch)
    assert got.logits_indices.tolist() == [2, 3, 4]


def test_int8_decode_rows_travel():
    """--decode-dtype int8: the decode rows first, and how many they are."""
    batch = ForwardBatch.build([[5, 6, 7], [8], [9]], [0, 40, 3], [[2], [4, 5, 6], [7]], 16, decode=[False, True, True])
    assert batch.decode_rows == 2
    _, got = _roundtrip(([], batch))
    assert got is not None
    _same(got, batch)


def test_kv_copies():
    """Slot save / restore under tensor parallelism: which blocks to read or write."""
    assert _roundtrip(KVCopy(False, (3, 1, 2))) == KVCopy(False, (3, 1, 2))
    assert _roundtrip(KVCopy(True, (7,))) == KVCopy(True, (7,))
    assert _roundtrip(KVCopy(True, ())) == KVCopy(True, ())


def test_moves_only_empty_and_stop():
    assert _roundtrip(([((1, 2), (3, 4), 5)], None)) == ([((1, 2), (3, 4), 5)], None)
    assert _roundtrip(([], None)) == ([], None)
    assert _roundtrip(None) is None
    header, payload = pack(None)
    assert payload.numel() == 0 and payload_size(header) == 0


def test_a_long_prompt_chunk():
    n = 2048
    batch = ForwardBatch.build([list(range(n))], [0], [list(range(n // 16))], 16)
    moves, got = _roundtrip(([], batch))
    assert moves == [] and got is not None
    _same(got, batch)
