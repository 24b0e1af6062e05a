"""Where the train step's time goes: TensorFlow's profiler on `Dreamer.train`, parsed here.

`profile(config, steps)` runs warm-up steps, then traces `steps` train steps on a synthetic batch
with the host tracer (`tf.profiler.experimental`), reads the written `.xplane.pb` itself and
reports, per step:
  * op kinds: thread time of every TF op type (`MatMul`, `_MklNativeConv2DBackpropInput`, ...) and
    its share of the summed op time, plus the time the intra-op pool threads spent on work the op
    handed them (Eigen/oneDNN parallel loops), so that summed op time / wall time shows how many
    op threads were busy and (op + pool time) / wall time how many cores;
  * parts of the model (`PartMapper`): encoder, observe loop, decoder, heads, imagination, KL, the
    gradients of each, the optimiser and "other"; derived from the op names, which come from Keras
    layer names, tf.scan/tf.cond scopes, TFP's `<Dist>_CONSTRUCTED_AT_<layer>` scopes and the
    `gradient_tape/` prefix of gradient ops;
  * the share of op time in oneDNN kernels (op types `_Mkl...`) vs Eigen (everything else).

How the trace is read. In the host plane `/host:CPU` each thread is a line: the inter-op threads
(`tf_Compute`) hold one event per executed op, named `<op name>:<op type>` with the type as display
name, durations in picoseconds. An op that parallelises hands closures to the intra-op pool
(`tf_numa_*_Eigen` threads); the profiler marks the hand-over with a `ThreadpoolListener::Record`
event (stat `_p` = a context id) inside the op, and the closure's execution with a
`StartRegion` (stat `_c` = the same id) ... `StopRegion` pair on the pool thread. Matching the ids
gives each op its pool time. Op times are self times (nested op events, if any, are subtracted).

`markdown_section` renders one result; `scripts/profile_step.py` is the command line.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dreamer_tf.study.op_parts import (FORWARD_PARTS, GRAD_OTHER, OPTIMISER, OTHER, PART_HELP, PARTS,  # noqa: F401
                                       PartMapper)
from dreamer_tf.study.xplane import (STEP_MARKER, OpEvent, Trace, aggregate, find_xplane, onednn_share,  # noqa: F401
                                     op_kind_table, parse_xspace, part_table, summarize)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__all__ = ["OpEvent", "Trace", "PartMapper", "PARTS", "parse_xspace", "find_xplane", "aggregate",
           "op_kind_table", "part_table", "onednn_share", "summarize", "profile", "markdown_section",
           "write_markdown", "main", "ENV_KEYS", "STEP_MARKER"]

# Environment variables that change which kernels run; they only act when set before TensorFlow loads.
ENV_KEYS = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "OMP_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")

# --------------------------------------------------------------------------------------------
# Running the profiler.

def _agent_and_batch(config, actions: int = 6, state_size: int = 24):
    """The agent for `config` and a synthetic batch (bench's, plus a state vector when observed)."""
    from dreamer_tf.agent.inputs import observation_keys
    from dreamer_tf.study import bench
    keys = observation_keys(config.observation)
    batch = bench.synthetic_batch(config, actions)
    if keys == ("image",):
        return bench.build_agent(config, actions), batch
    from dreamer_tf.agent import Dreamer
    space = {"image": bench._Box((config.size, config.size, 3), 0, 255, np.uint8),
             "state": bench._Box((state_size,), -np.inf, np.inf)}
    agent = Dreamer(config, {k: space[k] for k in keys}, bench._Box((actions,)))
    rng = np.random.default_rng(1)
    batch["state"] = rng.normal(size=(config.batch_size, config.batch_length, state_size)).astype(np.float32)
    return agent, batch


def env_snapshot() -> dict:
    """The kernel-choice environment variables now ("unset" when absent)."""
    return {k: os.environ.get(k, "unset") for k in ENV_KEYS}


def profile(config, steps: int = 3, warmup: int = 2, logdir: str | os.PathLike | None = None,
            peak: bool = True, env_at_start: Mapping[str, str] | None = None) -> dict:
    """Warm up, trace `steps` train steps, parse the trace; the summary plus machine info.

    env_at_start: the ENV_KEYS values before `dreamer_tf` was imported (it defaults
    TF_ENABLE_ONEDNN_OPTS to 1), to tell the user's settings from the package's defaults."""
    from dreamer_tf.utils import import_tensorflow_quietly
    tf = import_tensorflow_quietly()
    from dreamer_tf.study import bench
    logdir = Path(logdir or tempfile.mkdtemp(prefix="dreamer_profile_"))
    result = {"machine": bench.machine_info(), "env": env_snapshot(),
              "env_at_start": dict(env_at_start) if env_at_start is not None else None}
    result["matmul_gflops"] = bench.matmul_peak() if peak else None
    agent, batch = _agent_and_batch(config)
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        agent.train(batch)
    result["warmup_seconds"] = time.perf_counter() - start
    options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=2, python_tracer_level=0,
                                                       device_tracer_level=0)
    cpu, start = _cpu_seconds(), time.perf_counter()
    agent.train(batch)
    untraced = time.perf_counter() - start
    untraced_cores = (_cpu_seconds() - cpu) / untraced
    tf.profiler.experimental.start(str(logdir), options=options)
    try:
        cpu, start = _cpu_seconds(), time.perf_counter()
        for i in range(steps):
            with tf.profiler.experimental.Trace(STEP_MARKER, step_num=i, _r=1):
                agent.train(batch)
        traced_cores = (_cpu_seconds() - cpu) / (time.perf_counter() - start)
    finally:
        tf.profiler.experimental.stop()
    path = find_xplane(logdir)
    trace = parse_xspace(path)
    if trace.steps != steps:
        raise RuntimeError(f"{path}: found {trace.steps} '{STEP_MARKER}' events, expected {steps}")
    names = {e.name for e in trace.ops}
    mapper = PartMapper.for_config(config, names)
    result.update(summarize(trace, mapper))
    result.update(trace_file=str(path), untraced_step_seconds=untraced, flops=_flops(config),
                  process_cores_untraced=untraced_cores, process_cores_traced=traced_cores)
    return result


def _cpu_seconds() -> float:
    """CPU seconds of this process, all threads."""
    t = os.times()
    return t.user + t.system


def _flops(config) -> float | None:
    if config["observation"] != "pixels":
        return None  # the analytic count covers the image model only
    try:
        from dreamer_tf.study.flops import train_step_flops
        return train_step_flops(config)["total"]
    except (KeyError, ValueError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Markdown.

HEADER = """# Where the train step's time goes

Written by `scripts/profile_step.py` (`dreamer_tf.study.profile`): TensorFlow's profiler (host tracer)
on `Dreamer.train` with a synthetic batch, after warm-up; the trace is parsed by the script.

* **op time**: the time an inter-op thread spent in the op's kernel (self time), summed over the
  step's ops; **pool time**: time intra-op pool threads spent on loops the op handed them (Eigen
  and oneDNN parallel regions). Summed op time / wall time = inter-op threads busy on average;
  (op + pool) / wall bounds the cores busy from above (an op thread waiting for its pool counts as
  busy); the process CPU time / wall time of an untraced step is the measured figure.
* Shares are of the summed op time. oneDNN = op types with the `_Mkl` prefix, Eigen = the rest.
* Parts come from op names (`dreamer_tf.study.profile.PartMapper`):
"""


def _fmt_ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def markdown_header() -> str:
    lines = [HEADER.rstrip("\n")]
    for part in FORWARD_PARTS:
        lines.append(f"  * {part}: {PART_HELP[part]}")
    lines.append("  * grad <part>: the gradient ops (`gradient_tape/...`) of that part's forward ops")
    for part in (GRAD_OTHER, OPTIMISER, OTHER):
        lines.append(f"  * {part}: {PART_HELP[part]}")
    return "\n".join(lines) + "\n"


def markdown_section(result: Mapping, command: str, title: str, top: int = 15) -> str:
    m = result["machine"]
    start = result.get("env_at_start")
    env = ", ".join(f"{k}={v}" + (f" (default of dreamer_tf; {start[k]} at start)" if start and start.get(k) != v
                                  else "") for k, v in result["env"].items())
    peak = result.get("matmul_gflops")
    wall = result["wall_seconds"]
    lines = [f"## {title}", "", f"Command: `{command}`", "",
             f"Environment in effect (set before TensorFlow loaded): {env}.", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m.get('isa', [])) or 'ISA unknown'}); "
             f"oneDNN {'on' if m.get('onednn') else 'off'}; TensorFlow {m['tensorflow']} with "
             f"{m.get('intra_op_threads')} intra-op / {m.get('inter_op_threads')} inter-op threads; "
             f"load average at the start {m.get('load_average', float('nan')):.1f}.", ""]
    lines.append("Measured float32 matmul peak (2048x2048) in the same process: "
                 + (f"**{peak:.1f} GFLOP/s**." if peak else "not measured (--no-peak)."))
    lines.append("")
    step_list = ", ".join(f"{s:.3f}" for s in result["step_seconds"])
    flops = result.get("flops")
    achieved = (f"; analytic {flops / 1e9:.1f} GFLOP/step = {flops / wall / 1e9:.1f} GFLOP/s"
                + (f" ({100 * flops / wall / 1e9 / peak:.0f}% of the matmul peak)" if peak else "")
                if flops else "")
    lines += [f"Step wall time (traced span / {result['steps']} steps): **{wall:.3f} s** "
              f"(each step: {step_list} s; one untraced step: {result['untraced_step_seconds']:.3f} s){achieved}.",
              "",
              f"Per step: {result['ops_per_step']:.0f} ops, summed op time {result['op_seconds']:.3f} s "
              f"(**{result['op_threads_busy']:.2f} op threads busy**), pool time {result['pool_seconds']:.3f} s "
              f"(+{result['pool_unattributed_seconds']:.3f} s not traced to an op); (op + pool) / wall = "
              f"{result['cores_busy']:.2f} (an upper bound on the cores busy: op threads waiting for "
              f"their pool count as busy). Process CPU time / wall time: "
              f"**{result.get('process_cores_untraced', float('nan')):.2f} cores** in the untraced step, "
              f"{result.get('process_cores_traced', float('nan')):.2f} in the traced ones.", "",
              f"oneDNN (`_Mkl*` ops): **{100 * result['onednn']['op_time']:.0f}%** of op time, "
              f"{100 * result['onednn']['op_and_pool_time']:.0f}% of op + pool time; the rest is Eigen.", "",
              f"Ops not attributed to any part (\"other\"): **{100 * result['other_share']:.1f}%** of op time.", "",
              "### Op kinds", "",
              "| op type | oneDNN | calls/step | op ms/step | share | pool ms/step |", "|---|---|---|---|---|---|"]
    kinds = result["kinds"]
    for r in kinds[:top]:
        lines.append(f"| {r['key']} | {'yes' if r['onednn'] else ''} | {r['calls']:.0f} | {_fmt_ms(r['seconds'])} | "
                     f"{100 * r['share']:.1f}% | {_fmt_ms(r['pool_seconds'])} |")
    rest = kinds[top:]
    if rest:
        lines.append(f"| rest ({len(rest)} types) | | {sum(r['calls'] for r in rest):.0f} | "
                     f"{_fmt_ms(sum(r['seconds'] for r in rest))} | {100 * sum(r['share'] for r in rest):.1f}% | "
                     f"{_fmt_ms(sum(r['pool_seconds'] for r in rest))} |")
    lines += ["", "### Parts of the model", "",
              "| part | ops/step | op ms/step | share | pool ms/step | largest op kinds |", "|---|---|---|---|---|---|"]
    for r in result["parts"]:
        top_kinds = ", ".join(f"{k} {100 * s:.0f}%" for k, s in r["top_kinds"])
        lines.append(f"| {r['key']} | {r['calls']:.0f} | {_fmt_ms(r['seconds'])} | {100 * r['share']:.1f}% | "
                     f"{_fmt_ms(r['pool_seconds'])} | {top_kinds} |")
    lines += ["", f"Trace: `{result['trace_file']}` (open with TensorBoard's profile plugin).", ""]
    return "\n".join(lines) + "\n"


def write_markdown(path: str | os.PathLike, section: str, append: bool) -> Path:
    """Write header + section, or add the section to an existing file when `append`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if append and path.exists():
        text = path.read_text()
        path.write_text(text.rstrip("\n") + "\n\n" + section)
    else:
        path.write_text(markdown_header() + "\n" + section)
    return path


# --------------------------------------------------------------------------------------------
# Command line.

def _command(argv: Sequence[str], env: Mapping[str, str]) -> str:
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if v != "unset")
    return ((env + " ") if env else "") + "python scripts/profile_step.py " + " ".join(shlex.quote(a) for a in argv)


def main(argv: Sequence[str] | None = None, env_at_start: Mapping[str, str] | None = None) -> int:
    """The command line; `env_at_start`: ENV_KEYS values before dreamer_tf was imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="profile_step.py",
        description="Profile the compiled train step with TensorFlow's profiler and write where its "
                    "time goes (op kinds, parts of the model, oneDNN vs Eigen) to OUT/profile.md. "
                    "Set TF_ENABLE_ONEDNN_OPTS / ONEDNN_MAX_CPU_ISA in the environment before the run.")
    parser.add_argument("--preset", default="cpu", help="config preset (cpu, paper, debug, state, ...)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for training")
    parser.add_argument("--steps", type=int, default=3, help="profiled train steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untraced train steps first (>= 1: tracing)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="directory of profile.md")
    parser.add_argument("--append", action="store_true", help="add a section to OUT/profile.md")
    parser.add_argument("--label", default="", help="setting name in the section title (default: from the env)")
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="where the profiler writes its trace (default: a new temporary directory)")
    parser.add_argument("--no-peak", action="store_true", help="skip the matmul peak measurement")
    parser.add_argument("--top", type=int, default=15, help="op kinds listed before 'rest'")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    from dreamer_tf import config as configlib
    try:
        config = configlib.load(args.preset, configlib.parse_overrides(args.set))
    except configlib.ConfigError as e:
        parser.error(str(e))
    result = profile(config, steps=args.steps, warmup=args.warmup, logdir=args.trace_dir, peak=not args.no_peak,
                     env_at_start=env_at_start)
    label = args.label or ", ".join(
        [f"oneDNN {'on' if result['machine'].get('onednn') else 'off'}",
         f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}"] + list(args.set))
    section = markdown_section(result, _command(argv, env_at_start or env_snapshot()), f"{args.preset} ({label})",
                               top=args.top)
    path = write_markdown(args.out / "profile.md", section, args.append)
    print(section)
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
