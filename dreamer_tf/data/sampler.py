"""How training sequences are drawn from the replay: the sampling policy, nothing else.

A batch is B windows of L consecutive entries. A sampler decides which windows; the replay then
reads them. A sampler is a function

    sampler(windows: Windows, batch_size: int, rng: np.random.Generator)
        -> tuple[np.ndarray, np.ndarray]   # (episodes, starts), each int64 [batch_size]

What it gets:
  windows: the valid windows of length ``windows.length`` over the replay's sampleable episodes
    (`Windows`): ``lengths`` (entries T+1 of every episode, oldest first), ``eligible``
    (positions of the episodes with at least ``length`` entries), ``counts`` and ``cumulative``
    (windows per eligible episode and their running sum). It always holds at least one window.
    The replay caches it per length until an episode is added or dropped: treat it as read-only.
  batch_size: B.
  rng: the replay's generator; `Replay.get_state`/`set_state` save and restore it.

What it returns: ``episodes[b]``, a position in ``windows.lengths`` (0 = oldest sampleable
episode), and ``starts[b]``, the first entry of window b, with
``0 <= starts[b] <= lengths[episodes[b]] - length``. The replay checks this (`check_draw`).

Contract: all randomness comes from ``rng`` (no global ``np.random``, no clock), and a sampler
sees only lengths, never data. So all random draws of a batch happen before any data is read,
the stream does not depend on the image store, and a restored replay state reproduces the
batches exactly. Changing what a sampler draws (or in which order) changes every seeded run.

A new sampling scheme is a new function: pass it as ``Replay(sampler=fn)``, or register it
under a name (``@register("name")``, or ``SAMPLERS["name"] = fn``) and pass the name. A scheme
with settings (an exponent, a fraction) is a selector class in `selectors`, made from the config
there; its instances are samplers of this same protocol.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["Windows", "Sampler", "uniform_windows", "uniform_episodes", "reference_windows", "SAMPLERS", "register",
           "get_sampler", "check_draw"]


@dataclass(frozen=True)
class Windows:
    """The windows of `length` consecutive entries over episodes of `lengths` entries."""

    lengths: np.ndarray  # int64 [N]: entries (T+1) per episode, oldest first
    length: int
    eligible: np.ndarray  # int64 [M]: positions of the episodes with >= `length` entries
    counts: np.ndarray  # int64 [M]: windows per eligible episode, lengths[eligible] - length + 1
    cumulative: np.ndarray  # int64 [M]: np.cumsum(counts)

    @classmethod
    def of(cls, lengths, length: int) -> "Windows":
        lengths = np.array(lengths, np.int64)
        counts = lengths - length + 1
        eligible = np.flatnonzero(counts > 0)
        arrays = lengths, eligible, counts[eligible], np.cumsum(counts[eligible])
        for array in arrays:
            array.flags.writeable = False  # shared by every batch until the episodes change
        return cls(arrays[0], int(length), *arrays[1:])

    @property
    def total(self) -> int:
        """Number of valid windows."""
        return int(self.cumulative[-1]) if len(self.cumulative) else 0

    def at(self, flat: np.ndarray) -> "tuple[np.ndarray, np.ndarray]":
        """(episodes, starts) of flat window indices: windows numbered oldest episode first, then by
        start, 0 to ``total - 1`` (so the highest number is the newest window)."""
        which = np.searchsorted(self.cumulative, flat, side="right")
        before = np.concatenate([[0], self.cumulative])[which]
        return self.eligible[which], flat - before

    def check(self) -> "Windows":
        """`self`, or `ValueError` if there is no window (no episode is long enough)."""
        if not self.total:
            raise ValueError(
                f"no episode is long enough to sample sequences of length {self.length}: the replay "
                f"holds {len(self.lengths)} episode(s), the longest has {max(self.lengths, default=0)} "
                f"entries")
        return self


Sampler = Callable[[Windows, int, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


def uniform_windows(windows: Windows, batch_size: int, rng: np.random.Generator):
    """Every valid (episode, start) window equally likely: long episodes are drawn more often."""
    return windows.at(rng.integers(0, windows.cumulative[-1], size=batch_size))


def uniform_episodes(windows: Windows, batch_size: int, rng: np.random.Generator):
    """An eligible episode uniformly, then a start uniformly within it (`balance=True`)."""
    which = rng.integers(0, len(windows.eligible), size=batch_size)
    return windows.eligible[which], rng.integers(0, windows.counts[which])


def reference_windows(windows: Windows, batch_size: int, rng: np.random.Generator):
    """The TF2 reference implementation's draw: an episode with more than `length` entries
    uniformly, then a start uniformly in [0, entries - length - 1]. So its last window (and with it
    the final, possibly terminal, step) is never drawn, and episodes of exactly `length` entries
    are skipped."""
    longer = windows.eligible[windows.counts > 1]
    if not len(longer):
        raise ValueError(f"the reference sampler needs an episode longer than {windows.length} entries; "
                         f"the longest has {max(windows.lengths, default=0)}")
    episodes = longer[rng.integers(0, len(longer), size=batch_size)]
    return episodes, rng.integers(0, windows.lengths[episodes] - windows.length)


SAMPLERS: dict[str, Sampler] = {"uniform": uniform_windows, "episode": uniform_episodes,
                                "reference": reference_windows}


def register(name: str) -> Callable[[Sampler], Sampler]:
    """Decorator: make a sampler available as ``Replay(sampler=name)``."""
    def add(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        return fn
    return add


def get_sampler(sampler: str | Sampler) -> Sampler:
    """The sampler registered under `sampler`, or `sampler` itself if it is a function."""
    if callable(sampler):
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; registered: {sorted(SAMPLERS)}")
    return SAMPLERS[sampler]


def check_draw(windows: Windows, batch_size: int, episodes, starts) -> tuple[np.ndarray, np.ndarray]:
    """`(episodes, starts)` as int64 arrays; `ValueError` unless they are B valid windows."""
    episodes, starts = np.asarray(episodes), np.asarray(starts)
    if episodes.shape != (batch_size,) or starts.shape != (batch_size,):
        raise ValueError(f"a sampler must return two arrays of shape ({batch_size},), "
                         f"got {episodes.shape} and {starts.shape}")
    if not (np.issubdtype(episodes.dtype, np.integer) and np.issubdtype(starts.dtype, np.integer)):
        raise ValueError(f"a sampler must return integer arrays, got {episodes.dtype} and {starts.dtype}")
    n = len(windows.lengths)
    bad = (episodes < 0) | (episodes >= n)
    if not bad.any():
        bad = (starts < 0) | (starts > windows.lengths[episodes] - windows.length)
    if bad.any():
        b = int(np.argmax(bad))
        raise ValueError(f"sampler returned an invalid window: episode {episodes[b]} start {starts[b]} "
                         f"(length {windows.length}, {n} episodes with {windows.lengths.tolist()[:20]} "
                         f"entries)")
    return episodes.astype(np.int64, copy=False), starts.astype(np.int64, copy=False)
