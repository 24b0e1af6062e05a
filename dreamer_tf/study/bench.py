"""`dreamer-tf bench`: time the train step, the policy step and the environments on this machine.

Train steps are timed after tracing (median of several), on a synthetic batch, for each preset and
variant (float32, XLA, float16 where supported). Achieved GFLOP/s use the analytic count of
`dreamer_tf.flops` and are set beside the measured float32 matmul peak of this machine.
Writes OUT/bench.json and OUT/bench.md, OUT being `--out` (default `bench_results/` in the current
directory, never the committed `results/`: regenerating those takes `--out results`), and says where.

With `--settings`, each oneDNN setting runs in a fresh child process (TensorFlow reads the variables
only at import), one after another, with its own matmul peak; one bench.md/bench.json holds them all.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dreamer_tf.study.bench_out import DEFAULT_OUT, check_out, rewrite_markdown, write_results
from dreamer_tf.utils import cpu_model_and_flags, git_commit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")

# What each setting fixes in its child's environment (None: removed). Every child also loses
# CLEARED_ENV: the old name of the ISA cap would override the setting, verbose mode would slow it.
SETTING_KEYS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA")
SETTINGS: dict[str, dict[str, str | None]] = {name: dict(zip(SETTING_KEYS, values, strict=True)) for name, values in {
    "onednn": ("1", None), "no-onednn": ("0", None), "avx2": ("1", "AVX2"), "avx2-no-onednn": ("0", "AVX2")}.items()}
CLEARED_ENV = ("DNNL_MAX_CPU_ISA", "ONEDNN_VERBOSE", "DNNL_VERBOSE")
# Variables that change timings: written in front of the recorded command when set.
COMMAND_ENV = SETTING_KEYS + ("DNNL_MAX_CPU_ISA", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
SETTING_FAILED = 3  # a child's exit status when its setting did not take effect


class SettingError(ValueError):
    """An unknown or repeated setting name (one line)."""


def _check_names(names: Sequence[str]) -> None:
    for name in names:
        if name not in SETTINGS:
            raise SettingError(f"unknown setting {name!r} for --settings (choose from {', '.join(SETTINGS)})")
    if len(set(names)) != len(names):
        raise SettingError(f"a setting is named twice in --settings {' '.join(names)}")


def setting_env(name: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) as setting `name` needs it in its child."""
    _check_names([name])
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in CLEARED_ENV and k not in SETTINGS[name]}
    return {**env, **{k: v for k, v in SETTINGS[name].items() if v is not None}}


def check_env(name: str, environ: Mapping[str, str]) -> str | None:
    """None if `environ` holds setting `name`'s variables; else the reason, one line."""
    for key, value in SETTINGS[name].items():
        if environ.get(key) != value:
            return f"{key} is {environ.get(key, 'unset')}, the setting needs {value or 'it unset'}"
    return next((f"{k} is set ({environ[k]}), the setting needs it unset" for k in CLEARED_ENV if k in environ), None)


def check_setting(name: str, environ: Mapping[str, str], tf_onednn: bool, onednn_isa: str | None) -> str | None:
    """None if setting `name` took effect (`environ`, TensorFlow's oneDNN flag, oneDNN's ISA); else why."""
    want, cap = SETTINGS[name]["TF_ENABLE_ONEDNN_OPTS"], SETTINGS[name]["ONEDNN_MAX_CPU_ISA"]
    if problem := check_env(name, environ):
        return problem
    if tf_onednn != (want == "1"):
        return f"TensorFlow reports oneDNN {'on' if tf_onednn else 'off'} with TF_ENABLE_ONEDNN_OPTS={want}"
    if cap is not None and onednn_isa is None:
        return f"oneDNN did not report the ISA it dispatches to, so ONEDNN_MAX_CPU_ISA={cap} is unverified"
    upper = (onednn_isa or "").upper()
    if cap is not None and not (cap in upper and "AVX-512" not in upper and "AMX" not in upper):
        return f"oneDNN reports ISA {onednn_isa!r} with ONEDNN_MAX_CPU_ISA={cap}"
    return None


def parse_onednn_isa(text: str) -> str | None:
    """The ISA from oneDNN's verbose header line `onednn_verbose,...,cpu,isa:Intel AVX2`."""
    return next((line.split(",isa:", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("onednn_verbose") and ",isa:" in line), None)


def start_isa_probe(env: Mapping[str, str]) -> subprocess.Popen:
    """One matmul (oneDNN's op, or its sgemm under Eigen with oneDNN off) with ONEDNN_VERBOSE=1, which
    prints the ISA oneDNN dispatches to; in a separate process, as verbose mode cannot be turned off."""
    code = "import tensorflow as tf; a = tf.ones([64, 64]); tf.function(lambda a: tf.linalg.matmul(a, a))(a).numpy()"
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**env, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}, text=True)


def cpu_info() -> dict:
    """The CPU model, core count and vector ISA, without importing TensorFlow."""
    cpu, flags = cpu_model_and_flags()
    return {"cpu": cpu or "unknown", "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags],
            "python": platform.python_version(), "platform": platform.platform()}


def machine_info() -> dict:
    """What makes speeds comparable: the CPU and its vector ISA, oneDNN on or off (and an ISA cap),
    TensorFlow's thread pools and how busy the machine was when the benchmark started."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port
    return {**cpu_info(), "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "unset"),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count(),
            "load_average": os.getloadavg()[0], "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "tensorflow": tf.__version__}


def provenance(argv: Sequence[str], settings: bool = False) -> dict:
    """The command (with the variables that change timings, but not those --settings fixes nor the
    default TF_ENABLE_ONEDNN_OPTS=1), the date and the commit ("+dirty": tracked files changed)."""
    env = [f"{k}={shlex.quote(v)}" for k, v in os.environ.items() if k in COMMAND_ENV
           and not (settings and k in SETTING_KEYS + CLEARED_ENV) and (k, v) != ("TF_ENABLE_ONEDNN_OPTS", "1")]
    commit = git_commit(Path(__file__).resolve().parents[2])
    return {"command": " ".join(env + ["dreamer-tf", "bench"] + [shlex.quote(a) for a in argv]),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit}


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


# Config overrides per variant. float16 and bf16 run on the CPU too (float16 emulated; bf16 native
# only with AVX512_BF16/AMX); scan/unroll: the RSSM loops as tf.scan or unrolled (same math).
VARIANTS = {"float32": {}, "xla": {"jit": True}, "float16": {"precision": 16}, "bf16": {"precision": "bf16"},
            "scan": {"unroll": False}, "unroll": {"unroll": True}}


def measure(presets: Sequence[str], variants: Sequence[str], repeats: int, matmul_size: int = 2048,
            prefix: str = "") -> dict:
    """Machine info, matmul peak, train and policy step timings in this process (no files)."""
    from dreamer_tf.utils import import_tensorflow_quietly
    tf = import_tensorflow_quietly()
    from dreamer_tf import config as configlib
    from dreamer_tf.study.flops import train_step_flops
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    results = {"machine": machine_info(), "matmul_gflops": matmul_peak(matmul_size), "matmul_size": matmul_size,
               "train_step": [], "policy": []}
    print(f"{prefix}matmul peak: {results['matmul_gflops']:.1f} GFLOP/s", flush=True)
    for preset in presets:
        for variant in variants:
            config = configlib.load(preset, VARIANTS[variant])
            flops = train_step_flops(config)["total"]
            timing = time_train_step(config, repeats=repeats)
            row = {"preset": preset, "variant": variant, "device": "GPU" if has_gpu else "CPU",
                   "gflop": flops / 1e9, "gflops_per_second": flops / timing["seconds"] / 1e9,
                   "fraction_of_matmul_peak": flops / timing["seconds"] / 1e9 / results["matmul_gflops"],
                   **timing}
            results["train_step"].append(row)
            print(f"{prefix}{preset:6s} {variant:8s} {timing['seconds']:8.2f} s/step  "
                  f"{row['gflops_per_second']:6.1f} GFLOP/s", flush=True)
        results["policy"].append({"preset": preset, **time_policy_step(configlib.load(preset))})
    return results


def _write(out: Path, results: dict, envs: bool) -> None:
    if envs:  # the environments do not use TensorFlow: measured once, in this process
        from dreamer_tf.envs import bench as env_bench
        results["envs"] = {task: env_bench.env_throughput(task, steps=300, seed=0, workers=2)
                           for task in ("dmc_walker_walk",)}
    write_results(out, results, markdown)


def run_child(setting: str, json_path: Path, presets: Sequence[str], variants: Sequence[str], repeats: int,
              matmul_size: int) -> int:
    """In one setting's child: check that the setting took effect, then measure into `json_path`."""
    problem, isa = check_env(setting, os.environ), None
    if not problem:
        probe = start_isa_probe(os.environ)  # runs while TensorFlow is imported here; done before any timing
        from dreamer_tf.utils import import_tensorflow_quietly
        import_tensorflow_quietly()
        from tensorflow.python.util import _pywrap_util_port
        tf_onednn = bool(_pywrap_util_port.IsMklEnabled())
        try:
            isa = parse_onednn_isa(probe.communicate(timeout=900)[0] or "")
        except subprocess.TimeoutExpired:
            probe.kill()
        problem = check_setting(setting, os.environ, tf_onednn, isa)
    if problem:
        print(f"dreamer-tf bench: error: setting {setting} did not take effect: {problem}", file=sys.stderr)
        return SETTING_FAILED
    print(f"[{setting}] oneDNN {'on' if tf_onednn else 'off'} as TensorFlow reports it; oneDNN ISA: {isa}", flush=True)
    results = measure(presets, variants, repeats, matmul_size, prefix=f"[{setting}] ")
    results["setting"] = {"name": setting, "env": {k: os.environ.get(k, "unset") for k in SETTING_KEYS},
                          "onednn_isa": isa}
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


def run_settings(settings: Sequence[str], presets: Sequence[str], variants: Sequence[str], repeats: int,
                 envs: bool, out: Path, argv: Sequence[str] = (), matmul_size: int = 2048) -> int:
    """Each setting in a fresh child process, one after another; one bench.md/bench.json for all.
    A setting that did not take effect gets no rows (its one-line reason is printed and recorded)."""
    _check_names(settings)
    results = {**provenance(argv, settings=True), "machine": cpu_info(), "matmul_size": matmul_size,
               "settings": [], "refused": []}
    with tempfile.TemporaryDirectory(prefix="dreamer_bench_") as tmp:
        for name in settings:
            path, env = Path(tmp) / f"{name}.json", setting_env(name)
            print(f"== setting {name}: " + " ".join(f"{k}={env.get(k, 'unset')}" for k in SETTING_KEYS), flush=True)
            proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "bench", "--presets", *presets, "--variants",
                                   *variants, "--repeats", str(repeats), "--matmul-size", str(matmul_size),
                                   "--no-envs", "--child-setting", name, "--child-json", str(path)],
                                  env=env, stderr=subprocess.PIPE, text=True, errors="replace")
            if proc.returncode == 0 and path.exists():
                results["settings"].append({"name": name, **json.loads(path.read_text())})
                continue
            lines = [line for line in proc.stderr.splitlines() if line.strip()] or ["no message"]
            reason = lines[-1] if proc.returncode == SETTING_FAILED else \
                f"dreamer-tf bench: error: setting {name} failed (exit status {proc.returncode}): {lines[-1]}"
            if proc.returncode != SETTING_FAILED:  # a crash: its traceback, then the one line
                sys.stderr.write("\n".join(lines[-30:]) + "\n")
            print(reason, file=sys.stderr, flush=True)
            results["refused"].append({"name": name, "reason": reason})
    if not results["settings"]:
        print("dreamer-tf bench: error: no setting was measured; nothing written", file=sys.stderr)
        return 1
    _write(out, results, envs)
    return 1 if results["refused"] else 0


# --------------------------------------------------------------------------------------------
# bench.md

EMULATION_NOTE = (
    "ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU is an emulation of an AVX2-only machine, and a partial "
    "one: it only limits oneDNN's kernels (TensorFlow's oneDNN ops and, also with TF_ENABLE_ONEDNN_OPTS=0, "
    "the oneDNN sgemm under Eigen's matrix products). Eigen and TensorFlow's own kernels, XLA's code "
    "generation and the compiler-vectorised parts of TensorFlow still use whatever the binary dispatches "
    "(AVX-512 where present), and the memory system, clock and caches of real AVX2 machines are not "
    "reproduced.")


def setting_label(env: Mapping[str, str], cpu_isa: Sequence[str]) -> str:
    """E.g. "oneDNN off, AVX2 (emulated with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU)"."""
    onednn = "oneDNN on" if env.get("TF_ENABLE_ONEDNN_OPTS") == "1" else "oneDNN off"
    cap = env.get("ONEDNN_MAX_CPU_ISA", "unset")
    if cap == "unset":
        return f"{onednn}, native ISA"
    if "avx512f" in cpu_isa:
        return f"{onednn}, {cap} (emulated with ONEDNN_MAX_CPU_ISA={cap} on an AVX-512 CPU)"
    return f"{onednn}, {cap} (ONEDNN_MAX_CPU_ISA={cap}; this CPU has no AVX-512)"


def _header(results: dict, machine: dict) -> list[str]:
    isa, absent = machine.get("isa"), ", ".join(f for f in ISA_FLAGS if f not in machine.get("isa", ()))
    flags = "vector ISA not recorded" if isa is None else f"vector ISA {', '.join(isa) or 'none'}" + \
        (f" (no {absent})" if absent else "")
    command = f"`{results['command']}`" if results.get("command") else "not recorded (this bench.json predates it)."
    return ["# dreamer_tf benchmark", "", f"Command: {command}", "",
            f"Date: {results.get('date', 'not recorded')}; commit: {results.get('commit', 'not recorded')}.", "",
            f"CPU: {machine.get('cpu', 'unknown')}, {machine.get('cores', '?')} cores; {flags}.", "",
            "Times from different machines must not be compared: they depend on the CPU, its vector ISA, memory "
            "and clock, and on what else the machine was running; only rows of one file, measured one after "
            "another on one machine, are comparable.", ""]


def _cells(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(*heads: str) -> list[str]:
    return [_cells(*heads), "|" + "---|" * len(heads)]


def _timing(r: dict, fraction_of_peak: float) -> list[str]:
    """s/step, first call s, GFLOP/step, GFLOP/s, % of matmul peak, cores busy."""
    return [f"{r['seconds']:.2f}", f"{r['first_call_seconds']:.1f}", f"{r['gflop']:.{0 if r['gflop'] >= 10 else 2}f}",
            f"{r['gflops_per_second']:.1f}", f"{100 * fraction_of_peak:.0f}%",
            f"{r['cores_busy']:.2f}" if "cores_busy" in r else "-"]


def markdown(results: dict) -> str:
    if "settings" in results:
        return _markdown_settings(results)
    m, size = results["machine"], results.get("matmul_size", 2048)
    lines = _header(results, m) + [f"GPUs: {', '.join(m['gpus']) or 'none'}; TensorFlow {m['tensorflow']}, "
                                   f"Python {m['python']}.", ""]
    lines += [(f"oneDNN {'on' if m['onednn'] else 'off'}, as TensorFlow reports it (ONEDNN_MAX_CPU_ISA "
               f"{m.get('onednn_max_cpu_isa', 'unset')}); TensorFlow threads: {m.get('intra_op_threads', '?')} "
               f"intra-op, {m.get('inter_op_threads', '?')} inter-op; load average at the start "
               f"{m.get('load_average', float('nan')):.1f}.") if "onednn" in m else
              "oneDNN setting, TensorFlow threads, load and cores busy: not recorded (this bench.json predates them).",
              "", f"Measured float32 matmul peak ({size}x{size}), in the same run: "
              f"**{results['matmul_gflops']:.1f} GFLOP/s**.", ""]
    lines += _table("preset", "variant", "device", "s/step (median)", "first call s", "GFLOP/step", "GFLOP/s",
                    "% of matmul peak", "cores busy")
    lines += [_cells(r["preset"], r["variant"], r["device"], *_timing(r, r["fraction_of_matmul_peak"]))
              for r in results["train_step"]]
    lines += ["", *_table("preset", "policy step (1 env) ms", "policy steps/s")]
    lines += [_cells(r["preset"], f"{1000 * r['seconds']:.1f}", f"{r['steps_per_second']:.1f}")
              for r in results["policy"]]
    return "\n".join(lines + _envs_lines(results)) + "\n"


def _envs_lines(results: dict) -> list[str]:
    return [] if not results.get("envs") else [
        "", "Environment agent steps per second (action repeat 2, 64x64 pixels); `results/envs_bench.md` has the "
        "full measurement with pixel differences:", "", "```", json.dumps(results["envs"], indent=1), "```"]


def _markdown_settings(results: dict) -> str:
    settings, cpu_isa = results["settings"], results["machine"].get("isa", [])
    first, size = (settings[0]["name"], settings[0]["matmul_size"]) if settings else ("-", "?")
    lines = _header(results, results["machine"]) + [
        f"Settings: {', '.join(s['name'] for s in settings) or 'none'}, each in its own fresh process, one after "
        "another; each setting's matmul peak and percentages are its own. TensorFlow reads TF_ENABLE_ONEDNN_OPTS "
        "and ONEDNN_MAX_CPU_ISA only when it is imported. With TF_ENABLE_ONEDNN_OPTS=0 TensorFlow's oneDNN ops "
        "are off, but Eigen's matrix products still call oneDNN's sgemm, so ONEDNN_MAX_CPU_ISA applies there too.", ""]
    if any(s["setting"]["env"].get("ONEDNN_MAX_CPU_ISA", "unset") != "unset" for s in settings):
        lines += [EMULATION_NOTE if "avx512f" in cpu_isa else "This CPU has no AVX-512: ONEDNN_MAX_CPU_ISA=AVX2 "
                  "leaves oneDNN's choice of kernels as it is on an AVX2 CPU.", ""]
    lines += _table("setting", "what it is", "TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA",
                    "oneDNN (as TensorFlow reports it)", "ISA oneDNN reports", "TensorFlow threads (intra/inter)",
                    "load average at start", f"float32 matmul peak ({size}x{size}) GFLOP/s", f"peak / {first} peak")
    # what TensorFlow reports in each setting's process: oneDNN on/off, oneDNN's ISA, thread pools
    tf = {s["name"]: ["on" if s["machine"].get("onednn") else "off", s["setting"].get("onednn_isa") or "unknown",
                      f"{s['machine'].get('intra_op_threads', '?')}/{s['machine'].get('inter_op_threads', '?')}"]
          for s in settings}
    for s in settings:
        env = s["setting"]["env"]
        lines.append(_cells(s["name"], setting_label(env, cpu_isa), env.get("TF_ENABLE_ONEDNN_OPTS"),
                            env.get("ONEDNN_MAX_CPU_ISA", "unset"), *tf[s["name"]],
                            f"{s['machine'].get('load_average', float('nan')):.1f}", f"{s['matmul_gflops']:.1f}",
                            f"{s['matmul_gflops'] / settings[0]['matmul_gflops']:.2f}"))
    lines += [_cells(r["name"], f"not measured: {r['reason']}", *[""] * 8) for r in results.get("refused", [])]
    devices = ", ".join(dict.fromkeys(r["device"] for s in settings for r in s["train_step"])) or "none"
    lines += ["", f"Train step (device {devices}); the last column is this setting's s/step divided by {first}'s "
              "for the same preset and variant (above 1: slower).", ""]
    lines += _table("preset", "variant", "setting", "oneDNN (TF)", "ISA oneDNN reports", "threads (intra/inter)",
                    "s/step (median)", "first call s", "GFLOP/step", "GFLOP/s", "% of this setting's matmul peak",
                    "cores busy", f"s/step vs {first}")
    reference = {(r["preset"], r["variant"]): r["seconds"] for r in settings[0]["train_step"]} if settings else {}
    for key in dict.fromkeys((r["preset"], r["variant"]) for s in settings for r in s["train_step"]):
        for s, r in [(x, r) for x in settings for r in x["train_step"] if (r["preset"], r["variant"]) == key]:
            ratio = ("1.00 (reference)" if s["name"] == first else "-" if key not in reference else
                     f"{r['seconds'] / reference[key]:.2f} ({s['name']} / {first})")
            lines.append(_cells(*key, s["name"], *tf[s["name"]],
                                *_timing(r, r["gflops_per_second"] / s["matmul_gflops"]), ratio))
    lines += ["", *_table("preset", "setting", "policy step (1 env) ms", "policy steps/s")]
    for preset in dict.fromkeys(r["preset"] for s in settings for r in s["policy"]):
        lines += [_cells(preset, s["name"], f"{1000 * r['seconds']:.1f}", f"{r['steps_per_second']:.1f}")
                  for s in settings for r in s["policy"] if r["preset"] == preset]
    return "\n".join(lines + _envs_lines(results)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dreamer-tf bench", description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"])
    parser.add_argument("--variants", nargs="+", default=["float32", "xla", "float16"],
                        choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help=f"run each of {', '.join(SETTINGS)} in a fresh child process, one after another, "
                             "and write one report for all (default: only this process, as it is set up)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the matmul timed for the peak")
    parser.add_argument("--no-envs", action="store_true", help="skip the environment benchmark")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"directory for bench.md and bench.json (default: ./{DEFAULT_OUT}; the committed "
                             "numbers are regenerated with --out results)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite bench.md from bench.json")
    parser.add_argument("--devices", type=int, help="one device vs N replicas (mirrored): bench_devices.md")
    parser.add_argument("--child-setting", help=argparse.SUPPRESS)  # internal: one setting's child process
    parser.add_argument("--child-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from dreamer_tf import config as configlib
    try:
        _check_names(args.settings or [])
        _check_names([args.child_setting] if args.child_setting else [])
        if args.repeats < 1 or args.matmul_size < 1:
            raise SettingError("--repeats and --matmul-size must be >= 1")
        if args.devices is not None and args.devices < 2:  # one device vs N replicas
            raise SettingError(f"--devices must be >= 2 (one device vs that many replicas), got {args.devices}")
        if not args.child_setting:  # an unusable --out is one line now, not after minutes of timing
            check_out(args.out)
        if args.markdown_only:
            rewrite_markdown(args.out, markdown)
            return 0
        for preset in args.presets:
            configlib.load(preset)
        if args.child_setting and not args.child_json:
            raise SettingError("--child-setting needs --child-json")
    except (ValueError, configlib.ConfigError) as e:  # SettingError, PathError
        print(f"dreamer-tf bench: error: {e}", file=sys.stderr)
        return 2
    if args.devices is not None:  # dreamer_tf/study/bench_devices.py
        from dreamer_tf.study import bench_devices
        code = bench_devices.main(args.presets, args.devices, args.repeats, args.out, argv, sys.modules[__name__])
        print(f"wrote {args.out / 'bench_devices.md'} and {args.out / 'bench_devices.json'}", flush=True)
        return code
    if args.child_setting:
        return run_child(args.child_setting, args.child_json, args.presets, args.variants, args.repeats,
                         args.matmul_size)
    if args.settings:
        return run_settings(args.settings, args.presets, args.variants, args.repeats, not args.no_envs, args.out,
                            argv, args.matmul_size)
    # the default: everything in this process, with the oneDNN setting it has
    _write(args.out, {**provenance(argv), **measure(args.presets, args.variants, args.repeats, args.matmul_size)},
           not args.no_envs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
