"""Where the replay's images live: the frame store (default) and the LRU cache store.

A paper run stores ~2.5M frames (30 GB of uint8 images), so images are not kept in RAM. The
small arrays (action, reward, discount, state) of every episode are, 4 bytes per float per step
(~80 MB for a paper run, see `EpisodeEntry`). Images are read by one of two stores, chosen by
``Replay(store=...)``:

* ``"frames"`` (`FrameStore`): an uncompressed frame store, one raw ``.npy`` per episode,
  written on ``add`` and rebuilt from the ``.npz`` files for episodes missing it. A sampled
  window is read with one ``preadv`` straight into the batch array. Pages live in the kernel's
  page cache (shared, reclaimable, not in the process RSS), so the process memory grows only
  with the small arrays. The cost is disk: 12 KiB per 64x64x3 frame on top of the compressed
  ``.npz`` (~30 GB for a paper run; see ``Replay(frames_dir=...)``).
* ``"cache"`` (`CacheStore`): an LRU cache of decoded episode images bounded by ``cache``
  frames; a miss decompresses the whole image array of that episode from its ``.npz``. No extra
  disk, but once the replay outgrows the cache almost every sequence is a miss.

``results/replay_memory.md`` (made by ``scripts/bench_replay.py``) measures both: memory and
batches per second against the replay size; it is why ``"frames"`` is the default. Pread is
used instead of keeping one ``mmap`` per episode because every mapping holds a file descriptor
(thousands of episodes) and mapped pages count in the RSS.

Episodes without images (``state`` observations only) get a `NullStore`: no frame files, no
directory, no cache. The replay makes its store when the first episode fixes its keys
(`store_factory`), so the ``"frames"`` directory is created only for episodes with images.

A store has four methods: ``attach`` (an episode became sampleable, maybe with its images in
hand), ``read`` (fill a window of frames), ``remove`` (the episode left the replay) and
``cleanup`` (drop leftovers of episodes that are gone), and a ``frames`` count of decoded
frames held in RAM.
"""
from __future__ import annotations

import collections
import io
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dreamer_tf.data.episodes import (
    EpisodeError,
    load_episode,
    read_npy_header,
    remove_temp_files,
)
from dreamer_tf.utils import atomic_write_bytes

logger = logging.getLogger(__name__)


class EpisodeEntry:
    """What the replay keeps in RAM per episode: the small arrays and where the images live."""

    __slots__ = ("path", "length", "small", "frames_path", "frames_offset")

    def __init__(self, path: Path, length: int, small: dict[str, np.ndarray]):
        self.path = path
        self.length = length  # entries (T+1)
        self.small = small
        self.frames_path: Path | None = None
        self.frames_offset = 0


class FrameStore:
    """Uncompressed per-episode `.npy` image files read with `preadv` (page cache, not RSS)."""

    frames = 0  # decoded frames held in RAM: none

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


STORES = ("frames", "cache")


def make_store(kind: str, frames_dir: Path, cache: int) -> FrameStore | CacheStore:
    """The image store `kind` ("frames" or "cache")."""
    if kind == "frames":
        return FrameStore(frames_dir)
    if kind == "cache":
        return CacheStore(cache)
    raise ValueError(f"Replay store must be 'frames' or 'cache', got {kind!r}")


def store_factory(kind: str, frames_dir: str | os.PathLike, cache: int
                  ) -> Callable[[dict], FrameStore | CacheStore | NullStore]:
    """Validate `kind` now (nothing is created); the returned function makes the store for the
    episodes of a signature (key -> per-step shape): the image store `kind` if they have images,
    else a `NullStore`."""
    if kind not in STORES:
        raise ValueError(f"Replay store must be 'frames' or 'cache', got {kind!r}")

    def make(signature: dict) -> FrameStore | CacheStore | NullStore:
        return make_store(kind, Path(frames_dir), cache) if "image" in signature else NullStore()
    return make
