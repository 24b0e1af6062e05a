"""`dreamer-tf bench`: time the train step, the policy step and the environments on this machine.

Train steps are timed after tracing (median of several), on a synthetic batch, for each preset and
variant (float32, XLA, float16 where supported). Achieved GFLOP/s use the analytic count of
`dreamer_tf.flops` and are set beside the measured float32 matmul peak of this machine.
Writes `results/bench.json` and `results/bench.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def machine_info() -> dict:
    """What makes speeds comparable: the CPU and its vector ISA, oneDNN on or off (and an ISA cap),
    TensorFlow's thread pools and how busy the machine was when the benchmark started."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    cpu, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    gpus = [d.name for d in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags],
            "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count(),
            "load_average": os.getloadavg()[0], "gpus": gpus, "tensorflow": tf.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured float32 GFLOP/s of a large matmul (the achievable peak for dense layers)."""
    import tensorflow as tf
    a = tf.random.normal([n, n])
    b = tf.random.normal([n, n])

    @tf.function
    def mm(a, b):
        return tf.reduce_sum(tf.linalg.matmul(a, b))

    mm(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def synthetic_batch(config, actions: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = (config.batch_size, config.batch_length)
    return {
        "image": rng.integers(0, 256, shape + (config.size, config.size, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, shape + (actions,)).astype(np.float32),
        "reward": rng.normal(size=shape).astype(np.float32),
        "discount": np.ones(shape, np.float32),
    }


class _Box:
    def __init__(self, shape, low=-1.0, high=1.0, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), dtype
        self.low, self.high = np.full(shape, low, np.float32), np.full(shape, high, np.float32)


def build_agent(config, actions: int = 6):
    from dreamer_tf.agent import Dreamer
    obs_space = {"image": _Box((config.size, config.size, 3), 0, 255, np.uint8)}
    return Dreamer(config, obs_space, _Box((actions,)))


def time_train_step(config, repeats: int = 3, actions: int = 6) -> dict:
    """Seconds per train step after tracing (median of `repeats`), and the first-call time."""
    agent = build_agent(config, actions)
    batch = synthetic_batch(config, actions)
    start = time.perf_counter()
    agent.train(batch)
    first = time.perf_counter() - start
    times = []
    cpu_start, wall_start = _cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        metrics = agent.train(batch)
        times.append(time.perf_counter() - start)
    cores_busy = (_cpu_seconds() - cpu_start) / (time.perf_counter() - wall_start)
    return {"seconds": statistics.median(times), "all_seconds": times, "first_call_seconds": first,
            "cores_busy": cores_busy, "finite": bool(np.isfinite(metrics["model_loss"]))}


def _cpu_seconds() -> float:
    """CPU seconds of this process, all threads (cores busy = CPU seconds / wall seconds)."""
    t = os.times()
    return t.user + t.system


def time_policy_step(config, num_envs: int = 1, repeats: int = 50, actions: int = 6) -> dict:
    agent = build_agent(config, actions)
    obs = {"image": np.zeros((num_envs, config.size, config.size, 3), np.uint8),
           "reset": np.ones(num_envs, bool)}
    action, state = agent.policy(obs, None, True)
    obs["reset"][:] = False
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action, state = agent.policy(obs, state, True)
        np.asarray(action)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "steps_per_second": num_envs / statistics.median(times)}


def run(presets: Sequence[str], variants: Sequence[str], repeats: int, envs: bool, out: Path) -> dict:
    from dreamer_tf.utils import import_tensorflow_quietly
    tf = import_tensorflow_quietly()
    from dreamer_tf import config as configlib
    from dreamer_tf.study.flops import train_step_flops
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    results = {"machine": machine_info(), "matmul_gflops": matmul_peak(), "train_step": [], "policy": []}
    print(f"matmul peak: {results['matmul_gflops']:.1f} GFLOP/s", flush=True)
    for preset in presets:
        for variant in variants:
            # float16 and bf16 run on the CPU too (float16 emulated; bf16 native only with AVX512_BF16/AMX).
            overrides = {"float16": {"precision": 16}, "bf16": {"precision": "bf16"}, "xla": {"jit": True},
                         "float32": {}}[variant]
            config = configlib.load(preset, overrides)
            flops = train_step_flops(config)["total"]
            timing = time_train_step(config, repeats=repeats)
            row = {"preset": preset, "variant": variant, "device": "GPU" if has_gpu else "CPU",
                   "gflop": flops / 1e9, "gflops_per_second": flops / timing["seconds"] / 1e9,
                   "fraction_of_matmul_peak": flops / timing["seconds"] / 1e9 / results["matmul_gflops"],
                   **timing}
            results["train_step"].append(row)
            print(f"{preset:6s} {variant:8s} {timing['seconds']:8.2f} s/step  "
                  f"{row['gflops_per_second']:6.1f} GFLOP/s", flush=True)
        results["policy"].append({"preset": preset, **time_policy_step(configlib.load(preset))})
    if envs:
        from dreamer_tf.envs import bench as env_bench
        results["envs"] = {task: env_bench.env_throughput(task, steps=300, seed=0, workers=2)
                           for task in ("dmc_walker_walk",)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# dreamer_tf benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, GPUs: {', '.join(m['gpus']) or 'none'}; "
             f"TensorFlow {m['tensorflow']}, Python {m['python']}.", "",
             f"Vector ISA: {', '.join(m.get('isa', [])) or 'unknown'}; oneDNN {'on' if m.get('onednn') else 'off'}"
             f" (ONEDNN_MAX_CPU_ISA {m.get('onednn_max_cpu_isa', 'unset')}); TensorFlow threads: "
             f"{m.get('intra_op_threads', '?')} intra-op, {m.get('inter_op_threads', '?')} inter-op; "
             f"load average at the start {m.get('load_average', float('nan')):.1f}.", "",
             f"Measured float32 matmul peak (2048x2048), in the same run: **{results['matmul_gflops']:.1f} GFLOP/s**.", "",
             "| preset | variant | device | s/step (median) | first call s | GFLOP/step | GFLOP/s | % of matmul peak | cores busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["train_step"]:
        lines.append(f"| {r['preset']} | {r['variant']} | {r['device']} | {r['seconds']:.2f} | "
                     f"{r['first_call_seconds']:.1f} | {r['gflop']:.0f} | {r['gflops_per_second']:.1f} | "
                     f"{100 * r['fraction_of_matmul_peak']:.0f}% | {r.get('cores_busy', float('nan')):.2f} |")
    lines += ["", "| preset | policy step (1 env) ms | policy steps/s |", "|---|---|---|"]
    for r in results["policy"]:
        lines.append(f"| {r['preset']} | {1000 * r['seconds']:.1f} | {r['steps_per_second']:.1f} |")
    if results.get("envs"):
        lines += ["", "Environment agent steps per second (action repeat 2, 64x64 pixels); "
                  "`results/envs_bench.md` has the full measurement with pixel differences:", "",
                  "```", json.dumps(results["envs"], indent=1), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dreamer-tf bench", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--variants", nargs="+", default=["float32", "xla", "float16"],
                        choices=["float32", "xla", "float16", "bf16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-envs", action="store_true", help="skip the environment benchmark")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--markdown-only", action="store_true", help="rewrite bench.md from bench.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        (args.out / "bench.md").write_text(markdown(json.loads((args.out / "bench.json").read_text())))
        return 0
    run(args.presets, args.variants, args.repeats, not args.no_envs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
