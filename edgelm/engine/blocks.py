"""KV block ownership with prefix caching.

The KV cache is a pool of fixed-size blocks (`block_size` tokens each). A sequence
holds an ordered list of block ids, its block table. A *full* block is also keyed by
the hash of its tokens chained with the hash of every block before it, so two
requests that start with the same tokens — Home Assistant sends the same long system
prompt each time — can share the blocks that hold them instead of recomputing.

A block is in exactly one state:
  - used:   one or more sequences reference it (`ref > 0`);
  - cached: no sequence references it but it holds a hashed prefix; it is reusable
            by a later request with that prefix, and evicted least-recently-used
            first when a fresh block is needed;
  - free:   holds nothing of value.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class OutOfBlocks(Exception):
    """No free or evictable block is left."""


def chain_hashes(tokens: Sequence[int], block_size: int, n_blocks: int | None = None) -> list[int]:
    """Hashes of the first `n_blocks` full blocks of `tokens`, each covering its own
    tokens and (through the previous hash) everything before it."""
    n_full = len(tokens) // block_size
    if n_blocks is not None:
        n_full = min(n_full, n_blocks)
    out: list[int] = []
    prev = 0
    for i in range(n_full):
        prev = hash((prev, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(prev)
    return out


class BlockManager:
    def __init__(self, n_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        if n_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.n_blocks = n_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref = [0] * n_blocks
        self._free: list[int] = list(range(n_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # zero-ref hashed blocks, LRU first
        self._by_hash: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self.hits = 0  # blocks served from the cache (for metrics)
        self.queries = 0  # full blocks looked up

    # -- counts ------------------------------------------------------------------
    @property
    def n_free(self) -> int:
        """Blocks a new allocation can take (free + evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def n_used(self) -> int:
        return self.n_blocks - len(self._free) - len(self._cached)

    @property
    def n_cached(self) -> int:
        """Blocks holding a reusable prefix that no sequence is using."""
        return len(self._cached)

    # -- allocation --------------------------------------------------------------
    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._cached:
            b, _ = self._cached.popitem(last=False)
            h = self._hash_of.pop(b)
            del self._by_hash[h]
        else:
            raise OutOfBlocks()
        self.ref[b] = 1
        return b

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced hashed blocks stay cached."""
        # Release in reverse so the tail of a prefix is evicted before its head.
        for b in reversed(blocks):
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released more often than taken"
            if self.ref[b] == 0:
                if b in self._hash_of:
                    self._cached[b] = None
                    self._cached.move_to_end(b)
                else:
                    self._free.append(b)

    # -- prefix cache ------------------------------------------------------------
    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the longest cached run of `hashes` from the start;
        returns its blocks."""
        out: list[int] = []
        if not self.enable_prefix_cache:
            return out
        for h in hashes:
            self.queries += 1
            b = self._by_hash.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self._cached[b]
            self.ref[b] += 1
            out.append(b)
        self.hits += len(out)
        return out

    def pin(self, blocks: Sequence[int]) -> None:
        """Take a reference on blocks that hold something (used or cached), so that no
        allocation evicts them while they are read; `release` drops it."""
        for b in blocks:
            assert self.ref[b] > 0 or b in self._cached, f"block {b} holds nothing to pin"
            if self.ref[b] == 0:
                del self._cached[b]
            self.ref[b] += 1

    def registered_hash(self, block: int) -> int | None:
        """The hash `block` is registered under (None: it holds no cached prefix)."""
        return self._hash_of.get(block)

    def is_cached(self, h: int) -> bool:
        return self.enable_prefix_cache and h in self._by_hash

    def register(self, block: int, h: int) -> None:
        """Record that `block` (full, computed) holds the prefix with hash `h`. When
        another block already holds it, this one stays private and is freed on
        release."""
        if not self.enable_prefix_cache or h in self._by_hash or block in self._hash_of:
            return
        self._by_hash[h] = block
        self._hash_of[block] = h

    def clear_cache(self) -> None:
        """Forget every cached prefix; blocks in use keep their contents but are
        freed, not cached, when released."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._by_hash.clear()
        self._hash_of.clear()
