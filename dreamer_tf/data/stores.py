"""Where the replay's images live: the chunk store (default), the frame store and the LRU cache.

A paper run stores ~2.5M frames (30 GB of uint8 images), so images are not kept in RAM. The
small arrays (action, reward, discount, state) of every episode are, 4 bytes per float per step
(~80 MB for a paper run, see `EpisodeEntry`). Images are read by one of three stores, chosen by
``Replay(store=...)``:

* ``"chunks"`` (`ChunkStore`): every episode is written once as a chunked file
  (`dreamer_tf.data.chunks`: LZ4-compressed chunks of 32 frames plus an index); a sampled window
  is one ``pread`` of the chunks it overlaps, decoded straight into the batch on two threads
  (LZ4's C decoder releases the GIL). At most 0.28 of the disk of ``"frames"`` (`DISK_BYTES_PER_FRAME`): no second copy.
  Plain ``.npz`` episodes of older runs are rewritten as chunked files once, atomically, when a
  chunk store opens them, and their frame files are deleted.

* ``"frames"`` (`FrameStore`): an uncompressed frame store, one raw ``.npy`` per episode,
  written on ``add`` and rebuilt from the ``.npz`` files for episodes missing it. A sampled
  window is read with one ``preadv`` straight into the batch array. Pages live in the kernel's
  page cache (shared, reclaimable, not in the process RSS), so the process memory grows only
  with the small arrays. The cost is disk: 12 KiB per 64x64x3 frame on top of the compressed
  ``.npz`` (~30 GB for a paper run; see ``Replay(frames_dir=...)``).
* ``"cache"`` (`CacheStore`): an LRU cache of decoded episode images bounded by ``cache``
  frames; a miss decompresses the whole image array of that episode from its ``.npz``. No extra
  disk, but once the replay outgrows the cache almost every sequence is a miss.

``results/replay_memory.md`` (made by ``scripts/bench_replay.py``) measures all three: disk,
memory, load time and batches per second against the replay size, and bytes per frame on real
frames of the 20 DMC tasks (`DISK_BYTES_PER_FRAME`). ``"chunks"`` is the default of ``Replay``
and of the config. Pread is
used instead of keeping one ``mmap`` per episode because every mapping holds a file descriptor
(thousands of episodes) and mapped pages count in the RSS.

Episodes without images (``state`` observations only) get a `NullStore`: no frame files, no
directory, no cache. The replay makes its store when the first episode fixes its keys
(`store_factory`), so the ``"frames"`` directory is created only for episodes with images.

The episode file's form follows the store (`episode_writer`: chunked for ``"chunks"``, else a
plain ``.npz``). A store has five methods: ``attach`` (an episode became sampleable, maybe with its images in hand), ``read`` (fill a window
of frames), ``read_many`` (a batch of windows; the first failure is returned, not raised),
``remove`` (the episode left the replay) and ``cleanup`` (drop leftovers of episodes that are
gone), and a ``frames`` count of decoded frames held in RAM.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dreamer_tf.data import chunks
from dreamer_tf.data.episodes import (
    NAME_RE,
    EpisodeError,
    load_episode,
    read_npy_header,
    remove_temp_files,
    write_chunked,
    write_npz,
)
from dreamer_tf.utils import atomic_write_bytes

logger = logging.getLogger(__name__)


class EpisodeEntry:
    """What the replay keeps in RAM per episode: the small arrays and where the images live."""

    __slots__ = ("path", "length", "small", "frames_path", "frames_offset", "chunks")

    def __init__(self, path: Path, length: int, small: dict[str, np.ndarray]):
        self.path = path
        self.length = length  # entries (T+1)
        self.small = small
        self.frames_path: Path | None = None
        self.frames_offset = 0
        self.chunks: chunks.ChunkIndex | None = None  # `ChunkStore` only


Job = tuple[EpisodeEntry, int, np.ndarray]  # (episode, first frame, out [L, H, W, C])


def read_in_order(store, jobs: list[Job]) -> tuple[EpisodeEntry, Exception] | None:
    """Read every window with `store.read`, one after the other; the first failure (its episode
    and error) is returned instead of raised, so the replay can drop that episode."""
    failed = first_failure(store, jobs, range(len(jobs)))
    return None if failed is None else failed[1]


def first_failure(store, jobs: list[Job], indices: Iterable[int]) -> tuple[int, tuple[EpisodeEntry, Exception]] | None:
    """Read jobs[i] for i in `indices`, in order, with `store.read`; the first failure as
    (i, (episode, error)), else None."""
    for i in indices:
        episode, start, out = jobs[i]
        try:
            store.read(episode, start, out)
        except (EpisodeError, OSError) as e:
            return i, (episode, e)
    return None


class FrameStore:
    """Uncompressed per-episode `.npy` image files read with `preadv` (page cache, not RSS)."""

    frames = 0  # decoded frames held in RAM: none
    read_many = read_in_order

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(directory)

    def _path(self, episode: EpisodeEntry) -> Path:
        return self.directory / (episode.path.stem + ".npy")

    def attach(self, episode: EpisodeEntry, image_shape: tuple[int, ...],
               images: np.ndarray | None) -> None:
        """Point `episode` at its frame file, (re)building it from `images` or its `.npz`."""
        path = self._path(episode)
        offset = self._valid_offset(path, image_shape)
        if offset is None:
            if images is None:
                logger.info("rebuilding frame file %s from %s", path, episode.path)
                images = load_episode(episode.path)["image"]
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(images))
            atomic_write_bytes(path, buffer.getvalue())
            offset = self._valid_offset(path, image_shape)
            if offset is None:
                raise OSError(f"frame file {path} could not be written")
        episode.frames_path, episode.frames_offset = path, offset

    @staticmethod
    def _valid_offset(path: Path, image_shape: tuple[int, ...]) -> int | None:
        try:
            with open(path, "rb") as f:
                shape, dtype, offset = read_npy_header(f)
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError, EpisodeError):
            return None
        if tuple(shape) != tuple(image_shape) or dtype != np.uint8:
            return None
        if size != offset + int(np.prod(shape)):
            return None
        return offset

    def read(self, episode: EpisodeEntry, start: int, out: np.ndarray) -> None:
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

    def remove(self, episode: EpisodeEntry) -> None:
        if episode.frames_path is not None:
            episode.frames_path.unlink(missing_ok=True)

    def cleanup(self, keep: set[str]) -> None:
        """Delete frame files whose episode file is gone (by stem)."""
        for path in self.directory.glob("*.npy"):
            if path.stem not in keep:
                path.unlink(missing_ok=True)


class NullStore:
    """The store of a replay whose episodes have no images (or of one holding no episode yet)."""

    frames = 0
    read_many = read_in_order

    def attach(self, episode: EpisodeEntry, image_shape: tuple[int, ...] | None,
               images: np.ndarray | None) -> None:
        if image_shape is not None:
            raise ValueError(f"episode {episode.path} has images but this replay stores none")

    def read(self, episode: EpisodeEntry, start: int, out: np.ndarray) -> None:
        raise ValueError(f"this replay stores no images (episode {episode.path})")

    def remove(self, episode: EpisodeEntry) -> None:
        pass

    def cleanup(self, keep: set[str]) -> None:
        pass


class CacheStore:
    """LRU cache of decoded episode images holding at most `capacity` frames."""

    read_many = read_in_order

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._lru: collections.OrderedDict[Path, np.ndarray] = collections.OrderedDict()
        self.frames = 0  # decoded frames currently held
        self.hits = 0
        self.misses = 0

    def attach(self, episode: EpisodeEntry, image_shape: tuple[int, ...],
               images: np.ndarray | None) -> None:
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

    def images(self, episode: EpisodeEntry) -> np.ndarray:
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

    def read(self, episode: EpisodeEntry, start: int, out: np.ndarray) -> None:
        out[...] = self.images(episode)[start:start + len(out)]

    def remove(self, episode: EpisodeEntry) -> None:
        images = self._lru.pop(episode.path, None)
        if images is not None:
            self.frames -= len(images)

    def cleanup(self, keep: set[str]) -> None:
        pass


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """The decoding pool of `threads` threads, shared by every chunk store of the process (so
    replays opened and dropped, e.g. by tests, do not each leave idle threads behind)."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="replay-chunks")
        return _POOLS[threads]


class ChunkStore:
    """Chunked episode files (`dreamer_tf.data.chunks`): one compressed copy, random access by chunk.

    Keeps per episode only its `chunks.ChunkIndex` (8 bytes per chunk of 32 frames); no decoded
    frames are cached: with uniform sampling over millions of frames a cache would hit rarely.
    """

    frames = 0  # decoded frames held in RAM: none (only the windows being read)
    # Check the CRC-32 of every file opened from disk (`chunks.read_index(verify=True)`) before
    # any window of it is read: LZ4 has no checksum of its own. scripts/bench_replay.py turns it
    # off to time it; nothing else should.
    verify = True

    def __init__(self, frames_dir: Path, threads: int = 2):
        self.frames_dir = frames_dir  # where an older run's frame files may be (deleted on migration)
        self.threads = threads

    def attach(self, episode: EpisodeEntry, image_shape: tuple[int, ...],
               images: np.ndarray | None) -> None:
        """Read `episode`'s chunk index, first rewriting a plain `.npz` as a chunked file; a file
        opened from disk (`images` None) is checked against its CRC first. `EpisodeError` if the
        file is damaged."""
        try:
            index = chunks.read_index(episode.path, verify=self.verify and images is None)
            if index is None:  # an older run's .npz: migrate it once (atomic rename, same name)
                logger.info("rewriting %s as a chunked episode file", episode.path)
                write_chunked(episode.path, load_episode(episode.path))
                (self.frames_dir / (episode.path.stem + ".npy")).unlink(missing_ok=True)
                index = chunks.read_index(episode.path)
        except chunks.ChunkError as e:
            raise EpisodeError(f"episode file {episode.path} is corrupt: {e}") from None
        if index is None or index.shape != tuple(image_shape):
            raise EpisodeError(f"episode file {episode.path}: image index does not match shape {image_shape}")
        episode.chunks = index

    def read(self, episode: EpisodeEntry, start: int, out: np.ndarray) -> None:
        """Fill `out` (contiguous [L, H, W, C] uint8) with frames start..start+L-1."""
        fd = os.open(episode.path, os.O_RDONLY)
        try:
            chunks.read_window(fd, episode.chunks, start, out)
        except chunks.ChunkError as e:
            raise EpisodeError(f"episode file {episode.path} is corrupt: {e}") from None
        finally:
            os.close(fd)

    def read_many(self, jobs: list[Job]) -> tuple[EpisodeEntry, Exception] | None:
        """Read the windows on `threads` threads (decoding is most of the time, and LZ4's C decoder
        releases the GIL): the calling thread reads every threads-th job and the pool the others,
        one hand-off per thread per batch. The failure of the earliest job in `jobs` is returned,
        as `read_in_order` would, so which episode is dropped does not depend on timing."""
        if self.threads < 2 or len(jobs) < 2:
            return read_in_order(self, jobs)
        parts = [range(i, len(jobs), self.threads) for i in range(self.threads)]
        futures = [_pool(self.threads).submit(first_failure, self, jobs, part) for part in parts[1:]]
        failures = [first_failure(self, jobs, parts[0])] + [f.result() for f in futures]  # all finish first
        failures = [f for f in failures if f is not None]
        return min(failures, key=lambda f: f[0])[1] if failures else None

    def index_bytes(self, episodes) -> int:
        """Bytes of the chunk offsets held for `episodes` (the per-frame part of the index)."""
        return sum(e.chunks.nbytes for e in episodes if e.chunks is not None)

    def remove(self, episode: EpisodeEntry) -> None:
        episode.chunks = None

    def cleanup(self, keep: set[str]) -> None:
        """Delete the frame files an older `frames` run left (the episode files hold the images)."""
        if not self.frames_dir.is_dir():
            return
        remove_temp_files(self.frames_dir)
        for path in self.frames_dir.glob("*.npy"):
            if NAME_RE.match(path.stem + ".npz"):
                path.unlink(missing_ok=True)
        try:
            self.frames_dir.rmdir()  # only if it is empty now
        except OSError:
            pass


STORES = ("chunks", "frames", "cache")

# Disk per stored 64x64x3 frame, for disk estimates (e.g. a launcher's preflight): the largest
# size per frame measured over the 20 DMC benchmark tasks' real frames under random actions
# (results/replay_memory.md, per-task table; quadruped_run is the largest), with ~4% headroom.
# "chunks": the chunked file (measured 4661); "frames": the raw frame file plus the .npz
# (12288 + 4331); "cache": the .npz alone (4331). A paper run stores 2.5e6 frames.
DISK_BYTES_PER_FRAME = {"chunks": 4864, "frames": 17280, "cache": 4544}


def disk_bytes_per_frame(store: str = "chunks") -> int:
    """Upper bound of the replay's disk bytes per stored 64x64x3 frame for `store`."""
    if store not in DISK_BYTES_PER_FRAME:
        raise ValueError(f"Replay store must be one of {list(STORES)}, got {store!r}")
    return DISK_BYTES_PER_FRAME[store]


def episode_writer(kind: str, signature: dict) -> Callable[[Path, dict], None]:
    """How a replay with store `kind` writes an episode of `signature`: chunked for "chunks" (if
    it has images), else a plain `.npz` (for "frames" the .npz is the episode and frame files a
    cache of it)."""
    return write_chunked if kind == "chunks" and "image" in signature else write_npz


def make_store(kind: str, frames_dir: Path, cache: int) -> FrameStore | CacheStore | ChunkStore:
    """The image store `kind` (one of `STORES`)."""
    if kind == "chunks":
        return ChunkStore(frames_dir)
    if kind == "frames":
        return FrameStore(frames_dir)
    if kind == "cache":
        return CacheStore(cache)
    raise ValueError(f"Replay store must be one of {list(STORES)}, got {kind!r}")


def store_factory(kind: str, frames_dir: str | os.PathLike, cache: int
                  ) -> Callable[[dict], FrameStore | CacheStore | ChunkStore | NullStore]:
    """Validate `kind` now (nothing is created); the returned function makes the store for the
    episodes of a signature (key -> per-step shape): the image store `kind` if they have images,
    else a `NullStore`."""
    if kind not in STORES:
        raise ValueError(f"Replay store must be one of {list(STORES)}, got {kind!r}")

    def make(signature: dict) -> FrameStore | CacheStore | ChunkStore | NullStore:
        return make_store(kind, Path(frames_dir), cache) if "image" in signature else NullStore()
    return make
