"""Episode storage and sequence sampling for training.

- `episodes`: the episode format (dict of arrays: images and/or states) and its atomically
  written `.npz` files.
- `stores`: where images live while the replay runs (chunked episode files, frame files or an
  LRU cache; none for state-only episodes). `chunks`: the chunked file format.
- `sampler`: which windows a batch holds, the sampling policy; a new scheme is a new function.
- `selectors`: selectors with settings (uniform, recency) mixed by fractions, built from the config.
- `replay`: `Replay`, the bookkeeping that ties them together (add, capacity, sample, state).
- `pipeline`: tf.data over a replay (TensorFlow is imported only there, when called).
"""
from dreamer_tf.data.episodes import (
    OBSERVATION_KEYS,
    OPTIONAL_KEYS,
    REQUIRED_KEYS,
    EpisodeError,
    check_episode,
    episode_length,
    episode_paths,
    load_episode,
    save_episode,
)
from dreamer_tf.data.pipeline import ReplayIterator
from dreamer_tf.data.replay import Replay

__all__ = [
    "Replay", "ReplayIterator", "EpisodeError", "check_episode", "save_episode", "load_episode",
    "episode_paths", "episode_length", "REQUIRED_KEYS", "OBSERVATION_KEYS", "OPTIONAL_KEYS",
]
