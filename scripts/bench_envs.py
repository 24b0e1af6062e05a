"""Benchmarks the environments and writes results/envs_bench.json and results/envs_bench.md.

    python scripts/bench_envs.py [--frames 300] [--steps 300] [--rounds 3]

Each measurement runs `--rounds` times in fresh processes; the median is reported with all
rounds, and the load average at the start and end, because other work on the machine shifts the
numbers.
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

from dreamer_tf.envs import bench

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("mujoco", "dm_control", "ale_py", "numpy"):
        try:
            from importlib.metadata import version
            versions[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
            "versions": versions}


def _median_rounds(results: list[dict], keys: list[str]) -> dict:
    out = dict(results[0])
    for key in keys:
        values = [r[key] for r in results]
        out[key] = statistics.median(values)
        out[key + "_rounds"] = values
    return out


def _render(task: str, args: argparse.Namespace) -> dict:
    renders = [bench.render_settings(task, frames=args.frames) for _ in range(args.rounds)]
    render = dict(renders[0])
    render["settings"] = {}
    for name in renders[0]["settings"]:
        per = [r["settings"][name] for r in renders]
        render["settings"][name] = _median_rounds(per, ["renders_per_s", "speedup"])
        for key in ("mean_abs_diff", "max_abs_diff"):  # deterministic: identical every round
            assert len({p[key] for p in per}) == 1, (name, key, [p[key] for p in per])
    return render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames per render setting")
    parser.add_argument("--steps", type=int, default=300, help="agent steps per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite envs_bench.md from an existing envs_bench.json")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads((Path(args.out) / "envs_bench.json").read_text())
        (Path(args.out) / "envs_bench.md").write_text(_markdown(result))
        return
    load_start = os.getloadavg()
    started = time.time()

    render = {task: _render(task, args) for task in ("dmc_walker_walk", "dmc_quadruped_walk")}
    rate_keys = ["reference_single", "ours_single_inprocess", "ours_single_worker",
                 "ours_parallel_2_workers", "speedup_single_worker", "speedup_parallel_2"]
    quadruped = _median_rounds(
        [bench.env_throughput("dmc_quadruped_walk", steps=args.steps) for _ in range(args.rounds)],
        rate_keys)
    walker = _median_rounds(
        [bench.env_throughput("dmc_walker_walk", steps=args.steps) for _ in range(args.rounds)],
        rate_keys)
    atari = _median_rounds([bench.atari_throughput() for _ in range(args.rounds)],
                           ["single_worker", "parallel_2_workers"])
    result = {"machine": _machine(), "load_average_start": load_start,
              "load_average_end": os.getloadavg(), "seconds": time.time() - started,
              "rounds": args.rounds, "render": render,
              "throughput": {"dmc_walker_walk": walker, "dmc_quadruped_walk": quadruped},
              "atari": atari}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "envs_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "envs_bench.md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        "# Environment benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, MUJOCO_GL={m['MUJOCO_GL']} "
        f"(Mesa llvmpipe, no GPU); " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        f"Load average (1/5/15 min) at start {', '.join(f'{x:.1f}' for x in r['load_average_start'])}"
        f", at end {', '.join(f'{x:.1f}' for x in r['load_average_end'])}: other jobs shared the "
        "CPU, so rates are medians of "
        f"{r['rounds']} rounds (all rounds in the JSON). Written by `scripts/bench_envs.py`.",
        "",
        "## Rendering",
        "",
        "Per task: 64x64 frames after each step of a fixed random action sequence. Pixel "
        "differences are against dm_control's default settings (`physics.render`), over all "
        "frames and channels, in 0-255 units; 'pixels differing' counts pixels with any channel "
        "changed.",
    ]
    for task, render in r["render"].items():
        lines += [
            "",
            f"### {task} (camera {render['camera']}, {render['frames']} frames)",
            "",
            "| setting | renders/s | speedup | mean abs diff | max abs diff | pixels differing "
            "| what |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for name, s in render["settings"].items():
            lines.append(f"| {name} | {s['renders_per_s']:.1f} | {s['speedup']:.2f}x | "
                         f"{s['mean_abs_diff']:.3f} | {s['max_abs_diff']} | "
                         f"{100 * s['frac_pixels_differing']:.2f}% | {s['note']} |")
    lines += [
        "",
        "## Agent steps per second (DMC, action repeat 2, 64x64 pixels)",
        "",
        "`reference_single`: plain dm_control env with default render settings, rendering at every "
        "substep of the action repeat as the reference implementation does. `ours_*`: "
        "`dreamer_tf.envs.make` (default settings: one frame per agent step, 256 shadow map); "
        "in-process, in one worker process, and a `Parallel` of 2 workers (total steps/s).",
        "",
        "| task | reference single | ours in-process | ours 1 worker | ours Parallel(2) | "
        "speedup 1 worker | speedup Parallel(2) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, t in r["throughput"].items():
        lines.append(f"| {task} | {t['reference_single']:.1f} | {t['ours_single_inprocess']:.1f} | "
                     f"{t['ours_single_worker']:.1f} | {t['ours_parallel_2_workers']:.1f} | "
                     f"{t['speedup_single_worker']:.2f}x | {t['speedup_parallel_2']:.2f}x |")
    if max(r["load_average_start"][0], r["load_average_end"][0]) > m["cores"]:
        lines += ["", "The load average exceeded the core count during this run: with no idle core, "
                  "a second worker cannot run concurrently, so Parallel(2) shows no gain over one "
                  "worker here; compare on an otherwise idle machine."]
    a = r["atari"]
    lines += [
        "",
        f"## Atari ({a['task']}, action repeat 4 with max-pooling, 64x64 RGB area resize)",
        "",
        f"1 worker: {a['single_worker']:.0f} agent steps/s; Parallel(2): "
        f"{a['parallel_2_workers']:.0f} agent steps/s.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
