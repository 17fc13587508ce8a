"""Weighted sampling over a changing set of keys in O(log n) per pick and per update.

A Fenwick (binary indexed) tree over integer weights: a key that cannot take a call has weight 0,
so a pick never scans the keys, whatever their number. Integer weights keep the sums exact under
millions of updates (floats would drift).
"""

from __future__ import annotations

import random

__all__ = ["WeightedSampler"]


class WeightedSampler:
    """Indices ``0..n-1`` with non-negative integer weights; draw one with probability w/total."""

    __slots__ = ("_size", "_top", "_total", "_tree", "_weights")

    def __init__(self) -> None:
        self._weights: list[int] = []
        self._tree: list[int] = [0]  # 1-based
        self._size = 0
        self._top = 1
        self._total = 0

    def __len__(self) -> int:
        return self._size

    @property
    def total(self) -> int:
        return self._total

    def weight(self, index: int) -> int:
        return self._weights[index]

    def append(self, weight: int) -> int:
        """Add an index with ``weight``; returns the index."""
        index = self._size
        self._size += 1
        self._weights.append(0)
        # The new node covers (i - lowbit(i), i]: its value is the sum of that range.
        i = self._size
        low = i & -i
        self._tree.append(self._prefix(i - 1) - self._prefix(i - low))
        while self._top * 2 <= self._size:
            self._top *= 2
        self.set(index, weight)
        return index

    def set(self, index: int, weight: int) -> None:
        if weight < 0:
            raise ValueError("weight must be >= 0")
        delta = weight - self._weights[index]
        if not delta:
            return
        self._weights[index] = weight
        self._total += delta
        i = index + 1
        tree = self._tree
        while i <= self._size:
            tree[i] += delta
            i += i & -i

    def _prefix(self, i: int) -> int:
        total = 0
        tree = self._tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def find(self, target: int) -> int:
        """The index whose cumulative range contains ``target`` (0 <= target < total)."""
        pos = 0
        step = self._top
        tree = self._tree
        while step:
            nxt = pos + step
            if nxt <= self._size and tree[nxt] <= target:
                pos = nxt
                target -= tree[nxt]
            step >>= 1
        return pos  # 0-based index of the (pos+1)-th node

    def draw(self, rng: random.Random) -> int | None:
        """One index drawn by weight, or ``None`` if every weight is 0."""
        total = self._total
        if total <= 0:
            return None
        return self.find(rng.randrange(total))
