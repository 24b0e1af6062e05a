"""Where the train step's time goes: profile N compiled train steps and write results/profile.md.

    python scripts/profile_step.py --preset cpu [--set key=value ...] [--steps 3] [--out results] [--append]

Runs TensorFlow's profiler (host tracer) on `Dreamer.train` with a synthetic batch after warm-up,
parses the written trace and writes a section with the step wall time, the time per op kind, per
part of the model (encoder, observe loop, decoder, heads, imagination, gradients, optimiser,
other) and the oneDNN vs Eigen share. `--append` adds the section to an existing profile.md.

Kernel choice is fixed when TensorFlow loads: set the environment before the run, e.g.
    ONEDNN_MAX_CPU_ISA=AVX2 python scripts/profile_step.py --preset cpu --append
    TF_ENABLE_ONEDNN_OPTS=0 python scripts/profile_step.py --preset cpu --append
The values in effect are printed in the section. See `dreamer_tf.study.profile` for how the trace
is read and how op names map to parts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Before importing dreamer_tf, which defaults TF_ENABLE_ONEDNN_OPTS to 1: what the user set.
ENV_KEYS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")
ENV_AT_START = {k: os.environ.get(k, "unset") for k in ENV_KEYS}

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamer_tf.study import profile  # noqa: E402

assert tuple(ENV_KEYS) == tuple(profile.ENV_KEYS), "keep ENV_KEYS in step with dreamer_tf.study.profile"

if __name__ == "__main__":
    sys.exit(profile.main(env_at_start=ENV_AT_START))
