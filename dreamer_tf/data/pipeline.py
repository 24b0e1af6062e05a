"""tf.data over a replay: an endless dataset of sampled batches, and an iterator with exact state.

TensorFlow is imported inside the functions only: env workers import `dreamer_tf.data` without it.

A prefetching `dataset` samples ahead, so ``replay.get_state()`` then includes the batches in
flight (about ``prefetch``, plus the one being produced). For exact resume use
`ReplayIterator` (``replay.iterator()``): its ``get_state()`` returns the state right after the
last batch that ``next()`` handed out, and its ``close()`` rewinds the replay's generator to that
point (so the prefetched, never-seen batches are drawn again later). A batch prefetched before
an ``add`` was drawn without the new episode, and when that happens depends on thread timing;
so for a run that is bit-identical to its resumed self, open an iterator per training phase and
``close()`` it before adding episodes / checkpointing: ``replay.get_state()`` is then exact and
every batch sees exactly the episodes added before its phase.
"""
from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from dreamer_tf.data.replay import Replay

__all__ = ["dataset", "ReplayIterator"]


def output_signature(replay: "Replay", batch_size: int, length: int) -> dict:
    """`tf.TensorSpec` of every key of a [batch_size, length] batch."""
    import tensorflow as tf

    if not replay.signature:
        raise ValueError("the replay is empty: add an episode before building a dataset "
                         "(its keys and shapes define the dataset's)")
    return {k: tf.TensorSpec((batch_size, length) + shape, tf.as_dtype(dtype))
            for k, (shape, dtype) in replay.signature.items()}


def dataset(replay: "Replay", batch_size: int, length: int, prefetch: int = 2,
            on_batch: Callable[[dict], None] | None = None, stopped: threading.Event | None = None):
    """An endless `tf.data.Dataset` of `replay.sample(batch_size, length)` batches, static shapes.

    Episodes added later are sampled by batches generated after the `add`. `on_batch` gets the
    replay state right after each batch is sampled; the generator ends once `stopped` is set.
    """
    import tensorflow as tf

    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < -1:
        raise ValueError(f"dataset prefetch must be an int >= 0 (or -1 = AUTOTUNE), got {prefetch!r}")
    signature = output_signature(replay, batch_size, length)
    replay.windows(length)  # a clear error now instead of a TF one on the first batch

    def generator():
        while True:
            with replay._lock:
                if stopped is not None and stopped.is_set():
                    return
                batch = replay.sample(batch_size, length)
                if on_batch is not None:
                    on_batch(replay.get_state())
            yield batch

    data = tf.data.Dataset.from_generator(generator, output_signature=signature)
    # tf.data.AUTOTUNE is -1.
    return data.prefetch(tf.data.AUTOTUNE if prefetch == -1 else prefetch) if prefetch else data


class ReplayIterator:
    """Iterates a prefetching replay dataset while tracking the state after each consumed batch.

    `get_state()` is the replay state right after the last batch returned by `next()`: restoring
    it continues with exactly the next batch. `close()` stops the generator and rewinds the
    replay's generator to that state, so prefetched but unconsumed batches are not lost.
    """

    def __init__(self, replay: "Replay", batch_size: int, length: int, prefetch: int = 2):
        self._replay = replay
        self._stopped = threading.Event()
        self._produced: collections.deque[dict] = collections.deque()
        self._state = replay.get_state()
        self._iterator = iter(dataset(replay, batch_size, length, prefetch,
                                      self._produced.append, self._stopped))

    def __iter__(self) -> "ReplayIterator":
        return self

    def __next__(self) -> dict:
        if self._stopped.is_set():
            raise StopIteration
        batch = next(self._iterator)
        # tf.data keeps order, so the oldest recorded state belongs to this batch.
        self._state = self._produced.popleft()
        return batch

    def get_state(self) -> dict[str, Any]:
        """Replay state right after the last consumed batch (JSON-serialisable)."""
        return self._state

    def close(self) -> None:
        """Stop producing batches and rewind the replay's generator to the consumed point."""
        with self._replay._lock:
            self._stopped.set()
            self._replay.set_state(self._state)
        self._produced.clear()

    def __enter__(self) -> "ReplayIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
