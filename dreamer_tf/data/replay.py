"""The replay: episodes of one directory, loaded on start, bounded in memory, sampled as sequences.

The pieces live beside it: the file format in `episodes`, the image stores in `stores`, how
windows are drawn in `sampler`, tf.data in `pipeline`. All episodes of a replay have the same
keys and per-step shapes (its signature); episodes without ``image`` (states only) work the same
way, with no image store (`stores.NullStore`) and no ``image`` key in the batches.

Resume guarantee. ``get_state()`` returns a JSON-serialisable dict. Restoring it with
``set_state`` into a replay holding the same episodes (same files, same capacity) reproduces the
identical sequence of batches that ``sample`` would have returned, given the same calls
(batch size, length). The state records the newest sampleable episode file; ``set_state`` warns
if the replay's newest differs (e.g. episodes saved after the checkpoint), since the stream then
differs. Prefetching pipelines sample ahead: see `pipeline` for the exact resume point.

Damaged files. A file that cannot be read as an episode (truncated, empty, a damaged zip, image
data that fails its CRC or does not decode) is that file's problem, not the run's: it is moved to
``quarantine/`` in the replay's directory (out of what the replay loads), once, and named in one
line on stderr; the replay goes on without it. Found when the replay opens its directory, the
sample stream of the healthy episodes is what it would be without the file; a file found damaged
while sampling (``cache`` decodes only then) is dropped and the batch drawn again without it.
A file of another kind of episode (other keys or shapes) is not damaged: it is skipped, in place.
"""
from __future__ import annotations

import collections
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dreamer_tf.data import pipeline
from dreamer_tf.data.episodes import (
    SPEC,
    EpisodeError,
    check_episode,
    check_signature,
    episode_name,
    episode_paths,
    episode_signature,
    load_episode,
    load_parts,
    next_index,
    remove_temp_files,
)
from dreamer_tf.data.sampler import (
    Sampler,
    Windows,
    check_draw,
    get_sampler,
    uniform_episodes,
)
from dreamer_tf.data.stores import EpisodeEntry, NullStore, episode_writer, store_factory
from dreamer_tf.utils import fsync_dir

__all__ = ["Replay"]

_STATE_VERSION = 1
QUARANTINE = "quarantine"  # damaged episode files go to DIRECTORY/quarantine/


def say(message: str) -> None:
    """One line on stderr: what the replay did about a file (the run goes on)."""
    print(" ".join(message.split()), file=sys.stderr, flush=True)


def quarantine(directory: Path, path: Path, error: Exception) -> None:
    """Move the damaged episode file `path` to `directory`/quarantine/ (never over an earlier one
    of that name) and say so in one line; if it cannot be moved, it is only skipped."""
    folder = directory / QUARANTINE
    try:
        folder.mkdir(exist_ok=True)
        target, n = folder / path.name, 1
        while target.exists():
            target, n = folder / f"{path.name}.{n}", n + 1
        os.replace(path, target)
        fsync_dir(directory)
        done = f"moved it to {target}"
    except OSError as e:
        done = f"skipping it (it could not be moved to {folder}: {e.strerror or e})"
    what = str(error) if str(path) in str(error) else f"episode file {path}: {error}"
    say(f"replay: {what}; {done}")


def _fitting(steps: list[int], capacity: int, action_repeat: int) -> int:
    """How many of the newest episodes (of `steps` transitions, oldest first) fit `capacity` env
    steps (0 = unlimited): the most that do, but always at least one."""
    if not capacity:
        return len(steps)
    keep, total = 0, 0
    for n in reversed(steps):
        total += n
        if keep and total * action_repeat > capacity:
            break
        keep += 1
    return keep


def _check_ints(**values: tuple[Any, int]) -> None:
    """`ValueError` unless every value (name=(value, lowest allowed)) is an int >= its lowest."""
    for name, (value, low) in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"Replay {name} must be an int >= {low}, got {value!r}")


def _rng_from_state(state: Any) -> np.random.Generator:
    """The generator of a `Replay.get_state()` dict; `ValueError` if it is not one."""
    if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION or "rng" not in state:
        raise ValueError(f"not a Replay state (version {_STATE_VERSION}): {state!r:.200}")
    rng = np.random.Generator(np.random.PCG64())
    try:
        rng.bit_generator.state = dict(state["rng"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"Replay state has an invalid 'rng' entry: {e}") from None
    return rng


def _gather(entries: Sequence[EpisodeEntry], store: Any, signature: Mapping[str, tuple[tuple[int, ...], np.dtype]],
            episodes: np.ndarray, starts: np.ndarray,
            length: int) -> tuple[dict[str, np.ndarray], tuple[EpisodeEntry, Exception] | None]:
    """The batch of windows (`entries[episodes[b]]` from `starts[b]`, `length` entries): dict of
    [B, L, ...], and the first failed image read as (episode, error) (`store.read_many`), else None."""
    batch = {k: np.empty((len(episodes), length) + shape, dtype) for k, (shape, dtype) in signature.items()}
    # Read in episode order so one decode serves all windows of an episode (cache store).
    order = np.argsort(episodes, kind="stable")
    if "image" in batch:  # else the replay has no image store (`NullStore`)
        failed = store.read_many([(entries[episodes[b]], int(starts[b]), batch["image"][b]) for b in order])
        if failed is not None:
            return batch, failed
    for b in order:
        episode, start = entries[episodes[b]], int(starts[b])
        for key, value in episode.small.items():
            batch[key][b] = value[start:start + length]
    return batch, None


class Replay:
    """Episodes of one directory: add, reload on start, bounded memory, sequence sampling.

    Args:
      directory: where episode `.npz` files live (created if missing; existing ones are loaded).
      capacity: env steps (transitions x `action_repeat`) kept for sampling; 0 = unlimited. When
        exceeded the oldest episodes are dropped from sampling (the newest is always kept).
      cache: frames of decoded images kept in RAM by the `"cache"` store.
      seed: seed of the sampling generator (PCG64).
      balance: sample episodes uniformly (then a start) instead of windows uniformly; the same
        as `sampler="episode"`.
      store: `"chunks"` (each episode once, images in compressed chunks, default), `"frames"`
        (uncompressed frame files beside the `.npz`) or `"cache"` (LRU of decoded images); see
        `stores`.
      delete: also delete the files of episodes dropped by `capacity`.
      action_repeat: env steps per transition, to count env steps and apply `capacity`.
      frames_dir: where the `"frames"` store keeps its files (default `directory/frames`); the
        `"chunks"` store deletes an older run's frame files there.
      sampler: a name in `sampler.SAMPLERS` ("uniform": windows, "episode": episodes) or a
        sampler function (see `dreamer_tf.data.sampler`).
    """

    def __init__(self, directory: str | os.PathLike, *, capacity: int = 0, cache: int = 200_000,
                 seed: int = 0, balance: bool = False, store: str = "chunks", delete: bool = False,
                 action_repeat: int = 1, frames_dir: str | os.PathLike | None = None,
                 sampler: str | Sampler = "uniform"):
        _check_ints(capacity=(capacity, 0), cache=(cache, 1), action_repeat=(action_repeat, 1), seed=(seed, 0))
        if balance and sampler not in ("uniform", "episode"):
            raise ValueError(f"Replay balance=True selects the 'episode' sampler, got sampler={sampler!r}")
        self.sampler = get_sampler("episode" if balance else sampler)
        self.balance = self.sampler is uniform_episodes
        self.directory = Path(directory)
        self._new_store = store_factory(store, frames_dir or self.directory / "frames", int(cache))
        self._store = NullStore()  # until the first episode's keys choose the store (`_fix`)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self.delete = bool(delete)
        self.action_repeat = int(action_repeat)
        self.store_kind = store
        self._lock = threading.RLock()
        self._rng = np.random.Generator(np.random.PCG64(int(seed)))
        self._batches = 0  # sample() calls since construction or set_state
        self._episodes: collections.deque[EpisodeEntry] = collections.deque()
        self._steps = 0  # transitions of sampleable episodes
        self._stored_steps = 0  # transitions of every episode loaded or added (incl. dropped)
        self._signature: dict[str, tuple] | None = None  # key -> per-step shape
        self._windows_cache: dict[int, Windows] = {}  # by length; cleared when episodes change
        self._load()

    # -- loading and adding --------------------------------------------------------------------

    def _load(self) -> None:
        remove_temp_files(self.directory)  # left by a crash between write and rename
        loaded: list[tuple[EpisodeEntry, tuple[int, ...]]] = []
        for path in episode_paths(self.directory):
            try:
                arrays, image_shape = load_parts(path, with_images=False)
            except EpisodeError as e:
                quarantine(self.directory, path, e)
                continue
            try:
                self._fix(check_signature(episode_signature(arrays, image_shape), self._signature,
                                          f"episode file {path}"))
            except EpisodeError as e:  # a sound episode of another kind: not ours to move
                say(f"replay: skipping {e}")
                continue
            loaded.append((EpisodeEntry(path, len(arrays["action"]), arrays), image_shape))
        # Past quarantined files too: a new episode never takes the number of one set aside (names
        # are compared with the checkpoint's `last_episode` on resume).
        self._next = max(next_index(self.directory), next_index(self.directory / QUARANTINE))
        # Apply the capacity before touching images, so dropped episodes are never decoded.
        keep = _fitting([e.length - 1 for e, _ in loaded], self.capacity, self.action_repeat)
        for episode, _ in loaded[:len(loaded) - keep]:
            self._stored_steps += episode.length - 1
            self._drop_files(episode)
        for episode, image_shape in loaded[len(loaded) - keep:]:
            try:
                self._store.attach(episode, image_shape, None)
            except EpisodeError as e:
                quarantine(self.directory, episode.path, e)
                continue
            self._append(episode)
        self._store.cleanup({e.path.stem for e in self._episodes})

    def _fix(self, signature: dict) -> None:
        """Record the episodes' signature; the first one chooses the store (images or none)."""
        if self._signature is None:
            self._store = self._new_store(signature)
        self._signature = signature

    def add(self, episode: Mapping[str, np.ndarray]) -> Path:
        """Validate, save atomically and make `episode` sampleable; returns the file path."""
        check_episode(episode)
        episode = {k: np.array(v, order="C", copy=True) for k, v in episode.items()}  # caller may reuse
        images = episode.get("image")
        image_shape = None if images is None else images.shape
        with self._lock:
            signature = check_signature(episode_signature(episode, image_shape), self._signature,
                                        "added episode")
            length = len(episode["action"])
            path = self.directory / episode_name(self._next, length - 1)
            episode_writer(self.store_kind, signature)(path, episode)
            self._next += 1
            self._fix(signature)
            entry = EpisodeEntry(path, length, {k: v for k, v in episode.items() if k != "image"})
            self._store.attach(entry, image_shape, images)
            self._append(entry)
            keep = _fitting([e.length - 1 for e in self._episodes], self.capacity, self.action_repeat)
            for old in list(self._episodes)[:len(self._episodes) - keep]:
                self._remove(old)
                self._drop_files(old)
        return path

    def _append(self, episode: EpisodeEntry) -> None:
        self._episodes.append(episode)
        self._steps += episode.length - 1
        self._stored_steps += episode.length - 1
        self._windows_cache.clear()

    def _remove(self, episode: EpisodeEntry) -> None:
        self._episodes.remove(episode)
        self._steps -= episode.length - 1
        self._store.remove(episode)
        self._windows_cache.clear()

    def _drop_files(self, episode: EpisodeEntry) -> None:
        # Frame files are a cache and go with the episode (`_remove`); the .npz only if `delete`.
        if self.delete:
            episode.path.unlink(missing_ok=True)

    # -- counts --------------------------------------------------------------------------------

    @property
    def num_episodes(self) -> int:
        """Episodes available for sampling."""
        return len(self._episodes)

    @property
    def num_steps(self) -> int:
        """Transitions (sum of episode lengths minus one) available for sampling."""
        return self._steps

    @property
    def stored_steps(self) -> int:
        """Transitions of every episode loaded at start or added since, including those dropped by
        `capacity` (if `delete=True`, dropped files are gone and not counted after a restart)."""
        return self._stored_steps

    @property
    def stored_env_steps(self) -> int:
        """`stored_steps` in env steps (x `action_repeat`): what the train loop resumes from."""
        return self._stored_steps * self.action_repeat

    @property
    def cached_frames(self) -> int:
        """Decoded frames held in RAM by the `"cache"` store (0 for `"frames"`)."""
        return self._store.frames

    @property
    def signature(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-step shape and dtype of every key; empty before the first episode."""
        if self._signature is None:
            return {}
        return {k: (self._signature[k], np.dtype(SPEC[k][0])) for k in SPEC if k in self._signature}

    def paths(self) -> list[Path]:
        """Files of the sampleable episodes, oldest first."""
        with self._lock:
            return [e.path for e in self._episodes]

    def episodes(self) -> Iterator[dict[str, np.ndarray]]:
        """Full episodes (images decoded from disk), oldest first; for evaluation tools."""
        for path in self.paths():
            yield load_episode(path)

    def __repr__(self) -> str:
        return (f"Replay({str(self.directory)!r}, episodes={self.num_episodes}, steps={self.num_steps}, "
                f"store={self.store_kind!r}, capacity={self.capacity}, "
                f"sampler={getattr(self.sampler, '__name__', '?')})")

    # -- sampling ------------------------------------------------------------------------------

    def windows(self, length: int) -> Windows:
        """The valid windows of `length` entries (cached until episodes are added or dropped)."""
        with self._lock:
            if length not in self._windows_cache:
                self._windows_cache[length] = Windows.of([e.length for e in self._episodes], length)
            return self._windows_cache[length].check()

    def sample(self, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """A batch of `batch_size` windows of `length` consecutive entries: dict of [B, L, ...]."""
        for name, value in (("batch_size", batch_size), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"sample {name} must be a positive int, got {value!r}")
        with self._lock:
            while True:
                windows = self.windows(length)
                episodes, starts = check_draw(
                    windows, batch_size, *self.sampler(windows, batch_size, self._rng))
                batch, failed = _gather(self._episodes, self._store, self.signature, episodes, starts, length)
                if failed is not None:  # an image read failed: drop that episode, redraw without it
                    broken, error = failed
                    self._remove(broken)
                    if isinstance(error, EpisodeError):  # its data: quarantined
                        quarantine(self.directory, broken.path, error)
                    else:  # OSError: maybe the system's (e.g. too many open files), so left in place
                        say(f"replay: dropping episode file {broken.path} from sampling: {error}")
                    continue
                self._batches += 1
                return batch

    # -- random state --------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable sampling state: generator, batches drawn, newest episode file name."""
        with self._lock:
            newest = self._episodes[-1].path.name if self._episodes else None
            return {"version": _STATE_VERSION, "batches": self._batches, "newest": newest,
                    "rng": self._rng.bit_generator.state}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from `get_state` (also from a JSON round trip)."""
        rng = _rng_from_state(state)
        with self._lock:
            newest = self._episodes[-1].path.name if self._episodes else None
            saved = state.get("newest", newest)
            if saved != newest and saved and (self.directory / QUARANTINE / saved).exists():
                # The quarantine has said which file went; one line on what that means for the run.
                say(f"replay: the sample stream differs from the original run from here on: its newest episode "
                    f"{saved} was quarantined")
            elif saved != newest:
                warnings.warn(
                    f"replay state was saved with newest episode {state.get('newest')} but this replay's "
                    f"newest is {newest}: the sample stream will differ from the original run",
                    RuntimeWarning, stacklevel=2)
            self._rng = rng
            self._batches = int(state.get("batches", 0))

    # -- tf.data (TensorFlow is imported only when these are called) ----------------------------

    def dataset(self, batch_size: int, length: int, prefetch: int = 2):
        """An endless `tf.data.Dataset` of `sample(batch_size, length)` batches; see `pipeline`."""
        return pipeline.dataset(self, batch_size, length, prefetch)

    def iterator(self, batch_size: int, length: int, prefetch: int = 2) -> pipeline.ReplayIterator:
        """A prefetching batch iterator whose `get_state()` is exact for the batches consumed."""
        return pipeline.ReplayIterator(self, batch_size, length, prefetch)
