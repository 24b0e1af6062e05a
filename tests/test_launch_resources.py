"""The launcher's resources: GPU memory set-up, GPU slots of the local backend, the Ray backend's GPU
share and lost-worker retry, the disk estimate and preflight, and no retry of a disk-full run."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest

from dreamer_tf import config
from dreamer_tf.run.devices import configure_gpus
from dreamer_tf.study import benchmark, disk, launch, preflight

# A stand-in trainer: records its environment and --set items, holds its GPU for FAKE_HOLD s, then
# finishes. FAKE_DISK_FULL=1: stops like the trainer on a full disk (status failed, exit 1).
# FAKE_KILL_WORKER=1: on the first attempt kills its parent (a Ray worker), as a lost node would.
FAKE = textwrap.dedent('''
    import argparse, json, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--task"); p.add_argument("--logdir"); p.add_argument("--seed", type=int)
    p.add_argument("--preset"); p.add_argument("--set", nargs="+", default=[])
    a = p.parse_args()
    sets = dict(item.split("=", 1) for item in a.set)
    steps = int(float(sets.get("steps", 1000)))
    def status(s, message=""):
        with open(os.path.join(a.logdir, "status.tmp"), "w") as f:
            json.dump({"status": s, "step": steps if s == "finished" else 10, "steps": steps,
                       "message": message}, f)
        os.replace(os.path.join(a.logdir, "status.tmp"), os.path.join(a.logdir, "status.json"))
    start = time.time()
    if os.environ.get("FAKE_DISK_FULL"):
        status("failed", "No space left on device writing %s/metrics.jsonl (0.1 MB free of 64.0 MB); "
                         "the last good checkpoint ckpt-000000000200 is kept" % a.logdir)
        print("dreamer-tf: run failed: No space left on device", flush=True)
        sys.exit(1)
    marker = os.path.join(a.logdir, "killed_worker")
    if os.environ.get("FAKE_KILL_WORKER") and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)  # the Ray worker dies; its death signal ends us
        time.sleep(60)
    time.sleep(float(os.environ.get("FAKE_HOLD", "0")))
    with open(os.path.join(a.logdir, "env.jsonl"), "a") as f:
        f.write(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "set": a.set,
                            "start": start, "end": time.time()}) + "\\n")
    status("finished")
''')


@pytest.fixture
def fake(tmp_path: Path) -> str:
    path = tmp_path / "fake_trainer.py"
    path.write_text(FAKE)
    return f"{sys.executable} {path}"


def _records(root: Path) -> dict[str, list[dict]]:
    return {str(p.parent.relative_to(root)): [json.loads(l) for l in p.read_text().splitlines()]
            for p in root.glob("*/*/*/env.jsonl")}


# ------------------------------------------------------------------------------------------------
# GPU memory


def test_gpu_memory_config_is_growth_or_mib():
    assert config.load("paper").gpu_memory == "growth"
    assert config.load("paper", {"gpu_memory": 8192}).gpu_memory == 8192
    assert config.load("paper", config.parse_overrides(["gpu_memory=4096"])).gpu_memory == 4096
    for bad in ("grow", 0, -5, 1.5, True):
        with pytest.raises(config.ConfigError, match=rf"'gpu_memory': value {bad!r} is not one of"):
            config.load("paper", {"gpu_memory": bad})


class _FakeTF:
    """tf.config's GPU calls, recorded."""

    def __init__(self, gpus: int):
        self.calls = []
        devices = [types.SimpleNamespace(name=f"/physical_device:GPU:{i}") for i in range(gpus)]
        record = lambda name: lambda *args: self.calls.append((name, *args))  # noqa: E731
        self.config = types.SimpleNamespace(
            list_physical_devices=lambda kind: devices if kind == "GPU" else [],
            experimental=types.SimpleNamespace(set_memory_growth=record("growth")),
            set_logical_device_configuration=record("logical"),
            LogicalDeviceConfiguration=lambda memory_limit: ("limit", memory_limit))


def test_configure_gpus_sets_growth_or_a_limit_on_every_gpu():
    tf = _FakeTF(2)
    assert configure_gpus("growth", tf) == ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    assert [(c[0], c[1].name, c[2]) for c in tf.calls] == [
        ("growth", "/physical_device:GPU:0", True), ("growth", "/physical_device:GPU:1", True)]
    tf = _FakeTF(2)
    configure_gpus(8192, tf)
    assert [(c[0], c[2]) for c in tf.calls] == [("logical", [("limit", 8192)])] * 2
    tf = _FakeTF(0)  # no GPU: nothing to set
    assert configure_gpus("growth", tf) == [] and tf.calls == []


# ------------------------------------------------------------------------------------------------
# GPU slots of the local backend


def test_concurrency_follows_the_gpu_slots():
    assert launch.concurrency(None, None) == (1, "1 concurrent run(s) (no GPUs found: each run "
                                                 "inherits CUDA_VISIBLE_DEVICES)")
    assert launch.concurrency(None, ["0", "1"], 2)[0] == 4
    jobs, line = launch.concurrency(8, ["0", "1"], 2)
    assert jobs == 4 and "--jobs 8 capped to the GPU slots (GPUs 0,1 x 2 run(s) per GPU)" in line
    assert launch.concurrency(1, ["0", "1"])[0] == 1
    for bad in ((0, None, 1), (None, None, 0), (None, ["0"], 0)):
        with pytest.raises(launch.BenchmarkError, match="must be at least 1, got 0"):
            launch.concurrency(*bad)
    assert launch.parse_gpu_ids("2,GPU-ab12, 3") == ["2", "GPU-ab12", "3"]
    assert launch.parse_gpu_ids("0,-1,1") == ["0"] and launch.parse_gpu_ids("") == []


def _overlaps(records: list[dict]) -> int:
    """The most runs alive at once among `records` (start/end times)."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records],
                    key=lambda e: (e[0], e[1]))
    alive = most = 0
    for _, change in events:
        alive += change
        most = max(most, alive)
    return most


@pytest.mark.parametrize("gpus,per_gpu,runs", [("0,1", 1, 4), ("7", 2, 3)])
def test_local_runs_get_their_own_gpu_slot(tmp_path, fake, capsys, monkeypatch, gpus, per_gpu, runs):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)  # the default --gpus: all visible
    monkeypatch.setenv("FAKE_HOLD", "1.0")  # longer than a trainer's start-up jitter
    tasks = ["dmc_cup_catch", "dmc_walker_walk", "dmc_cheetah_run", "dmc_reacher_easy"][:runs]
    root = tmp_path / "root"
    argv = ["--root", str(root), "--train-cmd", fake, "--steps", "1000", "--seeds", "0",
            "--runs-per-gpu", str(per_gpu), "--tasks", *tasks]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr().out
    slots = len(gpus.split(",")) * per_gpu
    assert f"# {slots} concurrent run(s), one per GPU slot" in out
    records = [r for rs in _records(root).values() for r in rs]
    assert len(records) == runs
    by_gpu: dict[str, list[dict]] = {}
    for record in records:
        by_gpu.setdefault(record["cuda"], []).append(record)
    assert set(by_gpu) == set(gpus.split(","))  # one GPU id each, only the given ones
    assert all(_overlaps(rs) <= per_gpu for rs in by_gpu.values())  # never more than k on a GPU
    assert sum(len(rs) for rs in by_gpu.values()) > slots  # a freed slot was given to a later run
    assert _overlaps(records) == slots  # and the slots were all used at once


def test_gpus_none_hides_the_gpus(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    root = tmp_path / "root"
    assert benchmark.main(["--root", str(root), "--train-cmd", fake, "--steps", "1000", "--seeds", "0",
                           "--tasks", "dmc_cup_catch", "--gpus", "none"]) == 0
    assert [r["cuda"] for r in _records(root)["dmc_cup_catch/dreamer/0"]] == [""]
    assert benchmark.main(["--root", str(root), "--gpus", "0", "x,-1", "--dry-run"]) == 2
    assert "--gpus 0 x,-1: give GPU ids" in capsys.readouterr().err


def test_gpus_that_are_not_visible_are_refused_unless_the_runs_start_elsewhere(tmp_path, fake, capsys,
                                                                              monkeypatch):
    """Runs given a GPU that is not there would train on the CPU silently; --train-cmd (srun, a
    container) starts them where the GPUs may be, so the ids are then taken as given."""
    root, plan = tmp_path / "root", ["--tasks", "dmc_cup_catch", "--seeds", "0", "--steps", "1000"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # a machine without GPUs
    assert benchmark.main(["--root", str(root), *plan, "--gpus", "0", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 0 1: not visible here (visible: none)" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert benchmark.main(["--root", str(root), *plan, "--gpus", "1,2"]) == 2
    assert "--gpus 2: not visible here (visible: 0 1)" in capsys.readouterr().err and not root.exists()
    assert benchmark.main(["--root", str(root), *plan, "--gpus", "5", "--train-cmd", fake]) == 0
    assert [r["cuda"] for r in _records(root)["dmc_cup_catch/dreamer/0"]] == ["5"]


# ------------------------------------------------------------------------------------------------
# Disk


def test_disk_estimate_by_hand():
    c = config.load("paper").to_dict()
    frames = 2_500_000  # 5e6 env steps / action repeat 2
    # results/replay_memory.md's worst task (quadruped run) with headroom: stores.DISK_BYTES_PER_FRAME
    assert disk.estimate(c).replay == pytest.approx(frames * 4864)  # chunks, the default
    assert disk.estimate(c).store == "chunks"
    assert disk.estimate(dict(c, replay_store="frames")).replay == pytest.approx(frames * 17280)  # + .npz
    assert disk.estimate(dict(c, replay_store="cache")).replay == pytest.approx(frames * 4544)
    # Parameters: checked against a debug checkpoint (231031 tensor values = 3 x 77007 + 3 counters,
    # cartpole: 1 action dimension).
    assert disk.parameter_count(config.load("debug"), actions=1) == 77007
    params = disk.parameter_count(c)
    assert disk.estimate(c).checkpoints == 3 * (12 * params + 64 * 1024)
    assert disk.estimate(c).videos == 501 * 2 * 100 * 8.4 * 1024  # an evaluation at 0, 10k, ..., 5e6
    assert disk.estimate(c).logs == (5000 + 501) * 1024
    e = disk.estimate(c)
    assert e.remaining(0.0, False) == pytest.approx(e.total)
    assert e.remaining(0.5, True) == pytest.approx((e.replay + e.videos + e.logs) / 2 + e.checkpoints / 3)
    assert e.remaining(1.0, True) == 0.0
    assert disk.human(41.3e9) == "38.5 GiB"


def test_preflight_refuses_a_plan_that_does_not_fit(tmp_path, fake, capsys, monkeypatch):
    root = tmp_path / "root"
    argv = ["--root", str(root), "--train-cmd", fake, "--seeds", "0", "1", "--tasks", "dmc_cup_catch"]
    need = 2 * disk.estimate(config.load("paper")).total
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=int(need * 0.75)))
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (f"error: the plan needs {disk.human(need)} of disk under {root} but only "
                   f"{disk.human(int(need * 0.75))} is free there; free space, or pass --force")
    assert not (root / "dmc_cup_catch").exists()  # refused before any run was started
    # With a larger store the compact one is named as a way out.
    assert benchmark.main(argv + ["--set", "replay_store=frames"]) == 2
    assert "use a smaller replay_store (--set replay_store=chunks), or pass --force" in capsys.readouterr().err
    # ... and not for `cache`, whose .npz files alone take less than chunked files.
    assert benchmark.main(argv + ["--set", "replay_store=cache"]) == 2
    assert "replay_store=chunks" not in capsys.readouterr().err
    # A finished run needs nothing more, a half-done one half of what grows: now it fits.
    done = root / "dmc_cup_catch/dreamer/1"
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"status": "finished", "step": 5_000_000}))
    assert benchmark.main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"# disk: the unfinished runs need {disk.human(need / 2)}," in out and ": fits" in out
    half = root / "dmc_cup_catch/dreamer/0"  # half done, with checkpoints: the rest, one more checkpoint
    (half / "checkpoints/ckpt-000002500000").mkdir(parents=True)
    (half / "status.json").write_text(json.dumps({"status": "running", "step": 2_500_000}))
    assert benchmark.main(argv + ["--dry-run"]) == 0
    rest = disk.estimate(config.load("paper")).remaining(0.5, True)
    assert f"# disk: the unfinished runs need {disk.human(rest)}," in capsys.readouterr().out
    for run in (half, done):
        (run / "status.json").unlink()
    # --force starts what does not fit.
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    assert benchmark.main(argv + ["--steps", "1000"]) == 2
    assert benchmark.main(argv + ["--steps", "1000", "--force"]) == 0
    assert "DOES NOT FIT (a start is refused without --force)" in capsys.readouterr().out


def test_a_disk_full_run_is_not_retried(tmp_path, fake, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_DISK_FULL", "1")
    argv = ["--root", str(tmp_path / "root"), "--train-cmd", fake, "--steps", "1000", "--seeds", "0",
            "--tasks", "dmc_cup_catch", "--retries", "2"]
    assert benchmark.main(argv) == 1
    out = capsys.readouterr().out
    assert out.count("start     dmc_cup_catch/dreamer/0") == 1 and "retry" not in out
    assert "DISK FULL dmc_cup_catch/dreamer/0 at step 10/1000, not retried: No space left on device" in out
    assert "total: 1 disk-full" in out and "stopped on a full disk and were not retried" in out


# ------------------------------------------------------------------------------------------------
# Ray backend: fake GPUs


@pytest.fixture(scope="module")
def ray_two_gpus():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed")
    import ray
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Workers inherit this process's environment (PYTHONPATH: this checkout's dreamer_tf).
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_runs_sharing_a_gpu_see_their_gpu_and_grow_memory(tmp_path, fake, capsys, ray_two_gpus):
    root = tmp_path / "root"
    specs = benchmark.plan(root, ["dmc_cup_catch", "dmc_walker_walk", "dmc_cheetah_run", "dmc_reacher_easy"],
                           [0], steps=1000, train_cmd=fake.split())
    results = benchmark.run_ray(specs, gpus_per_run=0.5, cpus_per_run=0.5, out=sys.stdout)
    assert [r.outcome for r in results] == ["finished"] * 4, capsys.readouterr().out
    records = _records(root)
    cuda = [rs[0]["cuda"] for rs in records.values()]
    assert sorted(set(cuda)) <= ["0", "1"] and all(cuda.count(g) <= 2 for g in set(cuda))
    # The trainer's config: nothing overrides gpu_memory, so the default (growth) applies.
    assert all(not any(s.startswith("gpu_memory") for s in rs[0]["set"]) for rs in records.values())
    assert config.load("paper", config.parse_overrides(records["dmc_cup_catch/dreamer/0"][0]["set"])) \
        .gpu_memory == "growth"
    assert all("GPU " in r.node for r in results)


@pytest.mark.slow
def test_ray_lost_worker_is_resubmitted_and_resumes(tmp_path, fake, capsys, monkeypatch, ray_two_gpus):
    # Ray's workers have the fixture's environment: tell the trainer through its command.
    specs = benchmark.plan(tmp_path / "root", ["dmc_cup_catch"], [0], steps=1000,
                           train_cmd=["env", "FAKE_KILL_WORKER=1", *fake.split()])
    (result,) = benchmark.run_ray(specs, gpus_per_run=0, cpus_per_run=1, retries=0, out=sys.stdout)
    out = capsys.readouterr().out
    assert result.outcome == "finished", out
    assert "Ray task error: WorkerCrashedError" in out or "Ray task error: NodeDiedError" in out
    assert "retry     dmc_cup_catch/dreamer/0 (node or worker lost" in out  # despite --retries 0
    assert result.attempts == 2 and (specs[0].logdir / "killed_worker").exists()
