"""Free lists over the cache pools: state slots (one owner each) and latent blocks (reference counted).

Slot 0 and block 0 are the padding slot and block of :class:`~kimi_linear.cache.CachePool` and are never handed out.
A block is shared when a prefix-cache entry and one or more sequences hold the same latents; it returns to the free
list when its last holder lets go. ``on_free`` (tests) sees everything that returns, e.g. to fill it with NaN and
prove that nothing reads freed memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class SlotAllocator:
    def __init__(self, num_slots: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, 0, -1))  # pop() hands out the lowest slot first
        self._on_free = on_free

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, slot: int) -> None:
        if not 0 < slot < self.num_slots or slot in self._free:
            raise RuntimeError(f"slot {slot} freed twice or never allocated")
        self._free.append(slot)
        if self._on_free:
            self._on_free([slot])


class BlockAllocator:
    def __init__(self, num_blocks: int, on_free: Callable[[list[int]], None] | None = None) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))
        self._on_free = on_free

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh blocks (one reference each), or None when fewer than n are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each block."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"block {b} shared while free")
            self._refs[b] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each block; blocks nobody holds return to the free list."""
        freed = []
        for b in blocks:
            if self._refs[b] <= 0:
                raise RuntimeError(f"block {b} released more often than held")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                freed.append(b)
        self._free.extend(freed)
        if freed and self._on_free:
            self._on_free(freed)

    def holders(self, block: int) -> int:
        return self._refs[block]
