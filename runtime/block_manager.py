"""KV block allocation: a free list and reference counts over fixed-size blocks; no torch."""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(Exception):
    """The pool cannot satisfy an allocation right now (the scheduler preempts)."""


class BlockManager:
    """Hands out block ids in FIFO order of release, so recently freed blocks are reused last."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """New blocks a sequence holding `have` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            assert self._refs[b] == 0
            self._refs[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; a block returns to the free list at zero."""
        for b in reversed(blocks):  # tail blocks first: they are the least shareable
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]
