"""One tensor-parallel message (a step's KV moves and ForwardBatch, or a KV copy) packed into int64 tensors.

Rank 0 broadcasts each step to the other ranks. As pickled Python objects (torch's
broadcast_object_list) a decode step's message cost ~2 ms under gloo, most of it
pickling five small tensors; packed, it is two tensor broadcasts: a fixed header
that sizes the payload, then the payload.

Header (HEADER,): kind (0 stop, 1 moves only, 2 moves and a batch, 3 read KV blocks,
4 write KV blocks), T tokens, B sequences, M blocks per table, N logits rows, K moves,
the payload's length, the batch's decode_rows. A KV copy's payload is its block ids.
Payload: token_ids, positions, slot_mapping (T each), block_tables (B * M), the
sequences' (start, n_new, n_ctx) (B * 3), logits_indices (N), then per move its
length L, its delta, and its L source and L destination slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.forward_batch import ForwardBatch, SeqSlice

HEADER = 8
Move = tuple[tuple[int, ...], tuple[int, ...], int]


@dataclass(frozen=True)
class KVCopy:
    """Rank 0 asks every rank to read (slot save) or write (slot restore) these KV blocks."""

    write: bool
    blocks: tuple[int, ...]


Message = tuple[list[Move], ForwardBatch | None] | KVCopy | None

STOP, MOVES, STEP, READ_KV, WRITE_KV = 0, 1, 2, 3, 4


def pack(msg: Message) -> tuple[torch.Tensor, torch.Tensor]:
    """(header (HEADER,), payload) int64 CPU tensors for `msg` (None: the stop message)."""
    if msg is None:
        return torch.zeros(HEADER, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    if isinstance(msg, KVCopy):
        blocks = torch.tensor(msg.blocks, dtype=torch.int64)
        kind = WRITE_KV if msg.write else READ_KV
        return torch.tensor([kind, 0, 0, 0, 0, 0, blocks.numel(), 0], dtype=torch.int64), blocks
    moves, batch = msg
    flat: list[int] = []
    for src, dst, delta in moves:
        assert len(src) == len(dst), "a move pairs each source slot with a destination"
        flat += [len(src), delta, *src, *dst]
    tail = torch.tensor(flat, dtype=torch.int64)
    if batch is None:
        return torch.tensor([MOVES, 0, 0, 0, 0, len(moves), tail.numel(), 0], dtype=torch.int64), tail
    b = batch.to("cpu")
    seqs = torch.tensor([[s.start, s.n_new, s.n_ctx] for s in b.seqs], dtype=torch.int64).reshape(-1)
    parts = [b.token_ids, b.positions, b.slot_mapping, b.block_tables.reshape(-1), seqs, b.logits_indices, tail]
    payload = torch.cat([p.to(torch.int64) for p in parts])
    t, (nb, m), n = b.num_tokens, b.block_tables.shape, b.logits_indices.numel()
    header = [STEP, t, nb, m, n, len(moves), payload.numel(), b.decode_rows]
    return torch.tensor(header, dtype=torch.int64), payload


def payload_size(header: torch.Tensor) -> int:
    return int(header[6])


def unpack(header: torch.Tensor, payload: torch.Tensor) -> Message:
    """The message `pack` made of these tensors."""
    kind, t, nb, m, n, k, _, decode_rows = (int(v) for v in header.tolist())
    if kind == STOP:
        return None
    if kind in (READ_KV, WRITE_KV):
        return KVCopy(kind == WRITE_KV, tuple(payload.tolist()))
    at = 0

    def take(count: int) -> torch.Tensor:
        nonlocal at
        part = payload[at : at + count]
        at += count
        return part

    batch = None
    if kind == STEP:
        ids, pos, slots = take(t), take(t), take(t)
        tables = take(nb * m).reshape(nb, m)
        seqs = tuple(SeqSlice(*row) for row in take(nb * 3).reshape(nb, 3).tolist())
        batch = ForwardBatch(ids, pos, slots, tables, seqs, take(n), decode_rows)
    rest = take(payload.numel() - at).tolist()
    moves: list[Move] = []
    i = 0
    for _ in range(k):
        length, delta = rest[i], rest[i + 1]
        src, dst = rest[i + 2 : i + 2 + length], rest[i + 2 + length : i + 2 + 2 * length]
        moves.append((tuple(src), tuple(dst), delta))
        i += 2 + 2 * length
    return moves, batch
