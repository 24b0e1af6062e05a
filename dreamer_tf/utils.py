"""Small shared helpers: atomic file writes."""
from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, fsync it, then rename it over `path`: readers see
    the old file or the whole new one, never part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or an I/O error: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


# Error-level lines TensorFlow logs that are harmless here and that TF_CPP_MIN_LOG_LEVEL=2 does not hide.
HARMLESS_TF_LINES = (
    b"oneDNN supports DT_INT32 only on platforms with AVX-512",  # oneDNN on: int32 ops fall back to Eigen
)
_TF_LOG_PREFIX = re.compile(rb"^[IWEF]\d{4}")


def import_tensorflow_quietly():
    """Import TensorFlow (+ TFP) with its C++ start-up log lines (oneDNN notes, CUDA probing)
    held back: they ignore TF_CPP_MIN_LOG_LEVEL because they are written before absl logging is
    initialised, and bury the messages users need. They are replayed if the import fails, and
    shown as usual with DREAMER_TF_VERBOSE=1. Afterwards the lines in HARMLESS_TF_LINES, which TF
    logs at error level later (at the first graph run), are dropped from this process's stderr."""
    import tempfile
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ.get("DREAMER_TF_VERBOSE") or "tensorflow" in sys.modules:
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
            import tensorflow_probability  # noqa: F401  (its import checks print too)
            tf.config.list_physical_devices()  # the CUDA probe logs here
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    filter_stderr(HARMLESS_TF_LINES)
    return tf


_stderr_filter: tuple[int, threading.Thread] | None = None


def filter_stderr(patterns: tuple[bytes, ...]) -> None:
    """Drop whole lines containing any of `patterns` from file descriptor 2 (C++ logs included), for
    the rest of the process. Other output passes through at once, partial lines too (progress bars),
    except a line that starts like a TensorFlow log line, which waits for its end to be judged."""
    global _stderr_filter
    if _stderr_filter is not None:
        return
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    target = os.dup(2)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # Python's own stderr writes go straight to the real stream (so a progress bar still sees a
    # terminal); only what the C++ runtime and child processes write to fd 2 passes the filter.
    sys.stderr = open(os.dup(target), "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                      errors="backslashreplace")

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = [line + b"\n" for line in lines if not any(p in line for p in patterns)]
            if pending and not _TF_LOG_PREFIX.match(pending):
                out.append(pending)
                pending = b""
            if out:
                os.write(target, b"".join(out))
        if pending:
            os.write(target, pending)
        os.close(read_fd)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    _stderr_filter = (target, thread)
    atexit.register(_stop_stderr_filter)


def _stop_stderr_filter() -> None:
    """Restore fd 2 (the pipe's last writer in this process closes) and let the pump drain it."""
    global _stderr_filter
    if _stderr_filter is None:
        return
    target, thread = _stderr_filter
    _stderr_filter = None
    sys.stderr.flush()
    os.dup2(target, 2)
    thread.join(timeout=2.0)
