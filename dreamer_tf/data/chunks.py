"""The chunked episode file: one copy of an episode, images in compressed chunks with an index.

The file is still a zip named ``{index:08d}-{uuid8}-{T}.npz`` (so names, insertion order, the
checkpoint's ``last_episode`` and `np.load` of the small arrays all work as before), holding:

* ``action.npy``, ``reward.npy``, ``discount.npy`` [, ``state.npy``]: deflated, as in the plain
  `.npz`; they are read once when the replay opens the file.
* ``image.chunks.json``: ``{"version", "codec", "level", "chunk", "shape", "offsets"}``: the
  image array's shape, frames per chunk and the byte offset of every chunk in the payload
  (``len(offsets) == chunks + 1``).
* ``image.chunks``: a *stored* (uncompressed) zip member, the concatenated chunks. Chunk ``c``
  holds frames ``c*chunk .. (c+1)*chunk - 1`` (the last one may be shorter), compressed alone,
  so a window of L frames needs one ``pread`` of the chunks it overlaps and their decoding.

Codec and chunk size (`CODEC`, `LEVEL`, `CHUNK_FRAMES`) were chosen on real rendered frames of
the 20 DMC tasks (``results/replay_memory.md``): LZ4 high-compression decodes several times
faster than zstd or zlib at a ratio near zlib's. The file records codec, level and chunk, so a
later choice still reads older files.

Integrity. LZ4 blocks carry no checksum, and `read_window` reads with ``pread``, past the zip's
CRC: a flipped byte in a chunk mostly decodes, silently, to other frames (the decoder's bounds
checks and the exact decoded size catch only some, `ChunkError`). So `read_index(verify=True)`
checks the payload against the zip's own CRC-32 of the stored member once, when the replay opens a
file from disk: one sequential read of the file, no format change (files written before the check
verify the same way) and nothing added to sampling. Every other member is deflated and read
through `zipfile`, which checks its CRC. What the check catches is measured byte by byte in
``results/reliability.md`` (corruption scan); its cost in ``results/replay_memory.md``.
"""
from __future__ import annotations

import io
import json
import os
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from typing import Mapping

import lz4.block
import numpy as np

__all__ = ["ChunkError", "ChunkIndex", "CODEC", "LEVEL", "CHUNK_FRAMES", "IMAGE_MEMBER", "INDEX_MEMBER",
           "encode", "read_index", "read_window", "decode_all", "is_chunked", "payload_crc", "check_payload"]

FORMAT_VERSION = 1
CODEC = "lz4hc"
LEVEL = 9
CHUNK_FRAMES = 32
IMAGE_MEMBER = "image.chunks"
INDEX_MEMBER = "image.chunks.json"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CRC_BLOCK = 1 << 20  # bytes per read while checking a payload's CRC (zlib.crc32 releases the GIL)


class ChunkError(ValueError):
    """A chunked image payload that is malformed or does not decode."""


def _compress(data: bytes | memoryview, level: int) -> bytes:
    return lz4.block.compress(data, mode="high_compression", compression=level, store_size=False)


def _decompress(data: bytes | memoryview, size: int) -> bytes:
    try:
        out = lz4.block.decompress(data, uncompressed_size=size)
    except lz4.block.LZ4BlockError as e:
        raise ChunkError(str(e)) from None
    if len(out) != size:
        raise ChunkError(f"decoded {len(out)} bytes, expected {size}")
    return out


@dataclass(frozen=True)
class ChunkIndex:
    """Where an episode's image chunks are: what the replay keeps per episode (a few hundred bytes)."""

    data_offset: int  # file offset of the payload (the stored member's first byte)
    offsets: np.ndarray  # int64 [chunks + 1]: chunk c is payload bytes offsets[c]:offsets[c+1]
    chunk: int  # frames per chunk
    shape: tuple[int, ...]  # image array shape [T+1, H, W, C]
    crc: int = 0  # the zip's CRC-32 of the payload (`verify`)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes


def encode(episode: Mapping[str, np.ndarray], chunk: int = CHUNK_FRAMES, level: int = LEVEL) -> bytes:
    """The chunked file's bytes for `episode` (validated by the caller)."""
    images = np.ascontiguousarray(episode["image"])
    frame_bytes = images[0].nbytes
    view = memoryview(images).cast("B")
    blobs = [_compress(view[start * frame_bytes:(start + chunk) * frame_bytes], level)
             for start in range(0, len(images), chunk)]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    meta = {"version": FORMAT_VERSION, "codec": CODEC, "level": level, "chunk": chunk,
            "shape": list(images.shape), "offsets": offsets.tolist()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for key, value in episode.items():
            if key != "image":
                npy = io.BytesIO()
                np.lib.format.write_array(npy, np.ascontiguousarray(value))
                zf.writestr(f"{key}.npy", npy.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr(INDEX_MEMBER, json.dumps(meta), compress_type=zipfile.ZIP_STORED)
        zf.writestr(IMAGE_MEMBER, b"".join(blobs), compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


def is_chunked(names: list[str]) -> bool:
    """Whether a zip with member `names` is a chunked episode file."""
    return IMAGE_MEMBER in names


def read_meta(zf: zipfile.ZipFile) -> dict:
    """The index member of an open chunked file, checked; `ChunkError` if it is malformed."""
    try:
        meta = json.loads(zf.read(INDEX_MEMBER))
        shape, offsets, chunk = tuple(meta["shape"]), meta["offsets"], int(meta["chunk"])
    except (KeyError, TypeError, ValueError) as e:
        raise ChunkError(f"unreadable {INDEX_MEMBER}: {type(e).__name__}: {e}") from None
    if meta.get("codec") != CODEC or meta.get("version") != FORMAT_VERSION:
        raise ChunkError(f"unsupported codec/version {meta.get('codec')!r}/{meta.get('version')!r}")
    if len(shape) != 4 or chunk < 1 or len(offsets) != -(-shape[0] // chunk) + 1:
        raise ChunkError(f"{INDEX_MEMBER} has shape {list(shape)}, chunk {chunk} and {len(offsets)} offsets")
    return meta


def payload_crc(fd: int, offset: int, size: int) -> int:
    """CRC-32 (the zip's) of `size` bytes at `offset` of open file `fd`; `ChunkError` if the file
    ends before them or a read fails (EIO: a bad sector is this file's problem)."""
    crc, done = 0, 0
    while done < size:
        try:
            block = os.pread(fd, min(_CRC_BLOCK, size - done), offset + done)
        except OSError as e:
            raise ChunkError(f"payload unreadable at byte {done}: {e}") from None
        if not block:
            raise ChunkError(f"payload truncated: {done} of {size} bytes")
        crc = zlib.crc32(block, crc)
        done += len(block)
    return crc


def read_index(path: str | os.PathLike, verify: bool = False) -> ChunkIndex | None:
    """The index of a chunked episode file; None if the file is a plain `.npz` (images as
    ``image.npy``). `ChunkError` if it is chunked but malformed, whatever the damage, or
    (`verify`) its image payload does not match the zip's CRC-32 of it: one read of the payload.
    OSError only if the file cannot be opened."""
    with open(path, "rb") as f:
        try:
            index = _read_index(f)
        except ChunkError:
            raise
        except Exception as e:  # BadZipFile, NotImplementedError, struct.error, ...: a damaged zip
            raise ChunkError(f"unreadable zip: {type(e).__name__}: {' '.join(str(e).split())}") from None
        if index is not None and verify:
            check_payload(f.fileno(), index)
    return index


def _read_index(f) -> ChunkIndex | None:
    with zipfile.ZipFile(f) as zf:
        if not is_chunked(zf.namelist()):
            return None
        meta = read_meta(zf)
        info = zf.getinfo(IMAGE_MEMBER)
    if info.compress_type != zipfile.ZIP_STORED:
        raise ChunkError(f"{IMAGE_MEMBER} is compressed by the zip; it must be stored")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        raise ChunkError(f"file ends inside the local header of {IMAGE_MEMBER}")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        raise ChunkError(f"bad local header of {IMAGE_MEMBER}")
    offsets = np.array(meta["offsets"], np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != info.file_size:
        raise ChunkError(f"chunk offsets do not cover the {info.file_size}-byte payload")
    return ChunkIndex(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len, offsets,
                      int(meta["chunk"]), tuple(meta["shape"]), info.CRC)


def check_payload(fd: int, index: ChunkIndex) -> None:
    """`ChunkError` unless the payload of the file open as `fd` matches its CRC-32."""
    if payload_crc(fd, index.data_offset, int(index.offsets[-1])) != index.crc:
        raise ChunkError(f"{IMAGE_MEMBER} fails its CRC-32 check (damaged on disk)")


def _native_decoder():
    """LZ4's C decoder through ctypes, for decoding into a caller's buffer (no allocation, no copy)
    and stopping at the last frame a window needs (`LZ4_decompress_safe_partial`, exact since LZ4
    1.9.0). The functions come from the lz4 package's own extension (exported symbols), else the
    system's liblz4; None (the lz4 package's API is used) if neither is usable."""
    import ctypes
    import ctypes.util

    import lz4.block._block as block
    for name in (block.__file__, ctypes.util.find_library("lz4")):
        try:
            lib = ctypes.CDLL(name)  # CDLL: the GIL is released during each call
            if lib.LZ4_versionNumber() < 10900:
                continue
            safe, partial = lib.LZ4_decompress_safe, lib.LZ4_decompress_safe_partial
        except (OSError, TypeError, AttributeError):
            continue
        safe.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        partial.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        safe.restype = partial.restype = ctypes.c_int
        return safe, partial
    return None


_NATIVE = _native_decoder()
_scratch = threading.local()  # per reading thread: one chunk's decoded frames


def _decode_into(src: np.ndarray, lo: int, hi: int, dst: np.ndarray, full: int) -> None:
    """Decode compressed bytes src[lo:hi] (a chunk of `full` decoded bytes) into contiguous `dst`,
    which receives the chunk's first dst.nbytes bytes; ChunkError if they do not decode exactly."""
    want = dst.nbytes
    if _NATIVE is None:
        dst.reshape(-1)[:] = np.frombuffer(_decompress(src[lo:hi].data, full), np.uint8)[:want]
        return
    safe, partial = _NATIVE
    address = src.ctypes.data + lo
    if want == full:
        got = safe(address, dst.ctypes.data, hi - lo, want)
    else:  # stop after `want` bytes: the frames after the window are not decoded
        got = partial(address, dst.ctypes.data, hi - lo, want, want)
    if got != want:
        raise ChunkError(f"decoded {got} of {want} bytes" if got >= 0 else "malformed LZ4 block")


def read_window(fd: int, index: ChunkIndex, start: int, out: np.ndarray) -> None:
    """Fill `out` ([L, H, W, C] uint8, contiguous) with frames start..start+L-1 of the episode open
    as `fd`: one pread of the overlapped chunks, then each is decoded straight into `out` where the
    window covers its first frame (up to the window's last frame only), else (the first chunk,
    which begins before `start`) into a scratch buffer from which the frames needed are copied."""
    chunk, offsets = index.chunk, index.offsets
    stop = start + len(out)
    first, last = start // chunk, (stop - 1) // chunk
    low, high = int(offsets[first]), int(offsets[last + 1])
    data = os.pread(fd, high - low, index.data_offset + low)
    if len(data) != high - low:
        raise ChunkError(f"payload truncated: read {len(data)} of {high - low} bytes at chunk {first}")
    src = np.frombuffer(data, np.uint8)
    frame_shape = index.shape[1:]
    frame_bytes = out[0].nbytes
    for c in range(first, last + 1):
        begin = c * chunk
        frames = min(chunk, index.shape[0] - begin)
        a, b = max(start, begin), min(stop, begin + frames)
        lo, hi = int(offsets[c]) - low, int(offsets[c + 1]) - low
        try:
            if a == begin:
                _decode_into(src, lo, hi, out[a - start:b - start], frames * frame_bytes)
            else:
                scratch = getattr(_scratch, "buffer", None)
                if scratch is None or scratch.shape != (chunk,) + frame_shape:
                    scratch = _scratch.buffer = np.empty((chunk,) + frame_shape, np.uint8)
                _decode_into(src, lo, hi, scratch[:b - begin], frames * frame_bytes)
                out[a - start:b - start] = scratch[a - begin:b - begin]
        except ChunkError as e:
            raise ChunkError(f"chunk {c} is corrupt: {e}") from None


def decode_all(path: str | os.PathLike, index: ChunkIndex | None = None, verify: bool = False) -> np.ndarray:
    """The whole image array of a chunked episode file; `verify`: also check the payload's CRC-32
    (after decoding, so a chunk that does not decode is the error named)."""
    index = index or read_index(path)
    if index is None:
        raise ChunkError("the file holds no chunked images")
    out = np.empty(index.shape, np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_window(fd, index, 0, out)
        if verify:
            check_payload(fd, index)
    finally:
        os.close(fd)
    return out
