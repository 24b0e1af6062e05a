"""Episode replay: `.npz` storage on disk, bounded-memory loading, sequence sampling, tf.data.

Storage. Every finished episode is one compressed ``.npz`` file named
``{index:08d}-{uuid8}-{length}.npz`` (index = insertion order, length = transitions T, i.e. the
arrays hold T+1 entries). Files are written atomically: a hidden temp file ``.{name}.tmp`` in the
same directory is written, flushed and fsynced, then ``os.replace``-d into place, so a crash
never leaves a partial ``*.npz``; stale temp files are removed when a replay is constructed.

Memory. A paper run stores ~2.5M frames (30 GB of uint8 images), so images are not kept in RAM.
The small arrays (action, reward, discount, state) of every episode are, 4 bytes per float per step
(32 bytes for a 6-dim action without state: ~80 MB for a paper run). For images there are two
stores, chosen by the ``store`` argument:

* ``"frames"`` (default): an uncompressed frame store, one raw ``.npy`` per episode in
  ``{directory}/frames/`` written on ``add`` and rebuilt from the ``.npz`` files for episodes
  missing it. A sampled window is read with one ``preadv`` straight into the batch array. Pages
  live in the kernel's page cache (shared, reclaimable, not in the process RSS), so the process
  memory grows only with the small arrays and sampling costs 0.06-0.3 ms per 50-step sequence
  (66-313 batches of 50x50 per second, 50k-1M frames). The cost is disk: 12 KiB per 64x64x3
  frame on top of the compressed ``.npz`` (~30 GB for a paper run; see ``frames_dir``).
* ``"cache"``: an LRU cache of decoded episode images bounded by ``cache`` frames; a miss
  decompresses the whole image array of that episode from its ``.npz`` (~20 ms for a
  500-step episode). No extra disk, but once the replay outgrows the cache almost every
  sequence is a miss: ~1 batch of 50x50 per second, 60-300x slower than ``"frames"``.

The measurement in ``results/replay_memory.md`` (``scripts/bench_replay.py``) chose ``"frames"``
as the default: at 1M frames it held 176 MiB RssAnon (no images) at 66 batches/s, while the
cache store held its bound (0.6 GiB for a 50k cache, 2.4 GiB for 200k) at ~1 batch/s, a sampler
slower than the train step. Pread is used instead of keeping one ``mmap`` per episode because every
mapping holds a file descriptor (thousands of episodes) and mapped pages count in the RSS.

Sampling. ``sample(B, L)`` draws B windows of L consecutive entries uniformly over all valid
(episode, start) pairs, or with ``balance=True`` an episode uniformly and then a start. The
random stream comes from one ``numpy.random.Generator`` (PCG64) seeded by ``seed``; all random
draws of a batch happen before any data is read, so the stream does not depend on the store.

Resume guarantee. ``get_state()`` returns a JSON-serialisable dict. Restoring it with
``set_state`` into a replay holding the same episodes (same files, same capacity) reproduces the
identical sequence of batches that ``sample`` would have returned, given the same calls
(batch size, length). The state records the newest sampleable episode file; ``set_state`` warns
if the replay's newest differs (e.g. episodes saved after the checkpoint), since the stream then
differs. A prefetching ``dataset()`` samples ahead, so ``get_state()`` then includes the batches
in flight (about ``prefetch``, plus the one being produced). For exact resume use ``iterator()``: its ``get_state()`` returns the
state right after the last batch that ``next()`` handed out, and its ``close()`` rewinds the
replay's generator to that point (so the prefetched, never-seen batches are drawn again later).
A batch prefetched before an ``add`` was drawn without the new episode, and when that happens
depends on thread timing; so for a run that is bit-identical to its resumed self, open an
``iterator()`` per training phase and ``close()`` it before adding episodes / checkpointing:
``replay.get_state()`` is then exact and every batch sees exactly the episodes added before
its phase.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import re
import threading
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from dreamer_tf.utils import fsync_dir

__all__ = [
    "Replay", "ReplayIterator", "EpisodeError", "check_episode", "save_episode", "load_episode",
    "episode_paths", "episode_length", "REQUIRED_KEYS", "OPTIONAL_KEYS",
]

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("image", "action", "reward", "discount")
OPTIONAL_KEYS = ("state",)
_SMALL_KEYS = ("action", "reward", "discount", "state")
# Expected dtype and rank (including the time axis) of every episode key.
_SPEC = {
    "image": (np.uint8, 4),
    "action": (np.float32, 2),
    "reward": (np.float32, 1),
    "discount": (np.float32, 1),
    "state": (np.float32, 2),
}
_NAME_RE = re.compile(r"^(\d{8,})-([0-9a-f]{8})-(\d+)\.npz$")
_TMP_SUFFIX = ".tmp"
_STATE_VERSION = 1


class EpisodeError(ValueError):
    """An episode (in memory or on disk) that does not follow the episode format."""


# ----------------------------------------------------------------------------------------------
# Episode files
# ----------------------------------------------------------------------------------------------

def _check_keys(keys: list[str], where: str) -> None:
    """Raise `EpisodeError` if required keys are missing or unknown keys are present."""
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise EpisodeError(f"{where} is missing key(s) {missing}; it has {sorted(keys)}")
    unknown = sorted(set(keys) - set(_SPEC))
    if unknown:
        raise EpisodeError(f"{where} has unknown key(s) {unknown}; allowed: {list(_SPEC)}")


def check_episode(episode: Mapping[str, Any]) -> int:
    """Validate an episode dict against the shared format; return its length T+1.

    Raises `EpisodeError` naming the offending key, its dtype/shape and what is expected.
    """
    if not isinstance(episode, Mapping):
        raise EpisodeError(f"episode must be a dict of numpy arrays, got {type(episode).__name__}")
    _check_keys(list(episode), "episode")
    lengths = {}
    for key, value in episode.items():
        dtype, ndim = _SPEC[key]
        if not isinstance(value, np.ndarray):
            raise EpisodeError(f"episode key {key!r} must be a numpy array, got {type(value).__name__}")
        if value.dtype != dtype:
            raise EpisodeError(f"episode key {key!r} has dtype {value.dtype}, expected {np.dtype(dtype)}")
        if value.ndim != ndim:
            raise EpisodeError(
                f"episode key {key!r} has shape {value.shape} ({value.ndim} dims), expected {ndim} dims")
        lengths[key] = len(value)
    if len(set(lengths.values())) != 1:
        raise EpisodeError(f"episode keys have inconsistent lengths {lengths}")
    length = lengths["image"]
    if length < 2:
        raise EpisodeError(f"episode has length {length}; it needs the reset entry plus >= 1 step")
    image = episode["image"]
    if min(image.shape[1:]) < 1:
        raise EpisodeError(f"episode key 'image' has empty frames of shape {image.shape[1:]}")
    for key in ("action", "reward", "state"):
        if key in episode and not np.all(np.isfinite(episode[key])):
            raise EpisodeError(f"episode key {key!r} contains NaN or inf")
    discount = episode["discount"]
    if np.any((discount < 0) | (discount > 1)) or not np.all(np.isfinite(discount)):
        raise EpisodeError("episode key 'discount' has values outside [0, 1]")
    return length


def episode_length(episode: Mapping[str, np.ndarray]) -> int:
    """Number of transitions T of an episode (its arrays hold T+1 entries)."""
    return len(episode["reward"]) - 1


def episode_paths(directory: str | os.PathLike) -> list[Path]:
    """All episode files of `directory` in insertion (file name) order; temp files excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.npz") if not p.name.startswith("."))


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` via a hidden temp file in the same directory, fsync, then rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _write_npz(path: Path, episode: Mapping[str, np.ndarray]) -> None:
    _atomic_write(path, lambda f: np.savez_compressed(f, **episode))


def _next_index(directory: Path) -> int:
    indices = [int(m.group(1)) for p in episode_paths(directory) if (m := _NAME_RE.match(p.name))]
    return max(indices, default=-1) + 1


def _episode_name(index: int, length: int) -> str:
    return f"{index:08d}-{uuid.uuid4().hex[:8]}-{length}.npz"


def save_episode(directory: str | os.PathLike, episode: Mapping[str, np.ndarray],
                 index: int | None = None) -> Path:
    """Validate and atomically save `episode` as `{index:08d}-{uuid8}-{T}.npz` in `directory`.

    `index` defaults to one past the largest index already in the directory.
    """
    check_episode(episode)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if index is None:
        index = _next_index(directory)
    path = directory / _episode_name(index, episode_length(episode))
    _write_npz(path, episode)
    return path


def _read_npy_header(fileobj) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header_size) of a `.npy` stream positioned at its start."""
    version = np.lib.format.read_magic(fileobj)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fileobj)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fileobj)
    else:
        raise EpisodeError(f"unsupported .npy format version {version}")
    if fortran:
        raise EpisodeError("Fortran-ordered arrays are not supported")
    return shape, dtype, fileobj.tell()


def _open_npz(path: Path, fileobj) -> "np.lib.npyio.NpzFile":
    try:
        npz = np.load(fileobj, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EpisodeError(f"episode file {path} cannot be opened: {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EpisodeError(f"episode file {path} is not an .npz archive")
    return npz


def _load_parts(path: Path, with_images: bool) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Read and validate an episode file.

    Returns the arrays (images only if `with_images`) and the image array shape (from the
    `.npy` header, so the images need not be decompressed).
    """
    path = Path(path)
    # Open the file ourselves: np.load leaks the handle when the zip is unreadable.
    with open(path, "rb") as fileobj, _open_npz(path, fileobj) as npz:
        keys = sorted(k for k in npz.files)
        _check_keys(keys, f"episode file {path}")
        arrays = {}
        try:
            for key in keys:
                if key != "image" or with_images:
                    arrays[key] = npz[key]
            with npz.zip.open("image.npy") as f:
                image_shape, image_dtype, _ = _read_npy_header(f)
        except EpisodeError:
            raise
        except Exception as e:  # zlib.error, BadZipFile (CRC), ValueError, EOFError, ...
            raise EpisodeError(f"episode file {path} is corrupt: {type(e).__name__}: {e}") from e
    if image_dtype != np.uint8:
        raise EpisodeError(f"episode file {path}: key 'image' has dtype {image_dtype}, expected uint8")
    # Validate with a placeholder for skipped images: only its dtype/shape are checked.
    placeholder = arrays.get("image")
    if placeholder is None:
        placeholder = np.lib.stride_tricks.as_strided(
            np.zeros((), np.uint8), shape=image_shape, strides=(0,) * len(image_shape))
    try:
        check_episode({**arrays, "image": placeholder})
    except EpisodeError as e:
        raise EpisodeError(f"episode file {path}: {e}") from None
    m = _NAME_RE.match(path.name)
    if m and int(m.group(3)) != image_shape[0] - 1:
        raise EpisodeError(
            f"episode file {path}: name says length {m.group(3)} but it holds {image_shape[0] - 1} steps")
    return arrays, tuple(image_shape)


def load_episode(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and validate one episode file; raises `EpisodeError` naming the file if it is bad."""
    arrays, _ = _load_parts(Path(path), with_images=True)
    return arrays


# ----------------------------------------------------------------------------------------------
# Image stores
# ----------------------------------------------------------------------------------------------

class _Episode:
    """What the replay keeps in RAM per episode: the small arrays and where the images live."""

    __slots__ = ("path", "length", "small", "frames_path", "frames_offset")

    def __init__(self, path: Path, length: int, small: dict[str, np.ndarray]):
        self.path = path
        self.length = length  # entries (T+1)
        self.small = small
        self.frames_path: Path | None = None
        self.frames_offset = 0


class _FrameStore:
    """Uncompressed per-episode `.npy` image files read with `preadv` (page cache, not RSS)."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        for tmp in directory.glob(f".*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)

    def _path(self, episode: _Episode) -> Path:
        return self.directory / (episode.path.stem + ".npy")

    def attach(self, episode: _Episode, image_shape: tuple[int, ...], images: np.ndarray | None) -> None:
        """Point `episode` at its frame file, (re)building it from `images` or its `.npz`."""
        path = self._path(episode)
        offset = self._valid_offset(path, image_shape)
        if offset is None:
            if images is None:
                logger.info("rebuilding frame file %s from %s", path, episode.path)
                images = load_episode(episode.path)["image"]
            _atomic_write(path, lambda f: np.lib.format.write_array(f, np.ascontiguousarray(images)))
            offset = self._valid_offset(path, image_shape)
            if offset is None:
                raise OSError(f"frame file {path} could not be written")
        episode.frames_path, episode.frames_offset = path, offset

    @staticmethod
    def _valid_offset(path: Path, image_shape: tuple[int, ...]) -> int | None:
        try:
            with open(path, "rb") as f:
                shape, dtype, offset = _read_npy_header(f)
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError, EpisodeError):
            return None
        if tuple(shape) != tuple(image_shape) or dtype != np.uint8:
            return None
        if size != offset + int(np.prod(shape)):
            return None
        return offset

    def read(self, episode: _Episode, start: int, out: np.ndarray) -> None:
        """Fill `out` (contiguous [L, H, W, C] uint8) with frames start..start+L-1."""
        frame_bytes = out[0].nbytes
        view = memoryview(out).cast("B")
        offset = episode.frames_offset + start * frame_bytes
        fd = os.open(episode.frames_path, os.O_RDONLY)
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"frame file {episode.frames_path} is truncated")
                done += n
        finally:
            os.close(fd)

    def remove(self, episode: _Episode) -> None:
        if episode.frames_path is not None:
            episode.frames_path.unlink(missing_ok=True)

    def cleanup(self, keep: set[str]) -> None:
        """Delete frame files whose episode file is gone (by stem)."""
        for path in self.directory.glob("*.npy"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)


class _CacheStore:
    """LRU cache of decoded episode images holding at most `capacity` frames."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: collections.OrderedDict[Path, np.ndarray] = collections.OrderedDict()
        self.frames = 0  # decoded frames currently held
        self.hits = 0
        self.misses = 0

    def attach(self, episode: _Episode, image_shape: tuple[int, ...], images: np.ndarray | None) -> None:
        if images is not None:
            self._put(episode.path, images)

    def _put(self, key: Path, images: np.ndarray) -> None:
        if len(images) > self.capacity:
            return  # would break the bound on its own; used once and dropped
        self._lru[key] = images
        self.frames += len(images)
        while self.frames > self.capacity:
            _, old = self._lru.popitem(last=False)
            self.frames -= len(old)

    def images(self, episode: _Episode) -> np.ndarray:
        images = self._lru.get(episode.path)
        if images is not None:
            self.hits += 1
            self._lru.move_to_end(episode.path)
            return images
        self.misses += 1
        images = load_episode(episode.path)["image"]
        if len(images) != episode.length:
            raise EpisodeError(f"episode file {episode.path} changed on disk")
        self._put(episode.path, images)
        return images

    def read(self, episode: _Episode, start: int, out: np.ndarray) -> None:
        out[...] = self.images(episode)[start:start + len(out)]

    def remove(self, episode: _Episode) -> None:
        images = self._lru.pop(episode.path, None)
        if images is not None:
            self.frames -= len(images)

    def cleanup(self, keep: set[str]) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Replay
# ----------------------------------------------------------------------------------------------

class Replay:
    """Episodes of one directory: add, reload on start, bounded memory, sequence sampling.

    Args:
      directory: where episode `.npz` files live (created if missing; existing ones are loaded).
      capacity: env steps (transitions x `action_repeat`) kept for sampling; 0 = unlimited. When
        exceeded the oldest episodes are dropped from sampling (the newest is always kept).
      cache: frames of decoded images kept in RAM by the `"cache"` store.
      seed: seed of the sampling generator.
      balance: sample episodes uniformly (then a start) instead of windows uniformly.
      store: `"frames"` (uncompressed frame files, default) or `"cache"` (LRU of decoded images).
      delete: also delete the files of episodes dropped by `capacity`.
      action_repeat: env steps per transition, to count env steps and apply `capacity`.
      frames_dir: where the `"frames"` store keeps its files (default `directory/frames`).
    """

    def __init__(self, directory: str | os.PathLike, *, capacity: int = 0, cache: int = 200_000,
                 seed: int = 0, balance: bool = False, store: str = "frames", delete: bool = False,
                 action_repeat: int = 1, frames_dir: str | os.PathLike | None = None):
        for name, value, low in (("capacity", capacity, 0), ("cache", cache, 1),
                                 ("action_repeat", action_repeat, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"Replay {name} must be an int >= {low}, got {value!r}")
        if store not in ("frames", "cache"):
            raise ValueError(f"Replay store must be 'frames' or 'cache', got {store!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = int(capacity)
        self.balance = bool(balance)
        self.delete = bool(delete)
        self.action_repeat = int(action_repeat)
        self.store_kind = store
        self._lock = threading.RLock()
        self._rng = np.random.Generator(np.random.PCG64(int(seed)))
        self._batches = 0  # sample() calls since construction or set_state
        self._episodes: collections.deque[_Episode] = collections.deque()
        self._steps = 0  # transitions of sampleable episodes
        self._stored_steps = 0  # transitions of every episode loaded or added (incl. dropped)
        self._signature: dict[str, tuple] | None = None  # key -> per-step shape
        self._windows_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._broken: _Episode | None = None  # episode being read by `_gather`
        if store == "frames":
            self._store = _FrameStore(Path(frames_dir) if frames_dir else self.directory / "frames")
        else:
            self._store = _CacheStore(int(cache))
        self._load()

    # -- loading -------------------------------------------------------------------------------

    def _load(self) -> None:
        for tmp in self.directory.glob(f".*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)  # left by a crash between write and rename
        loaded: list[tuple[_Episode, tuple[int, ...]]] = []
        for path in episode_paths(self.directory):
            try:
                arrays, image_shape = _load_parts(path, with_images=False)
                self._signature = self._check_signature(arrays, image_shape, source=f"episode file {path}")
            except EpisodeError as e:
                warnings.warn(f"replay skips a bad file: {e}", RuntimeWarning, stacklevel=3)
                continue
            loaded.append((_Episode(path, image_shape[0], arrays), image_shape))
        self._next = _next_index(self.directory)
        # Apply the capacity before touching images, so dropped episodes are never decoded.
        # Keep the newest episodes that fit (always at least one), as `_enforce_capacity` does.
        keep, steps = len(loaded), 0
        if self.capacity:
            keep = 0
            for episode, _ in reversed(loaded):
                steps += episode.length - 1
                if keep and steps * self.action_repeat > self.capacity:
                    break
                keep += 1
        for episode, _ in loaded[:len(loaded) - keep]:
            self._stored_steps += episode.length - 1
            self._drop_files(episode)
        for episode, image_shape in loaded[len(loaded) - keep:]:
            try:
                self._store.attach(episode, image_shape, None)
            except EpisodeError as e:
                warnings.warn(f"replay skips a bad file: {e}", RuntimeWarning, stacklevel=3)
                continue
            self._append(episode)
        self._store.cleanup({e.path.stem for e in self._episodes})

    def _check_signature(self, arrays: Mapping[str, np.ndarray], image_shape: tuple, source: str) -> dict:
        """The keys and per-step shapes of an episode; they must match the stored episodes'."""
        signature = {k: tuple(v.shape[1:]) for k, v in arrays.items() if k != "image"}
        signature["image"] = tuple(image_shape[1:])
        if self._signature is not None and signature != self._signature:
            raise EpisodeError(
                f"{source} has keys/per-step shapes {signature}, but this replay holds {self._signature}")
        return signature

    # -- adding --------------------------------------------------------------------------------

    def add(self, episode: Mapping[str, np.ndarray]) -> Path:
        """Validate, save atomically and make `episode` sampleable; returns the file path."""
        check_episode(episode)
        episode = {k: np.array(v, order="C", copy=True) for k, v in episode.items()}  # caller may reuse
        with self._lock:
            signature = self._check_signature(episode, episode["image"].shape, source="added episode")
            length = len(episode["image"])
            path = self.directory / _episode_name(self._next, length - 1)
            _write_npz(path, episode)
            self._next += 1
            self._signature = signature
            entry = _Episode(path, length, {k: v for k, v in episode.items() if k != "image"})
            self._store.attach(entry, episode["image"].shape, episode["image"])
            self._append(entry)
            self._enforce_capacity()
        return path

    def _append(self, episode: _Episode) -> None:
        self._episodes.append(episode)
        self._steps += episode.length - 1
        self._stored_steps += episode.length - 1
        self._windows_cache.clear()

    def _enforce_capacity(self) -> None:
        if not self.capacity:
            return
        while len(self._episodes) > 1 and self._steps * self.action_repeat > self.capacity:
            old = self._episodes.popleft()
            self._steps -= old.length - 1
            self._store.remove(old)
            self._drop_files(old)
            self._windows_cache.clear()

    def _drop_files(self, episode: _Episode) -> None:
        # Frame files are a cache and go with the episode; the .npz stays unless `delete`.
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
        return self._store.frames if isinstance(self._store, _CacheStore) else 0

    @property
    def signature(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-step shape and dtype of every key; empty before the first episode."""
        if self._signature is None:
            return {}
        return {k: (self._signature[k], np.dtype(_SPEC[k][0])) for k in _SPEC if k in self._signature}

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
                f"store={self.store_kind!r}, capacity={self.capacity}, balance={self.balance})")

    # -- sampling ------------------------------------------------------------------------------

    def _windows(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the episodes with >= `length` entries and their cumulative window counts."""
        key = (length,)
        if key not in self._windows_cache:
            counts = np.array([e.length - length + 1 for e in self._episodes], np.int64)
            eligible = np.flatnonzero(counts > 0)
            self._windows_cache[key] = (eligible, np.cumsum(counts[eligible]))
        return self._windows_cache[key]

    def _draw_check(self, length: int) -> None:
        eligible, _ = self._windows(length)
        if len(eligible) == 0:
            longest = max((e.length for e in self._episodes), default=0)
            raise ValueError(
                f"no episode is long enough to sample sequences of length {length}: the replay holds "
                f"{len(self._episodes)} episode(s), the longest has {longest} entries")

    def _draw(self, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode positions and start indices of one batch (all random draws of the batch)."""
        self._draw_check(length)
        eligible, cumulative = self._windows(length)
        if self.balance:
            which = self._rng.integers(0, len(eligible), size=batch_size)
            episodes = eligible[which]
            spans = np.array([self._episodes[i].length - length + 1 for i in episodes], np.int64)
            starts = self._rng.integers(0, spans)
        else:
            flat = self._rng.integers(0, cumulative[-1], size=batch_size)
            which = np.searchsorted(cumulative, flat, side="right")
            episodes = eligible[which]
            before = np.concatenate([[0], cumulative])[which]
            starts = flat - before
        return episodes, starts

    def sample(self, batch_size: int, length: int) -> dict[str, np.ndarray]:
        """A batch of `batch_size` windows of `length` consecutive entries: dict of [B, L, ...]."""
        for name, value in (("batch_size", batch_size), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"sample {name} must be a positive int, got {value!r}")
        with self._lock:
            while True:
                episodes, starts = self._draw(batch_size, length)
                try:
                    batch = self._gather(episodes, starts, length)
                except (EpisodeError, OSError) as e:
                    self._drop_broken(e)
                    continue
                self._batches += 1
                return batch

    def _gather(self, episodes: np.ndarray, starts: np.ndarray, length: int) -> dict[str, np.ndarray]:
        signature = self.signature
        batch = {k: np.empty((len(episodes), length) + shape, dtype) for k, (shape, dtype) in signature.items()}
        # Read in episode order so one decode serves all windows of an episode (cache store).
        for b in np.argsort(episodes, kind="stable"):
            episode = self._episodes[episodes[b]]
            start = int(starts[b])
            self._broken = episode
            self._store.read(episode, start, batch["image"][b])
            for key, value in episode.small.items():
                batch[key][b] = value[start:start + length]
        self._broken = None
        return batch

    def _drop_broken(self, error: Exception) -> None:
        episode = self._broken
        if episode is None:
            raise error
        warnings.warn(f"dropping episode file {episode.path} from sampling: {error}", RuntimeWarning)
        self._episodes.remove(episode)
        self._steps -= episode.length - 1
        self._store.remove(episode)
        self._windows_cache.clear()
        self._broken = None

    # -- random state --------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable sampling state: generator, batches drawn, newest episode file name."""
        with self._lock:
            newest = self._episodes[-1].path.name if self._episodes else None
            return {"version": _STATE_VERSION, "batches": self._batches, "newest": newest,
                    "rng": self._rng.bit_generator.state}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from `get_state` (also from a JSON round trip)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION or "rng" not in state:
            raise ValueError(f"not a Replay state (version {_STATE_VERSION}): {state!r:.200}")
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = dict(state["rng"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"Replay state has an invalid 'rng' entry: {e}") from None
        with self._lock:
            newest = self._episodes[-1].path.name if self._episodes else None
            if state.get("newest", newest) != newest:
                warnings.warn(
                    f"replay state was saved with newest episode {state.get('newest')} but this replay's "
                    f"newest is {newest}: the sample stream will differ from the original run",
                    RuntimeWarning, stacklevel=2)
            self._rng = rng
            self._batches = int(state.get("batches", 0))

    # -- tf.data -------------------------------------------------------------------------------

    def _output_signature(self, batch_size: int, length: int):
        import tensorflow as tf  # lazily: env workers import this package without TensorFlow

        if self._signature is None:
            raise ValueError("the replay is empty: add an episode before building a dataset "
                             "(its keys and shapes define the dataset's)")
        return {k: tf.TensorSpec((batch_size, length) + shape, tf.as_dtype(dtype))
                for k, (shape, dtype) in self.signature.items()}

    def _dataset(self, batch_size: int, length: int, prefetch: int, on_batch=None, stopped=None):
        import tensorflow as tf

        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < -1:
            raise ValueError(f"dataset prefetch must be an int >= 0 (or -1 = AUTOTUNE), got {prefetch!r}")
        signature = self._output_signature(batch_size, length)
        with self._lock:
            self._draw_check(length)  # a clear error now instead of a TF one on the first batch

        def generator():
            while True:
                with self._lock:
                    if stopped is not None and stopped.is_set():
                        return
                    batch = self.sample(batch_size, length)
                    if on_batch is not None:
                        on_batch(self.get_state())
                yield batch

        dataset = tf.data.Dataset.from_generator(generator, output_signature=signature)
        # tf.data.AUTOTUNE is -1.
        return dataset.prefetch(tf.data.AUTOTUNE if prefetch == -1 else prefetch) if prefetch else dataset

    def dataset(self, batch_size: int, length: int, prefetch: int = 2):
        """An endless `tf.data.Dataset` of `sample(batch_size, length)` batches with static shapes.

        Episodes added later are sampled by batches generated after the `add`. With prefetch,
        `get_state()` runs ahead of the consumer by the in-flight batches; use `iterator()` for
        an exact resume point.
        """
        return self._dataset(batch_size, length, prefetch)

    def iterator(self, batch_size: int, length: int, prefetch: int = 2) -> "ReplayIterator":
        """A prefetching batch iterator whose `get_state()` is exact for the batches consumed."""
        return ReplayIterator(self, batch_size, length, prefetch)


class ReplayIterator:
    """Iterates a prefetching replay dataset while tracking the state after each consumed batch.

    `get_state()` is the replay state right after the last batch returned by `next()`: restoring
    it continues with exactly the next batch. `close()` stops the generator and rewinds the
    replay's generator to that state, so prefetched but unconsumed batches are not lost.
    """

    def __init__(self, replay: Replay, batch_size: int, length: int, prefetch: int = 2):
        self._replay = replay
        self._stopped = threading.Event()
        self._produced: collections.deque[dict] = collections.deque()
        self._state = replay.get_state()
        dataset = replay._dataset(batch_size, length, prefetch, self._produced.append, self._stopped)
        self._iterator = iter(dataset)

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
