"""Record (or recompute) the golden metrics that pin the agent's and the loop's behaviour.

    python tests/golden/record.py            # writes tests/golden/debug_seed0.json
    python tests/golden/record.py --print    # prints the values without writing
    python tests/golden/record.py --compare  # how far this machine is from the golden file (Markdown)

Two parts, both through public entry points only, so the file written before a refactor checks
the code after it (tests/test_golden.py):
  agent: 20 train steps of a seeded `debug`-sized agent on seeded synthetic batches (every
         metric of every step), then 5 policy steps (training and evaluation mode);
  run:   a seeded `dreamer-tf train --preset debug` run: every row of metrics.jsonl and, per
         stored episode, its length and the sums of reward, action and image.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "debug_seed0.json"
TASK = "dmc_cartpole_balance"
RUN_ARGS = ["--task", TASK, "--preset", "debug", "--no-tensorboard", "--seed", "0",
            "--set", "steps=500", "eval_every=250", "video_every=0"]
WALL_CLOCK_KEYS = ("env_steps_per_second", "train_seconds", "wall_time")  # and seconds_<part>


class _Box:
    def __init__(self, shape, low=-1.0, high=1.0, dtype=np.float32):
        self.shape, self.dtype = tuple(shape), dtype
        self.low, self.high = np.full(shape, low, np.float32), np.full(shape, high, np.float32)


def agent_metrics(steps: int = 20) -> dict:
    from dreamer_tf import config as configlib
    from dreamer_tf.agent import Dreamer
    config = configlib.load("debug", {"seed": 0})
    agent = Dreamer(config, {"image": _Box((64, 64, 3), 0, 255, np.uint8)}, _Box((2,)))
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.batch_length)
    train = []
    for _ in range(steps):
        batch = {"image": rng.integers(0, 256, shape + (64, 64, 3), dtype=np.uint8),
                 "action": rng.uniform(-1, 1, shape + (2,)).astype(np.float32),
                 "reward": rng.normal(size=shape).astype(np.float32)}
        train.append({k: float(v) for k, v in sorted(agent.train(batch).items())})
    actions, state = [], None
    for t in range(5):
        obs = {"image": rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8), "reset": np.array([t == 0] * 2)}
        action, state = agent.policy(obs, state, training=t % 2 == 0)
        actions.append(np.asarray(action).tolist())
    return {"train": train, "policy_actions": actions}


def run_metrics() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        logdir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dreamer_tf", "train", "--logdir", str(logdir), *RUN_ARGS]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        if proc.returncode != 0:
            raise RuntimeError(f"golden run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in row.items() if k not in WALL_CLOCK_KEYS and not k.startswith("seconds_")}
                for row in rows]
        episodes = []
        prefill = 200 // 100  # episodes (100 frames each) that end within the 200 prefill frames
        for index, path in enumerate(sorted((logdir / "train_episodes").glob("*.npz"))):
            from dreamer_tf.data import load_episode  # any store's file (chunked images too)
            data = load_episode(path)
            episodes.append({"length": int(len(data["reward"])), "reward": float(data["reward"].sum()),
                             "action": float(data["action"].astype(np.float64).sum()),
                             "image": int(data["image"].astype(np.int64).sum()),
                             "prefill": index < prefill})
    return {"metrics": rows, "episodes": episodes}


def fingerprint() -> dict:
    """What decides float rounding: TF version, the CPU's widest vector ISA, oneDNN on or off."""
    from importlib.metadata import version
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    import dreamer_tf  # noqa: F401  (sets the oneDNN default before TensorFlow is imported)
    from tensorflow.python.util import _pywrap_util_port
    return {"tensorflow": version("tensorflow"), "avx512f": " avx512f " in flags.replace("\n", " "),
            "onednn": bool(_pywrap_util_port.IsMklEnabled())}


def compute() -> dict:
    return {"agent": agent_metrics(), "run": run_metrics(), "fingerprint": fingerprint()}


def deviations(expected, actual, path: str = ""):
    """(path, relative deviation) of every number; lengths or keys that differ are infinite."""
    if isinstance(expected, dict):
        if sorted(expected) != sorted(actual):
            yield path, float("inf")
            return
        for k in expected:
            yield from deviations(expected[k], actual[k], f"{path}/{k}")
    elif isinstance(expected, list):
        if len(expected) != len(actual):
            yield path, float("inf")
            return
        for i, (e, a) in enumerate(zip(expected, actual)):
            yield from deviations(e, a, f"{path}[{i}]")
    elif isinstance(expected, (int, float)) and not isinstance(expected, bool):
        yield path, abs(expected - actual) / max(abs(expected), 1e-12) if expected != actual else 0.0
    elif expected != actual:
        yield path, float("inf")


def compare() -> str:
    """This machine against the golden file: the worst relative deviations per part (Markdown)."""
    golden = json.loads(GOLDEN.read_text())
    actual = compute()
    lines = ["# The golden record on this machine", "",
             f"Command: `python tests/golden/record.py --compare`; CPU: {_cpu()}.", "",
             f"Fingerprint here {actual['fingerprint']}, golden file's {golden['fingerprint']}.", ""]
    for part in ("agent", "run"):
        worst = sorted(deviations(golden[part], actual[part], part), key=lambda d: -d[1])
        lines += [f"## {part}: worst relative deviations", "", "| value | relative deviation |", "|---|---|"]
        lines += [f"| `{p}` | {d:.3g} |" for p, d in worst[:8]] + [""]
        ints = [(p, d) for p, d in worst if d and isinstance(_at(actual[part], p.split("/", 1)[1]), int)]
        lines += [f"{part}: integers that differ: " + (", ".join(f"`{p}` {d:.3g}" for p, d in ints) or "none"), ""]
    return "\n".join(lines)


def _at(tree, path: str):
    """The value at a `deviations` path ('metrics[3]/kl') of `tree`."""
    import re
    for key, index in re.findall(r"([^/\[\]]+)|\[(\d+)\]", path):
        tree = tree[int(index)] if index else tree[key]
    return tree


def _cpu() -> str:
    from dreamer_tf.utils import cpu_model_and_flags
    model, flags = cpu_model_and_flags()
    return f"{model}, {os.cpu_count()} cores, {'AVX-512' if 'avx512f' in flags else 'AVX2' if 'avx2' in flags else 'no AVX2'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print instead of writing the golden file")
    parser.add_argument("--compare", action="store_true", help="print this machine's deviations from the golden file")
    args = parser.parse_args()
    if args.compare:
        print(compare())
        return 0
    values = compute()
    text = json.dumps(values, indent=1, sort_keys=True) + "\n"
    if args.print:
        print(text)
    else:
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
