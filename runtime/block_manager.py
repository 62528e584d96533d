"""KV block allocation with reference counts and automatic prefix caching by chained block hashes; no torch.

A block is full when it holds `block_size` tokens. A full block that has been
computed is registered under the hash of (its parent block's hash, its token
ids), so the hash names the whole prefix up to and including that block. A
later request whose prompt starts with the same tokens takes those blocks with
one more reference instead of recomputing them (llama.cpp's cache_prompt, for
every slot at once).

Blocks with no references sit in one free list in least-recently-freed order.
A free block keeps its hash until it is handed out again, so the cache is the
free list itself: eviction is LRU and costs nothing until the space is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class NoFreeBlocks(Exception):
    """The pool cannot satisfy an allocation right now (the scheduler preempts)."""


def hash_block(parent: int | None, tokens: Sequence[int]) -> int:
    """The prefix hash of a full block: chained through the parent so equal blocks at different places differ."""
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Hands out block ids from the head of the free list; freed blocks go to its tail."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # Ordered by release time: the head is the least recently freed (evicted first).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> prefix hash, for full computed blocks
        self._block_of: dict[int, int] = {}  # prefix hash -> block
        self.hit_tokens = 0  # prompt tokens served from the cache, for the metrics
        self.query_tokens = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        """Blocks with no reference (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by running requests."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int, have: int) -> int:
        """New blocks a sequence holding `have` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - have)

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, one reference each; a cached block taken here forgets its hash."""
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            assert self._refs[b] == 0
            self._refs[b] = 1
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self._block_of[h]
            out.append(b)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; at zero it joins the free list's tail, keeping its hash.

        Tail blocks are released first so that they are evicted before the blocks
        they extend: a prefix outlives its continuations.
        """
        for b in reversed(blocks):
            assert self._refs[b] > 0, f"double free of block {b}"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def hashes(self, token_ids: Sequence[int], have: list[int]) -> list[int]:
        """Extend `have` (the hashes of the first len(have) blocks) to every full block of token_ids."""
        bs = self.block_size
        for i in range(len(have), len(token_ids) // bs):
            have.append(hash_block(have[-1] if have else None, token_ids[i * bs : (i + 1) * bs]))
        return have

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`; takes no references."""
        out: list[int] = []
        if not self.prefix_caching:
            return out
        for h in hashes:
            b = self._block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def num_free_after_taking(self, blocks: Sequence[int]) -> int:
        """Free blocks left once `blocks` (a prefix hit) are referenced: unreferenced ones leave the list."""
        return len(self._free) - sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """One more reference to each cached block (reviving those sitting in the free list)."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full, computed block. Two requests may compute the same prefix: the first wins."""
        if not self.prefix_caching or block_hash in self._block_of or block in self._hash_of:
            return
        assert self._refs[block] > 0
        self._hash_of[block] = block_hash
        self._block_of[block_hash] = block

    def uncache(self, blocks: Sequence[int]) -> None:
        """Forget these blocks' prefix hashes (their contents stay for whoever holds them)."""
        for b in blocks:
            h = self._hash_of.pop(b, None)
            if h is not None:
                del self._block_of[h]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents, just not their names)."""
        self._hash_of.clear()
        self._block_of.clear()
