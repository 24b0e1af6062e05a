"""TensorFlow's thread pools, recorded in each checkpoint and pinned on resume.

Eigen and oneDNN split a reduction (a matmul's inner sum, a gradient sum) by the intra-op thread
count, so a different count can round differently and a resumed run drift from the run it
continues. The counts the run used are saved with every checkpoint; a resume whose default
counts differ (another machine, another CPU affinity) pins TensorFlow to the recorded ones, with a
warning. Pinning must happen before TensorFlow's runtime starts (before the first op).
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

__all__ = ["current_threads", "pin_threads"]


def _default_count() -> int:
    """TensorFlow's default pool size: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def current_threads() -> dict[str, int]:
    """The intra- and inter-op pool sizes TensorFlow uses (0 = its default, resolved)."""
    import tensorflow as tf
    threading = tf.config.threading
    return {"intra_op": threading.get_intra_op_parallelism_threads() or _default_count(),
            "inter_op": threading.get_inter_op_parallelism_threads() or _default_count()}


def pin_threads(recorded: Mapping[str, int] | None) -> None:
    """Make TensorFlow use the `recorded` pool sizes when they differ from this process's; warns.
    None (a checkpoint without them, or a fresh run): nothing to pin."""
    if not recorded:
        return
    import tensorflow as tf
    now = current_threads()
    wanted = {k: int(recorded[k]) for k in ("intra_op", "inter_op") if k in recorded}
    if all(now[k] == v for k, v in wanted.items()):
        return
    try:
        if "intra_op" in wanted:
            tf.config.threading.set_intra_op_parallelism_threads(wanted["intra_op"])
        if "inter_op" in wanted:
            tf.config.threading.set_inter_op_parallelism_threads(wanted["inter_op"])
    except RuntimeError:  # the runtime already runs (TensorFlow used earlier in this process)
        print(f"resume: warning: TensorFlow thread pools {now} differ from the checkpoint's {wanted} and "
              f"can no longer be changed; sums may round differently from the run before",
              file=sys.stderr, flush=True)
        return
    print(f"resume: warning: pinned TensorFlow thread pools to the checkpoint's {wanted} (this process "
          f"would use {now}), so sums reduce in the same order as before the resume",
          file=sys.stderr, flush=True)
