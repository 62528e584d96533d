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
