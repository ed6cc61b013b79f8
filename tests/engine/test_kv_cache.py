"""The block allocator: reserved block 0, reference counts, prefix hashes and LRU recycling."""

import pytest

from slmkit.engine.kv_cache import BlockAllocator, block_hash
from slmkit.errors import SlmkitError


def test_block_zero_is_reserved_and_blocks_run_out_clearly():
    allocator = BlockAllocator(4)
    taken = [allocator.allocate() for _ in range(3)]
    assert sorted(taken) == [1, 2, 3] and allocator.available == 0
    with pytest.raises(SlmkitError, match="out of blocks"):
        allocator.allocate()
    allocator.release(taken)
    assert allocator.available == 3
    with pytest.raises(SlmkitError, match="at least 2"):
        BlockAllocator(1)


def test_cached_blocks_are_shared_by_reference_and_recycled_least_recent_first():
    allocator = BlockAllocator(4)
    a, b = allocator.allocate(), allocator.allocate()
    ha, hb = block_hash(None, (1, 2)), block_hash(block_hash(None, (1, 2)), (3, 4))
    allocator.register(a, ha)
    allocator.register(b, hb)
    assert allocator.lookup([ha, hb, 999]) == [a, b]  # shared: two references each now
    allocator.release([a, b])
    assert allocator.available == 1  # still referenced once
    allocator.release([a, b])  # tail first: b becomes evictable before a
    assert allocator.available == 3
    assert allocator.lookup([ha]) == [a]  # a cached block comes back without recomputation
    allocator.release([a])
    assert allocator.allocate() not in (a, b)  # the free block goes first
    assert allocator.allocate() == b  # then the least recently used cached one, which loses its hash
    assert allocator.lookup([ha, hb]) == [a]
    assert allocator.hits == 4 and allocator.queries == 6


def test_hash_depends_on_the_whole_prefix():
    assert block_hash(None, (5, 6)) != block_hash(block_hash(None, (1,)), (5, 6))


def test_disabled_prefix_cache_finds_nothing():
    allocator = BlockAllocator(4, prefix_caching=False)
    block = allocator.allocate()
    allocator.register(block, 7)
    assert allocator.lookup([7]) == []
    allocator.release([block])
    assert allocator.available == 3
