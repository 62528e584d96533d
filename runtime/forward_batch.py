"""A flat token batch: several sequences' new tokens in one forward, addressed into the paged KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SeqSlice:
    """One sequence's part of the batch (plain ints, read by the attention loop)."""

    start: int  # first row of this sequence in the flat batch
    n_new: int  # tokens computed this step
    n_ctx: int  # tokens in the cache once this step's are written (past + new)


@dataclass(frozen=True)
class ForwardBatch:
    """Inputs of one forward. T = total new tokens, B = sequences, M = max blocks per sequence."""

    token_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64, rotary positions
    slot_mapping: torch.Tensor  # (T,) int64, flat cache slot (block * block_size + offset)
    block_tables: torch.Tensor  # (B, M) int64, padded with 0
    seqs: tuple[SeqSlice, ...]
    logits_indices: torch.Tensor  # (N,) int64, rows whose logits are wanted
    # Rows [0, decode_rows) are decode rows (a generated token fed back): the linears give
    # them the decode kernels (--decode-dtype) and the other rows the prompt GEMM
    # (--gemm-dtype), so a row's numerics follow its kind, not the batch (layers/linear.py).
    decode_rows: int = 0
    # Index tensors derived once per step and shared by every layer (attention's decode
    # plan per window size); not part of the batch's identity.
    memo: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def to(self, device: torch.device | str) -> ForwardBatch:
        """This batch with its tensors on `device` (itself when they are there already)."""
        if self.token_ids.device == torch.device(device):
            return self
        return ForwardBatch(
            token_ids=self.token_ids.to(device),
            positions=self.positions.to(device),
            slot_mapping=self.slot_mapping.to(device),
            block_tables=self.block_tables.to(device),
            seqs=self.seqs,
            logits_indices=self.logits_indices.to(device),
            decode_rows=self.decode_rows,
        )

    @staticmethod
    def build(
        new_tokens: Sequence[Sequence[int]],
        num_computed: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        want_logits: Sequence[bool] | None = None,
        device: torch.device | str = "cpu",
        decode: Sequence[bool] | None = None,
    ) -> ForwardBatch:
        """Lay out sequence i's `new_tokens[i]` after its `num_computed[i]` cached tokens.

        Logits are taken at each sequence's last new token when `want_logits[i]`
        (a prefill chunk that is not the prompt's last wants none). The sequences with
        `decode[i]` (decode rows) come first in the rows and count in decode_rows; `seqs`
        and the logits rows keep the given order.
        """
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts: dict[int, int] = {}
        order = list(range(len(new_tokens)))
        if decode is not None:
            order.sort(key=lambda i: not decode[i])  # stable: decode sequences first, each group in order
        decode_rows = 0
        for i in order:
            toks, done, table = new_tokens[i], num_computed[i], block_tables[i]
            assert len(toks) > 0, "a scheduled sequence has at least one new token"
            assert len(table) * block_size >= done + len(toks), "block table too short"
            starts[i] = len(ids)
            for j, t in enumerate(toks):
                p = done + j
                ids.append(int(t))
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            if decode is not None and decode[i]:
                decode_rows = len(ids)
        seqs = [
            SeqSlice(starts[i], len(toks), done + len(toks))
            for i, (toks, done) in enumerate(zip(new_tokens, num_computed))
        ]
        out_rows = [
            s.start + s.n_new - 1 for i, s in enumerate(seqs) if want_logits is None or want_logits[i]
        ]
        width = max(len(t) for t in block_tables)
        tables = torch.zeros((len(block_tables), width), dtype=torch.int64)
        for i, table in enumerate(block_tables):
            tables[i, : len(table)] = torch.tensor(list(table), dtype=torch.int64)

        def as_tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.int64, device=device)

        return ForwardBatch(
            token_ids=as_tensor(ids),
            positions=as_tensor(pos),
            slot_mapping=as_tensor(slots),
            block_tables=tables.to(device),
            seqs=tuple(seqs),
            logits_indices=as_tensor(out_rows),
            decode_rows=decode_rows,
        )
