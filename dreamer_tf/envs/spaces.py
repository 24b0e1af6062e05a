"""Minimal observation/action space classes (no gym dependency).

`Box` describes a bounded array, `Discrete(n)` a choice among n actions that the environments
take as one-hot vectors, which is why its `.shape` is `(n,)`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["Box", "Discrete"]


class Box:
    """An array of `shape` and `dtype` with elementwise bounds `low` <= x <= `high`."""

    def __init__(self, low: Any, high: Any, shape: Sequence[int], dtype: Any = np.float32):
        self.shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in self.shape):
            raise ValueError(f"Box shape must be non-negative, got {self.shape}")
        self.dtype = np.dtype(dtype)
        self.low = np.broadcast_to(np.asarray(low, self.dtype), self.shape).copy()
        self.high = np.broadcast_to(np.asarray(high, self.dtype), self.shape).copy()
        if np.any(self.low > self.high):
            raise ValueError(f"Box low must be <= high, got low={self.low} high={self.high}")

    def contains(self, x: Any) -> bool:
        x = np.asarray(x)
        return x.shape == self.shape and bool(np.all(x >= self.low) and np.all(x <= self.high))

    def sample(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """Uniform sample (finite bounds only); integer dtypes sample inclusive bounds."""
        rng = rng if rng is not None else np.random.default_rng()
        if np.issubdtype(self.dtype, np.integer):
            return rng.integers(self.low, self.high, endpoint=True, size=self.shape).astype(self.dtype)
        return rng.uniform(self.low, self.high, size=self.shape).astype(self.dtype)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Box) and self.shape == other.shape and self.dtype == other.dtype
                and np.array_equal(self.low, other.low) and np.array_equal(self.high, other.high))

    def __repr__(self) -> str:
        lo, hi = self.low.min() if self.low.size else 0, self.high.max() if self.high.size else 0
        return f"Box({lo}, {hi}, {self.shape}, {self.dtype.name})"


class Discrete:
    """One of `n` actions; environments take it as a one-hot float vector of shape `(n,)`."""

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"Discrete needs a positive integer n, got {n!r}")
        self.n = int(n)
        self.shape = (self.n,)
        self.dtype = np.dtype(np.float32)

    def contains(self, x: Any) -> bool:
        x = np.asarray(x)
        return x.shape == self.shape and bool(np.all((x == 0) | (x == 1))) and x.sum() == 1

    def sample(self, rng: np.random.Generator | None = None) -> np.ndarray:
        """A uniformly chosen one-hot vector."""
        rng = rng if rng is not None else np.random.default_rng()
        onehot = np.zeros(self.n, np.float32)
        onehot[rng.integers(self.n)] = 1.0
        return onehot

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Discrete) and self.n == other.n

    def __repr__(self) -> str:
        return f"Discrete({self.n})"
