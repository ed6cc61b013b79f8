"""The paged KV cache: fixed-size blocks of key/value slots, a reference-counted allocator and the
prefix cache.

Every sequence owns a *block table*: block ``i`` of the table holds its tokens ``[i·B, (i+1)·B)``.
A block filled with computed keys/values gets a hash of its tokens *and of the block before it*, so
equal hashes mean equal prefixes. When another request starts with the same tokens it reuses the
block (reference count + 1) instead of computing it again: a repeated system prompt is computed once.
Blocks nobody references stay cached, least recently used first in line to be recycled.

Block 0 is never handed out: padded rows of a CUDA-graph batch write their keys there.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from slmkit.errors import SlmkitError


def block_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """The prefix-cache key of a full block: its tokens and the hash of the block before it."""
    return hash((parent, tokens))


class BlockAllocator:
    """Hands out block ids, counts references and keeps full blocks findable by their prefix hash.

    Args:
        num_blocks: blocks in the cache, including the reserved block 0.
        prefix_caching: keep full blocks' hashes so later requests can reuse them.
    """

    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise SlmkitError(f"the KV cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free = collections.deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash, for full cached blocks
        self._block_of: dict[int, int] = {}  # hash -> block
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # refs 0, hashed: LRU first
        self.hits = 0  # blocks reused from the prefix cache
        self.queries = 0  # full blocks looked up

    @property
    def usable(self) -> int:
        """Blocks a single sequence could ever hold (all but the reserved one)."""
        return self.num_blocks - 1

    @property
    def available(self) -> int:
        """Blocks that an allocation can take now: free ones plus cached ones nobody references."""
        return len(self._free) + len(self._evictable)

    def allocate(self) -> int:
        """A block with one reference; recycles the least recently used cached block when none is free."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        else:
            raise SlmkitError("the KV cache is out of blocks")  # the scheduler checks `available` first
        self._refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """Drop one reference from each block; unreferenced blocks go free (or stay cached if hashed)."""
        for block in reversed(blocks):  # a sequence's tail is evicted before its shared head
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, hashes: list[int]) -> list[int]:
        """Reuse the longest run of cached blocks matching ``hashes`` (a prefix's block hashes, in order)."""
        if not self.prefix_caching:
            return []
        found = []
        for value in hashes:
            self.queries += 1
            block = self._block_of.get(value)
            if block is None:
                break
            if self._refs[block] == 0:
                self._evictable.pop(block, None)
            self._refs[block] += 1
            found.append(block)
            self.hits += 1
        return found

    def register(self, block: int, value: int) -> None:
        """Record that ``block`` now holds the full, computed block with hash ``value``."""
        if not self.prefix_caching or block in self._hash_of or value in self._block_of:
            return
        self._hash_of[block] = value
        self._block_of[value] = block

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (the blocks' contents are no longer trusted, e.g. new weights)."""
        for block in list(self._evictable):
            self._free.append(block)
        self._evictable.clear()
        self._hash_of.clear()
        self._block_of.clear()


@dataclasses.dataclass
class LayerCache:
    """Keys and values of one layer: (num_blocks, block_size, kv_heads, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor


def allocate_layer_caches(kv_heads: list[int], head_dim: int, num_blocks: int, block_size: int,
                          dtype: torch.dtype, device: torch.device) -> list[LayerCache]:
    """One :class:`LayerCache` per layer (layers may differ in key/value heads)."""
    caches = []
    for heads in kv_heads:
        shape = (num_blocks, block_size, heads, head_dim)
        # torch.zeros, not empty: a CUDA graph's padded rows read block 0, which must hold finite numbers
        caches.append(LayerCache(torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device)))
    return caches


def bytes_per_block(kv_heads: list[int], head_dim: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * block_size * head_dim * element * sum(kv_heads)
