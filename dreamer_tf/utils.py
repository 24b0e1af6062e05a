"""Small shared helpers: atomic file writes, write errors that name their file, quiet TensorFlow."""
from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def cpu_model_and_flags() -> tuple[str | None, set[str]]:
    """The CPU's model name and its flags from /proc/cpuinfo (None and an empty set where unreadable)."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip() and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model, flags


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: no bfloat16 kernels.
_NO_BF16_ISAS = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
# TensorFlow turns oneDNN on by itself (TF_ENABLE_ONEDNN_OPTS unset) only on CPUs with one of these.
_ONEDNN_DEFAULT_FLAGS = {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile"}


def bf16_unsupported_on(flags: set[str], environ: dict, gpus: int) -> str | None:
    """Why mixed bfloat16 cannot train on a machine with these CPU `flags`, environment and number
    of visible GPUs, or None; a function of its arguments alone (TensorFlow-free, so the CLI can
    refuse before TensorFlow starts, and tests can pose as any CPU). With oneDNN on, TensorFlow's
    bfloat16 convolutions fail ("could not create a primitive descriptor") unless the CPU has
    AVX512_BF16 or AMX-BF16 and ONEDNN_MAX_CPU_ISA does not cap oneDNN below them
    (results/bench_bf16/). A GPU, or oneDNN off (slow Eigen kernels), is fine. Empty `flags`
    (unknown CPU): let TensorFlow try."""
    if gpus:
        return None
    opts = str(environ.get("TF_ENABLE_ONEDNN_OPTS", "")).strip().lower()
    onednn = opts in ("1", "true") if opts else bool(flags & _ONEDNN_DEFAULT_FLAGS)
    if not onednn:
        return None
    cap = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if cap in _NO_BF16_ISAS:
        return f"ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN without bfloat16 kernels"
    if flags and not flags & {"avx512_bf16", "amx_bf16"}:
        return "this CPU has neither AVX512_BF16 nor AMX-BF16, which oneDNN's bfloat16 convolutions need"
    return None


def git_commit(root: str | os.PathLike) -> str:
    """The short commit of the checkout at `root`, "+dirty" when tracked files changed; "unknown"
    outside git (results name the code that made them)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() or dirty.returncode else "")


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
    except OSError as e:  # a full disk or an I/O error: leave no half-written temp file behind
        tmp.unlink(missing_ok=True)
        if e.errno is not None and e.filename in (None, str(tmp)):  # name the caller's file, not the temp file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


# Write errors that stop a run with one line: disk full, quota, I/O error, read-only, file too large.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


class PathError(ValueError):
    """A path given by the user that cannot be created or written (a one-line message)."""


def free_space(path: str | os.PathLike) -> str:
    """'1.2 MB free of 64.0 MB' for the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MB free of {usage.total / 2**20:.1f} MB"


def describe_write_error(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line: what failed, on which file, and the free space there."""
    path = path or error.filename or "?"
    reason = error.strerror or os.strerror(error.errno or 0) or type(error).__name__
    return f"{reason} writing {path} ({free_space(path)})"


def make_dir(path: str | os.PathLike, what: str) -> Path:
    """Create directory `path` (with parents) and check that a file can be written in it; raise
    PathError naming `what` (e.g. '--logdir') otherwise, so the user sees one line, not a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PathError(f"{what} {path} cannot be created: {e.strerror or e}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PathError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


# Error-level lines TensorFlow logs that are harmless here and that TF_CPP_MIN_LOG_LEVEL=2 does not hide.
HARMLESS_TF_LINES = (
    b"oneDNN supports DT_INT32 only on platforms with AVX-512",  # oneDNN on: int32 ops fall back to Eigen
    b"oneDNN supports DT_HALF only on platforms with AVX-512",  # float16 on an AVX2 CPU: Eigen's kernels
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
