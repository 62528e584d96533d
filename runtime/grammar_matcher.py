"""Per-request grammar state: follows the tokens a request generated and fills its row of the batch's token bitmask.

A bitmask row holds one bit per token id, 32 to an int32 word (bit t % 32 of
word t // 32), the layout llguidance writes into. `fill_bitmask`
asks each constrained row's matcher for its row (unconstrained rows allow
everything); `apply_bitmask` then masks the whole (rows, vocab) logits in one
pass (ops.apply_bitmask_), before any sampler runs, as llama.cpp applies a grammar first.
End-of-generation tokens are allowed exactly where the grammar may end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from runtime import ops

if TYPE_CHECKING:
    from runtime.grammar import _LarkGrammar

def _set_bit(row: torch.Tensor, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    if word < row.numel():
        value = 1 << bit
        row[word] |= value - (1 << 32) if bit == 31 else value  # int32: bit 31 is the sign


class GrammarMatcher:
    """Where one request is in its grammar; `sync` catches up on new output tokens, `fill` writes the allowed ones."""

    def __init__(self, eog_ids: frozenset[int]) -> None:
        self.eog_ids = eog_ids
        self.num_consumed = 0  # output tokens fed to the grammar so far
        self.failed = False  # a token the grammar refused (cannot happen when the mask was applied)

    def sync(self, output_ids: Sequence[int]) -> None:
        for t in output_ids[self.num_consumed :]:
            if t not in self.eog_ids and not self.failed:
                self.failed = not self._consume(int(t))
        self.num_consumed = len(output_ids)

    def is_done(self) -> bool:
        """The grammar is complete and allows nothing more than end-of-generation."""
        return self.failed or self._is_done()

    def fill(self, row: torch.Tensor) -> None:
        """row (words,) int32, zeroed: set the bits of the tokens allowed next."""
        if not self.is_done():
            self._fill(row)
            if not self._may_end(row):
                return
        for t in self.eog_ids:  # the grammar may end here: every end-of-generation token may end it
            _set_bit(row, t)

    def _consume(self, token_id: int) -> bool:
        raise NotImplementedError

    def _is_done(self) -> bool:
        raise NotImplementedError

    def _fill(self, row: torch.Tensor) -> None:
        raise NotImplementedError

    def _may_end(self, row: torch.Tensor) -> bool:
        raise NotImplementedError


class LarkMatcher(GrammarMatcher):
    """An llguidance LLMatcher (GBNF grammars converted to Lark, and JSON schemas)."""

    def __init__(self, grammar: _LarkGrammar) -> None:
        super().__init__(grammar.eog_ids)
        self.matcher: Any = grammar.template.deep_copy()
        self.words = (grammar.tokenizer.vocab_size + 31) // 32

    def _consume(self, token_id: int) -> bool:
        return bool(self.matcher.consume_token(token_id))

    def _is_done(self) -> bool:
        return bool(self.matcher.is_stopped())

    def _fill(self, row: torch.Tensor) -> None:
        assert row.numel() >= self.words and row.is_contiguous(), (row.shape, self.words)
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), 4 * self.words)

    def _may_end(self, row: torch.Tensor) -> bool:
        return bool(self.matcher.is_accepting())


def fill_bitmask(
    matchers: Sequence[GrammarMatcher | None], outputs: Sequence[Sequence[int]], vocab: int
) -> torch.Tensor | None:
    """(rows, words) int32 on the CPU: each constrained row's allowed tokens, -1 (all) elsewhere; None if no row is constrained."""
    if all(m is None for m in matchers):
        return None
    words = (vocab + 31) // 32
    mask = torch.full((len(matchers), words), -1, dtype=torch.int32)
    for i, (m, out) in enumerate(zip(matchers, outputs)):
        if m is not None:
            m.sync(out)
            mask[i].zero_()
            m.fill(mask[i])
    return mask


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """logits (rows, vocab) float32 with every token whose bit is 0 set to -inf (a copy unless in_place)."""
    x = logits if in_place else logits.clone()
    ops.apply_bitmask_(x, mask)
    return x
