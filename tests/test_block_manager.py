"""Exact block ids, reference counts and free order of the block manager."""

import pytest

from runtime.block_manager import BlockManager, NoFreeBlocks


def test_allocates_in_order_and_reuses_freed_blocks_last():
    bm = BlockManager(num_blocks=6, block_size=4)
    a = bm.allocate(2)
    b = bm.allocate(3)
    assert (a, b) == ([0, 1], [2, 3, 4])
    assert bm.num_free == 1
    bm.free(a)  # tail first: 1 then 0 go back
    assert [bm.ref_count(i) for i in range(6)] == [0, 0, 1, 1, 1, 0]
    assert bm.allocate(3) == [5, 1, 0]
    assert bm.num_free == 0


def test_exhaustion_and_double_free():
    bm = BlockManager(num_blocks=2, block_size=4)
    blocks = bm.allocate(2)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(1)
    bm.free(blocks)
    with pytest.raises(AssertionError):
        bm.free(blocks)


@pytest.mark.parametrize("tokens,have,need", [(0, 0, 0), (1, 0, 1), (4, 0, 1), (5, 0, 2), (5, 2, 0), (9, 2, 1)])
def test_blocks_needed(tokens, have, need):
    assert BlockManager(8, 4).blocks_needed(tokens, have) == need


def test_hashes_chain_through_the_parent():
    bm = BlockManager(8, 2)
    hs = bm.hashes([1, 2, 3, 4, 5], [])
    assert len(hs) == 2  # the fifth token is in a partial block, which has no hash
    assert hs[0] != bm.hashes([3, 4], [])[0]  # same tokens, different prefix
    assert bm.hashes([1, 2, 3, 4, 5, 6], hs[:1]) == bm.hashes([1, 2, 3, 4, 5, 6], [])


def test_cached_blocks_are_shared_revived_and_forgotten_when_reused():
    bm = BlockManager(num_blocks=4, block_size=2)
    hs = bm.hashes([1, 2, 3, 4], [])
    a = bm.allocate(2)
    for b, h in zip(a, hs):
        bm.cache(b, h)
    assert bm.match_prefix(hs) == [0, 1] and bm.num_cached == 2
    bm.take([0, 1])  # a second sequence shares both
    assert [bm.ref_count(b) for b in range(4)] == [2, 2, 0, 0]
    bm.free(a)
    bm.free(a)
    assert bm.num_free == 4 and bm.match_prefix(hs) == [0, 1]  # free, still cached
    assert bm.num_free_after_taking([0, 1]) == 2
    bm.take([0])  # revived from the free list
    assert bm.ref_count(0) == 1 and bm.num_free == 3
    assert bm.allocate(3) == [2, 3, 1]  # block 1 was the least recently freed cached block
    assert bm.match_prefix(hs) == [0] and bm.num_cached == 1
    bm.cache(1, hs[1])  # re-registering a block under a new name is fine
    assert bm.match_prefix(hs) == [0, 1]


def test_first_registration_wins_and_caching_can_be_off():
    bm = BlockManager(4, 2)
    h = bm.hashes([1, 2], [])[0]
    a, b = bm.allocate(2)
    bm.cache(a, h)
    bm.cache(b, h)  # the same prefix computed twice concurrently
    assert bm.match_prefix([h]) == [a] and bm.num_cached == 1
    off = BlockManager(4, 2, prefix_caching=False)
    (c,) = off.allocate(1)
    off.cache(c, h)
    assert off.match_prefix([h]) == [] and off.num_cached == 0
