"""The episode format and its files.

An episode is a dict of numpy arrays with T+1 entries along the first axis (the reset entry plus
T transitions): ``action`` float32 [T+1, A], ``reward`` and ``discount`` float32 [T+1], and at
least one observation: ``image`` uint8 [T+1, H, W, C] and/or ``state`` float32 [T+1, S]
(`check_episode`). An episode without ``image`` (an agent learning from proprioceptive states)
has no ``image.npy`` in its file.

Every episode is one file named ``{index:08d}-{uuid8}-{T}.npz`` (index = insertion order, so
file name order is insertion order), in one of two forms: a plain compressed ``.npz`` (every
array a deflated ``.npy``; written by the ``frames`` and ``cache`` stores and by earlier
versions), or a chunked file (`dreamer_tf.data.chunks`: the same zip, small arrays deflated,
images as separately compressed chunks of frames with an index; written by the ``chunks``
store). `load_episode` reads both. Files are written atomically by
`dreamer_tf.utils.atomic_write_bytes`: a hidden temp file ``.{name}.tmp*`` beside the target is
written, fsynced and renamed into place, so a crash never leaves a partial ``*.npz``. A crash
between write and rename leaves the hidden temp file; `remove_temp_files` deletes those (the
replay does it when it opens a directory).
"""
from __future__ import annotations

import io
import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dreamer_tf.data import chunks
from dreamer_tf.utils import atomic_write_bytes

__all__ = [
    "EpisodeError", "REQUIRED_KEYS", "OBSERVATION_KEYS", "OPTIONAL_KEYS", "check_episode",
    "check_signature", "episode_length",
    "episode_paths", "save_episode", "load_episode",
]

REQUIRED_KEYS = ("action", "reward", "discount")
# An episode holds at least one of these; each alone is optional.
OBSERVATION_KEYS = ("image", "state")
OPTIONAL_KEYS = OBSERVATION_KEYS
# Expected dtype and rank (including the time axis) of every episode key.
SPEC = {
    "image": (np.uint8, 4),
    "action": (np.float32, 2),
    "reward": (np.float32, 1),
    "discount": (np.float32, 1),
    "state": (np.float32, 2),
}
NAME_RE = re.compile(r"^(\d{8,})-([0-9a-f]{8})-(\d+)\.npz$")
# Hidden temp files of interrupted writes: ".{name}.tmp{pid}" (utils) and ".{name}.{uuid}.tmp"
# (written by earlier versions; old run directories may hold them).
_TEMP_GLOB = ".*.tmp*"


class EpisodeError(ValueError):
    """An episode (in memory or on disk) that does not follow the episode format."""


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

def check_keys(keys: list[str], where: str) -> None:
    """Raise `EpisodeError` if required keys are missing, no observation key is present or unknown
    keys are present."""
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise EpisodeError(f"{where} is missing key(s) {missing}; it has {sorted(keys)}")
    if not any(k in keys for k in OBSERVATION_KEYS):
        raise EpisodeError(f"{where} has no observation key (one of {list(OBSERVATION_KEYS)} is "
                           f"required); it has {sorted(keys)}")
    unknown = sorted(set(keys) - set(SPEC))
    if unknown:
        raise EpisodeError(f"{where} has unknown key(s) {unknown}; allowed: {list(SPEC)}")


def check_episode(episode: Mapping[str, Any]) -> int:
    """Validate an episode dict against the shared format; return its length T+1.

    Raises `EpisodeError` naming the offending key, its dtype/shape and what is expected.
    """
    if not isinstance(episode, Mapping):
        raise EpisodeError(f"episode must be a dict of numpy arrays, got {type(episode).__name__}")
    check_keys(list(episode), "episode")
    lengths = {}
    for key, value in episode.items():
        dtype, ndim = SPEC[key]
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
    length = lengths["action"]
    if length < 2:
        raise EpisodeError(f"episode has length {length}; it needs the reset entry plus >= 1 step")
    for key in OBSERVATION_KEYS:
        if key in episode and min(episode[key].shape[1:]) < 1:
            raise EpisodeError(f"episode key {key!r} has empty entries of shape {episode[key].shape[1:]}")
    for key in ("action", "reward", "state"):
        if key in episode and not np.all(np.isfinite(episode[key])):
            raise EpisodeError(f"episode key {key!r} contains NaN or inf")
    discount = episode["discount"]
    if np.any((discount < 0) | (discount > 1)) or not np.all(np.isfinite(discount)):
        raise EpisodeError("episode key 'discount' has values outside [0, 1]")
    return length


def episode_signature(arrays: Mapping[str, np.ndarray], image_shape: tuple[int, ...] | None) -> dict:
    """Per-step shape of every key (`image_shape` given apart: images may not be loaded; None =
    the episode has no images)."""
    signature = {k: tuple(v.shape[1:]) for k, v in arrays.items() if k != "image"}
    if image_shape is not None:
        signature["image"] = tuple(image_shape[1:])
    return signature


def check_signature(signature: dict, expected: dict | None, source: str) -> dict:
    """Return `signature` if it equals `expected` (None = anything goes); else raise a one-line
    `EpisodeError` naming the keys that are missing, extra or of another per-step shape."""
    if expected is None or signature == expected:
        return signature
    differing = sorted(k for k in set(signature) | set(expected) if signature.get(k) != expected.get(k))
    has, holds = ({k: sig.get(k, "absent") for k in differing} for sig in (signature, expected))
    raise EpisodeError(f"{source} differs from this replay's episodes in key(s) {differing}: it has "
                       f"{has}, the replay holds {holds}")


def episode_length(episode: Mapping[str, np.ndarray]) -> int:
    """Number of transitions T of an episode (its arrays hold T+1 entries)."""
    return len(episode["action"]) - 1


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def episode_paths(directory: str | os.PathLike) -> list[Path]:
    """All episode files of `directory` in insertion (file name) order; temp files excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.npz") if not p.name.startswith("."))


def remove_temp_files(directory: Path) -> None:
    """Delete the hidden temp files that interrupted writes left in `directory`."""
    for tmp in directory.glob(_TEMP_GLOB):
        tmp.unlink(missing_ok=True)


def write_npz(path: Path, episode: Mapping[str, np.ndarray]) -> None:
    # Compressed in memory: an episode is a few MB, and the write stays one atomic call.
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **episode)
    atomic_write_bytes(path, buffer.getvalue())


def write_chunked(path: Path, episode: Mapping[str, np.ndarray]) -> None:
    """Write `episode` (with images) atomically as a chunked file (`dreamer_tf.data.chunks`)."""
    atomic_write_bytes(path, chunks.encode(episode))


def next_index(directory: Path) -> int:
    """One past the largest episode index in `directory` (0 if it holds none)."""
    indices = [int(m.group(1)) for p in episode_paths(directory) if (m := NAME_RE.match(p.name))]
    return max(indices, default=-1) + 1


def episode_name(index: int, length: int) -> str:
    """File name of the episode number `index` with `length` transitions."""
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
        index = next_index(directory)
    path = directory / episode_name(index, episode_length(episode))
    write_npz(path, episode)
    return path


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

def read_npy_header(fileobj) -> tuple[tuple[int, ...], np.dtype, int]:
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


def one_line(error: BaseException) -> str:
    """`error` as one line: its type and its message's lines joined (zipfile and numpy messages
    may span lines)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _open_npz(path: Path, fileobj) -> "np.lib.npyio.NpzFile":
    try:
        npz = np.load(fileobj, allow_pickle=False)
    except Exception as e:  # a damaged zip raises many kinds: NotImplementedError('zip file
        # version 6.5'), struct.error, BadZipFile, UnicodeDecodeError, ...; all are the file's problem
        raise EpisodeError(f"episode file {path} cannot be opened: {one_line(e)}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise EpisodeError(f"episode file {path} is not an .npz archive")
    return npz


def load_parts(path: Path, with_images: bool) -> tuple[dict[str, np.ndarray], tuple[int, ...] | None]:
    """Read and validate an episode file.

    Returns the arrays (images only if `with_images`) and the image array shape (from the
    `.npy` header, so the images need not be decompressed; None if the episode has no images).
    """
    path = Path(path)
    try:
        return _load_parts(path, with_images)
    except (EpisodeError, OSError):  # OSError: open() failed (e.g. too many open files): not the data
        raise
    except Exception as e:  # whatever a damaged file's content raises is that file's problem, in one line
        raise EpisodeError(f"episode file {path} cannot be read: {one_line(e)}") from None


def _load_parts(path: Path, with_images: bool) -> tuple[dict[str, np.ndarray], tuple[int, ...] | None]:
    # Open the file ourselves: np.load leaks the handle when the zip is unreadable.
    with open(path, "rb") as fileobj, _open_npz(path, fileobj) as npz:
        chunked = chunks.is_chunked(npz.files)
        names = [k for k in npz.files if k not in (chunks.IMAGE_MEMBER, chunks.INDEX_MEMBER)]
        keys = sorted(names + ["image"] if chunked else names)
        check_keys(keys, f"episode file {path}")
        arrays = {}
        try:
            for key in names:
                if key != "image" or with_images:
                    arrays[key] = npz[key]
            image_shape = None
            if chunked:
                image_shape, image_dtype = tuple(chunks.read_meta(npz.zip)["shape"]), np.dtype(np.uint8)
            elif "image" in keys:
                with npz.zip.open("image.npy") as f:
                    image_shape, image_dtype, _ = read_npy_header(f)
        except EpisodeError:
            raise
        except Exception as e:  # zlib.error, BadZipFile (CRC), ValueError, EOFError, ChunkError, ...
            raise EpisodeError(f"episode file {path} is corrupt: {one_line(e)}") from None
    if chunked and with_images:
        try:
            arrays["image"] = chunks.decode_all(path, verify=True)
        except (chunks.ChunkError, OSError) as e:
            raise EpisodeError(f"episode file {path} is corrupt: {' '.join(str(e).split())}") from None
    if image_shape is not None:
        if image_dtype != np.uint8:
            raise EpisodeError(f"episode file {path}: key 'image' has dtype {image_dtype}, expected uint8")
        image_shape = tuple(image_shape)
    # Validate with a placeholder for skipped images: only its dtype/shape are checked.
    checked = dict(arrays)
    if image_shape is not None and "image" not in checked:
        checked["image"] = np.lib.stride_tricks.as_strided(
            np.zeros((), np.uint8), shape=image_shape, strides=(0,) * len(image_shape))
    try:
        check_episode(checked)
    except EpisodeError as e:
        raise EpisodeError(f"episode file {path}: {e}") from None
    m = NAME_RE.match(path.name)
    steps = episode_length(arrays)
    if m and int(m.group(3)) != steps:
        raise EpisodeError(
            f"episode file {path}: name says length {m.group(3)} but it holds {steps} steps")
    return arrays, image_shape


def load_episode(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load and validate one episode file; raises `EpisodeError` naming the file if it is bad."""
    arrays, _ = load_parts(Path(path), with_images=True)
    return arrays
