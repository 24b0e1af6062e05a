"""Soak test of the run record: SIGKILLs and SIGTERMs at random moments of one `debug` run, then a
check that the record reads as if nothing had happened and that it is the uninterrupted run of the
same command, bit for bit. Writes results/reliability.md.

    python scripts/soak.py --kills 6 --terms 3 --steps 3000 [--seed 0] [--overlap] [--no-compare]
                           [--logdir DIR] [--out FILE]

A SIGTERM goes to the run's process group (the trainer and its environment workers, as a cluster's
does), a SIGKILL to the trainer alone; in a random order. Each one
strikes once the run (after the previous resume's roll-back) has reached a random env step of its
own, spread over the run, plus a random 0-`--jitter` s, so it lands anywhere in collection, training,
evaluation, episode or checkpoint writes. After each one the same command resumes the run. Then:

* the episode counter of the `train_return` rows runs 1..N without a gap or a duplicate;
* the evaluations (`test_return` rows) fall exactly at 0, eval_every, 2 eval_every, ... and the last step;
* the episode files are N, numbered 0..N-1, and file k holds the return of counter k+1;
* no environment worker of any attempt outlives the run, and no temp file is left;
* the final status is `finished` at the planned step;
* (unless --no-compare) against an uninterrupted run of the same command, run first: the same stored
  episodes, metric rows (wall-clock fields aside), final weights and final loop state (`compare_runs`).

Reported per signal: the step it struck at, the exit code, the episodes redone (moved to
`orphaned_episodes/` on resume) and the seconds lost (from the signal until the resumed run is
back at the step it had reached, restart included). Not part of the default test suite;
tests/test_reliability.py runs a short version (2 SIGKILLs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
EPISODE_STEPS = 100  # the debug preset: time_limit 100 env steps per episode


def _max_step(logdir: Path) -> int:
    """The largest `step` in metrics.jsonl (-1 when there is none yet)."""
    try:
        text = (logdir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return -1
    steps = []
    for line in text.splitlines()[-20:]:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line being written
    return max(steps, default=-1)


def _reached(logdir: Path, step: int, key: str = "step") -> bool:
    """A row at `step` or later that has `key` is in metrics.jsonl (e.g. `model_loss`: the scalar
    row written after that step's updates, which an evaluation due at the step follows)."""
    try:
        lines = (logdir / "metrics.jsonl").read_text().splitlines()[-20:]
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if int(row.get("step", -1)) >= step and key in row:
            return True
    return False


def _status(logdir: Path) -> dict:
    try:
        return json.loads((logdir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _workers(pid: int) -> set[int]:
    """Environment worker processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"dreamer_tf.envs.worker" in cmdline:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _orphans(logdir: Path) -> int:
    return len(list((logdir / "orphaned_episodes").glob("*.npz")))


def check_record(logdir: Path, steps: int, eval_every: int) -> list[str]:
    """What is wrong with the record of a finished run (empty when nothing is)."""
    problems = []
    rows = []
    for line in (logdir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            problems.append(f"metrics.jsonl has a line that is not JSON: {line[:80]!r}")
    row_steps = [r["step"] for r in rows]
    if row_steps != sorted(row_steps):
        problems.append("metrics.jsonl steps go backwards")
    train = [r for r in rows if "train_return" in r]
    counter = [r["train_episodes"] for r in train]
    expected = steps // EPISODE_STEPS
    if counter != list(range(1, expected + 1)):
        problems.append(f"episode counter is not 1..{expected}: {counter}")
    evals = [r["step"] for r in rows if "test_return" in r]
    planned = list(range(0, steps + 1, eval_every)) + ([steps] if steps % eval_every else [])  # + the final one
    if evals != planned:
        problems.append(f"evaluations at {evals}, planned {planned}")
    files = sorted((logdir / "train_episodes").glob("*.npz"))
    indices = [int(f.name.split("-")[0]) for f in files]
    if indices != list(range(len(counter))):
        problems.append(f"episode files are numbered {indices}, the counter says {len(counter)}")
    for f, row in zip(files, train):
        with np.load(f) as data:
            ret = float(data["reward"].sum())
        if not math.isclose(ret, row["train_return"], rel_tol=1e-6, abs_tol=1e-6):
            problems.append(f"{f.name} holds return {ret}, its counter row says {row['train_return']}")
    temps = [str(p.relative_to(logdir)) for p in logdir.rglob("*") if ".tmp" in p.name]
    if temps:
        problems.append(f"temp files left behind: {temps}")
    status = _status(logdir)
    if status.get("status") != "finished" or status.get("step") != steps:
        problems.append(f"final status {status.get('status')!r} at step {status.get('step')}, not finished at {steps}")
    return problems


WALL_CLOCK = ("env_steps_per_second", "train_seconds", "wall_time")  # and seconds_<part>


def comparable_rows(logdir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (time and speed differ between any two runs)."""
    rows = [json.loads(line) for line in (Path(logdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK and not k.startswith("seconds_")}
            for row in rows]


def _final_weights(logdir: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf
    latest = sorted((Path(logdir) / "checkpoints").glob("ckpt-*"))[-1]
    reader = tf.train.load_checkpoint(str(latest / "agent"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def compare_runs(reference: Path, logdir: Path) -> list[str]:
    """How the run in `logdir` differs from the uninterrupted `reference` (empty when it is the same
    run bit for bit): the stored episodes, the metric rows (wall-clock fields aside), the final
    checkpoint's weights and loop state (its wall time aside)."""
    from dreamer_tf.data import load_episode
    problems = []
    rows, expected = comparable_rows(logdir), comparable_rows(reference)
    if rows != expected:
        diff = next((i for i, (a, b) in enumerate(zip(rows, expected)) if a != b), min(len(rows), len(expected)))
        problems.append(f"metric rows differ from the uninterrupted run's from row {diff} "
                        f"({len(rows)} vs {len(expected)} rows): {rows[diff] if diff < len(rows) else None} "
                        f"vs {expected[diff] if diff < len(expected) else None}")
    files = sorted((Path(logdir) / "train_episodes").glob("*.npz"))
    expected_files = sorted((Path(reference) / "train_episodes").glob("*.npz"))
    if len(files) != len(expected_files):
        problems.append(f"{len(files)} episodes stored, the uninterrupted run stored {len(expected_files)}")
    for index, (a, b) in enumerate(zip(files, expected_files)):
        ea, eb = load_episode(a), load_episode(b)
        keys = [k for k in sorted(set(ea) | set(eb)) if k not in ea or k not in eb or not np.array_equal(ea[k], eb[k])]
        if keys:
            problems.append(f"episode {index} ({a.name}) differs from the uninterrupted run's in {keys}")
    weights, expected_weights = _final_weights(logdir), _final_weights(reference)
    differ = sorted(k for k in set(weights) | set(expected_weights)
                    if k not in weights or k not in expected_weights or not np.array_equal(weights[k], expected_weights[k]))
    if differ:
        problems.append(f"final weights differ in {len(differ)} of {len(expected_weights)} tensors, e.g. {differ[:3]}")
    # Episode file names hold a random uuid (data/episodes.py): compare their index and length.
    states = [json.loads(re.sub(r"(\d{8})-[0-9a-f]{8}-(\d+)\.npz", r"\1-\2.npz",
                                (sorted((Path(d) / "checkpoints").glob("ckpt-*"))[-1] / "state.json").read_text()))
              for d in (logdir, reference)]
    for state in states:
        for key in ("wall_time", "checksums"):
            state.pop(key, None)
    if states[0] != states[1]:
        keys = sorted(k for k in set(states[0]) | set(states[1]) if states[0].get(k) != states[1].get(k))
        problems.append(f"final loop state differs in {keys}")
    return problems


Schedule = Sequence[tuple[str, int, float, str]]  # (signal, target step, max jitter s, key of the row)


def random_schedule(kills: int, terms: int, steps: int, seed: int, jitter: float) -> list[tuple[str, int, float, str]]:
    """`kills` SIGKILLs and `terms` SIGTERMs in a random order at random steps, one per episode,
    after prefill and before the end."""
    rng = random.Random(seed)
    events = ["SIGKILL"] * kills + ["SIGTERM"] * terms
    rng.shuffle(events)
    slots = range(3 * EPISODE_STEPS, steps - EPISODE_STEPS, EPISODE_STEPS)
    if len(events) > len(slots):
        raise ValueError(f"{len(events)} signals need --steps >= {(len(events) + 4) * EPISODE_STEPS}")
    targets = sorted(rng.sample(list(slots), len(events)))
    return [(event, t + rng.randrange(EPISODE_STEPS), jitter, "step") for event, t in zip(events, targets)]


def run_command(logdir: Path, steps: int, args: Sequence[str] = ()) -> list[str]:
    """The `debug` training command the soak (and its uninterrupted reference) runs."""
    return [sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir", str(logdir),
            "--set", f"steps={steps}", *args]


def soak(logdir: str | os.PathLike, kills: int = 6, terms: int = 3, steps: int = 3000, seed: int = 0,
         jitter: float = 1.5, timeout: float = 1800.0, log: Callable[[str], None] = print,
         schedule: Schedule | None = None, args: Sequence[str] = (), reference: Path | None = None) -> dict:
    """Run a `debug` run to `steps` in `logdir` through `kills` SIGKILLs and `terms` SIGTERMs, each
    `jitter` s at most after its target step (or through the signals of `schedule`, each once a row
    at its step with its key is logged, plus up to its jitter); `args`: more `--set` values. Returns
    the events, the checks' problems (empty = passed; with `reference`, an uninterrupted run of the
    same command, also every difference from it) and timings."""
    logdir = Path(logdir)
    rng = random.Random(seed)
    schedule = list(schedule) if schedule is not None else random_schedule(kills, terms, steps, seed, jitter)
    events = [event for event, *_ in schedule]
    kills, terms = events.count("SIGKILL"), events.count("SIGTERM")
    command = run_command(logdir, steps, args)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    output = open(logdir.parent / f"{logdir.name}.soak.log", "ab")
    config_eval_every = 300  # the debug preset's
    start, deadline, load = time.time(), time.time() + timeout, os.getloadavg()[0]
    done, workers, attempts = [], set(), 0
    pending_regain: dict | None = None  # the last signal, until the resumed run is back at its step
    try:
        while True:
            attempts += 1
            if attempts > len(events) + 3:
                raise RuntimeError("the run does not finish")
            begun = time.time()
            # Its own process group: a SIGTERM goes to the whole group, env workers included, as
            # a cluster's (Slurm's scancel, a pre-emption) does; a SIGKILL to the trainer alone.
            proc = subprocess.Popen(command, stdout=output, stderr=output, env=env, start_new_session=True)
            event = events[len(done)] if len(done) < len(events) else None
            while proc.poll() is None:
                if time.time() > deadline:
                    proc.kill()
                    raise RuntimeError(f"timeout after {timeout:.0f} s")
                workers |= _workers(proc.pid)
                status, reached = _status(logdir), _max_step(logdir)
                resumed = status.get("time", 0) > begun  # written after the roll-back
                if pending_regain and pending_regain["attempt"] < attempts and resumed \
                        and reached >= pending_regain["step"]:
                    pending_regain["seconds_lost"] = time.time() - pending_regain["time"]
                    pending_regain["episodes_redone"] = _orphans(logdir) - pending_regain["orphans"]
                    pending_regain = None
                _, target, wait, key = schedule[len(done)] if event else (None, 0, 0.0, "step")
                if event and resumed and _reached(logdir, target, key) and pending_regain is None:
                    time.sleep(rng.uniform(0.0, wait))
                    if proc.poll() is not None:
                        break
                    workers |= _workers(proc.pid)
                    record = {"signal": event, "target": target, "step": _max_step(logdir),
                              "time": time.time(), "orphans": _orphans(logdir), "attempt": attempts}
                    if event == "SIGTERM":
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        proc.send_signal(getattr(signal, event))
                    done.append(record)
                    pending_regain = record
                    log(f"{event} at step {record['step']} (target {record['target']}, attempt {attempts})")
                    event = None
                time.sleep(0.1)
            proc.wait()
            if done and done[-1].get("code") is None and done[-1]["time"] >= begun:
                done[-1]["code"] = proc.returncode
                done[-1]["status"] = _status(logdir).get("status")
            if proc.returncode == 0 and _status(logdir).get("status") == "finished":
                break
            if not done or done[-1]["time"] < begun:
                raise RuntimeError(f"the trainer exited with {proc.returncode} on its own; see {output.name}")
    finally:
        output.close()
    wall = time.time() - start
    # Workers end on EOF of their socket once the trainer is gone: give them a moment.
    wait_until = time.time() + 15
    while any(_alive(p) for p in workers) and time.time() < wait_until:
        time.sleep(0.2)
    problems = check_record(logdir, steps, config_eval_every)
    left = sorted(p for p in workers if _alive(p))
    if left:
        problems.append(f"environment workers left running: {left}")
    for record in done:
        expected = -signal.SIGKILL if record["signal"] == "SIGKILL" else 128 + signal.SIGTERM
        # A SIGTERM in the last episode stops at the run's end: it finishes (exit 0), nothing to resume.
        ends_run = record["signal"] == "SIGTERM" and record.get("code") == 0 and record.get("status") == "finished"
        if record.get("code") != expected and not ends_run:
            problems.append(f"{record['signal']} at step {record['step']}: exit code {record.get('code')}, "
                            f"expected {expected}")
        if record["signal"] == "SIGTERM" and record.get("episodes_redone", 0):
            problems.append(f"SIGTERM at step {record['step']} lost {record['episodes_redone']} episode(s)")
    if len(done) != len(events):
        problems.append(f"only {len(done)} of {len(events)} signals were delivered before the end")
    if reference is not None:
        problems += compare_runs(reference, logdir)
    return {"events": done, "problems": problems, "steps": steps, "kills": kills, "terms": terms,
            "compared": reference is not None,
            "seed": seed, "jitter": jitter, "wall_seconds": wall, "attempts": attempts, "workers_seen": len(workers),
            "episodes_redone": _orphans(logdir), "command": shlex.join(command),
            "load": (load, os.getloadavg()[0])}


def cpu() -> tuple[str, bool]:
    """The CPU model and whether it has AVX-512F (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown", False
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "unknown")
    return model, " avx512f " in text.replace("\n", " ")


def report(result: dict, argv: Sequence[str], commit: str = "unknown") -> str:
    model, avx512 = cpu()
    kills = [e for e in result["events"] if e["signal"] == "SIGKILL"]
    terms = [e for e in result["events"] if e["signal"] == "SIGTERM"]

    def lost(events):
        values = [e["seconds_lost"] for e in events if "seconds_lost" in e]
        return (f"{statistics.mean(values):.1f} s mean, {min(values):.1f}-{max(values):.1f} s"
                if values else "n/a")

    verdict = "**passed**" if not result["problems"] else "**FAILED**: " + "; ".join(result["problems"])
    lines = [
        "# Reliability: SIGKILL and SIGTERM soak of a `debug` run",
        "",
        f"Command: `python scripts/soak.py {shlex.join(argv)}` "
        f"({time.strftime('%Y-%m-%d')}, commit {commit}; {os.cpu_count()} cores, {model}, "
        f"avx512f: {'yes' if avx512 else 'no'}; the machine was shared with other jobs: load average "
        f"{result['load'][0]:.1f} at the start, {result['load'][1]:.1f} at the end).",
        "",
        f"Each attempt runs `{result['command'].replace(sys.executable, 'python')}` "
        f"(the same command resumes); the signals go out at random env steps "
        f"(seed {result['seed']}) plus a random 0-{result['jitter']:g} s.",
        "",
        "| | |",
        "|---|---|",
        f"| SIGKILLs survived | {len(kills)} of {result['kills']} |",
        f"| SIGTERMs survived | {len(terms)} of {result['terms']} |",
        f"| episodes redone (moved to `orphaned_episodes/`) | {result['episodes_redone']} of "
        f"{result['steps'] // EPISODE_STEPS} (SIGKILL: {sum(e.get('episodes_redone', 0) for e in kills)}, "
        f"SIGTERM: {sum(e.get('episodes_redone', 0) for e in terms)}) |",
        f"| seconds lost per SIGKILL (restart included) | {lost(kills)} |",
        f"| seconds lost per SIGTERM (restart included) | {lost(terms)} |",
        f"| wall time, {result['attempts']} attempts | {result['wall_seconds']:.0f} s |",
        f"| environment workers seen / left running | {result['workers_seen']} / 0 |"
        if not any("workers left" in p for p in result["problems"]) else
        f"| environment workers seen | {result['workers_seen']} (some left running) |",
        f"| record check{' and comparison' if result.get('compared') else ''} | {verdict} |",
        "",
        "Checks: the episode counter runs 1..N without a gap or a duplicate; evaluations fall exactly "
        "at the planned steps; the episode files are N, numbered in order, each holding the return its "
        "counter row logged; no environment worker and no temp file is left; the final status is "
        "`finished`; every SIGKILL exits -9 and every SIGTERM exits 143 (status `interrupted`, "
        "nothing redone), or 0 when its stop, at the end of the episode in progress, is the run's end "
        "(status `finished`)." + (
            " Comparison: the killed and resumed run is the uninterrupted run of the same command (run "
            "first, beside it) bit for bit: the same stored episodes (every array), the same metric rows "
            "(all fields but wall time and speeds), the same final weights (every tensor of the last "
            "checkpoint) and the same final loop state (generator states, counters)." if result.get("compared")
            else " No comparison with an uninterrupted run (--no-compare)."),
        "",
        "Each SIGTERM goes to the run's whole process group, environment workers included, as a "
        "cluster's does (Slurm's `scancel`, a pre-emption): the workers ignore it and the trainer stops "
        "gracefully. Each SIGKILL goes to the trainer alone (the OOM killer's way); its workers exit "
        "on their own once it is gone.",
        "",
        "| # | signal | at step (last logged row) | exit | status after | episodes redone | seconds lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(result["events"], 1):
        seconds = f"{e['seconds_lost']:.1f}" if "seconds_lost" in e else "n/a"
        lines.append(f"| {i} | {e['signal']} | {e['step']} | {e.get('code')} | {e.get('status')} | "
                     f"{e.get('episodes_redone', 'n/a')} | {seconds} |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, text: str) -> None:
    """Replace the soak's part of `out` (all before its first `## ` section) and keep the sections other
    scripts wrote below it (the corruption scan, the multi-worker kills); atomic."""
    if str(ROOT) not in sys.path:  # run as a script, or imported by a test
        sys.path.insert(0, str(ROOT))
    from dreamer_tf.utils import atomic_write_text
    old = out.read_text() if out.exists() else ""
    kept = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    atomic_write_text(out, text + ("\n" + kept if kept else ""))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs (default 6)")
    p.add_argument("--terms", type=int, default=3, help="SIGTERMs (default 3)")
    p.add_argument("--steps", type=int, default=3000, help="env steps of the debug run (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the signal schedule (default 0)")
    p.add_argument("--jitter", type=float, default=1.5, help="at most this many seconds after the target "
                   "step (default 1.5)")
    p.add_argument("--overlap", action="store_true", help="the overlapped loop (overlap=true)")
    p.add_argument("--no-compare", action="store_true", help="skip the uninterrupted reference run (record "
                   "checks only)")
    p.add_argument("--logdir", default=None, help="run directory (default: a fresh temp directory); the "
                   "reference run goes beside it, in <logdir>.reference")
    p.add_argument("--out", default=str(ROOT / "results" / "reliability.md"), help="the report (markdown)")
    args = p.parse_args(argv)
    logdir = Path(args.logdir) if args.logdir else Path(tempfile.mkdtemp(prefix="soak-")) / "run"
    if logdir.exists() and any(logdir.iterdir()):
        p.error(f"--logdir {logdir} is not empty; the soak needs a fresh run")
    logdir.parent.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from dreamer_tf.utils import git_commit
    commit = git_commit(ROOT)  # the code under test, read before the runs
    extra = ["overlap=true"] if args.overlap else []
    reference = None
    if not args.no_compare:
        reference = logdir.parent / f"{logdir.name}.reference"
        started = time.time()
        subprocess.run(run_command(reference, args.steps, extra), check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2"))
        print(f"reference run: {time.time() - started:.0f} s, {reference}")
    result = soak(logdir, args.kills, args.terms, args.steps, args.seed, args.jitter, args=extra,
                  reference=reference)
    text = report(result, argv, commit)
    write_report(Path(args.out), text)
    print(text)
    print(f"run directory: {logdir}; wrote {args.out}")
    return 0 if not result["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
