"""The training run end to end with the `debug` preset: CLI, metrics, video, checkpoint, resume, eval."""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.run.logger import read_metrics

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("soak", ROOT / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

TASK = "dmc_cartpole_balance"
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def cli(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("run") / "debug"
    proc = cli("train", "--task", TASK, "--preset", "debug", "--logdir", str(logdir))
    (logdir.parent / "stdout").write_text(proc.stdout)
    (logdir.parent / "stderr").write_text(proc.stderr)
    return logdir


def test_end_to_end_debug_run(finished_run):
    logdir = finished_run
    status = json.loads((logdir / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == status["steps"] == 600
    rows = read_metrics(logdir)
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)
    tests = [r for r in rows if "test_return" in r]
    assert [r["step"] for r in tests] == [0, 300, 600]
    assert all(np.isfinite(r["test_return"]) for r in tests)
    train_eps = [r for r in rows if "train_return" in r]
    assert [r["train_episodes"] for r in train_eps] == list(range(1, 7))  # 600 steps / 100 per episode
    assert [r["step"] for r in train_eps] == [100, 200, 300, 400, 500, 600]
    losses = [r for r in rows if "model_loss" in r]
    assert losses and all(np.isfinite(r["model_loss"]) for r in losses)
    for key in ("image_loss", "reward_loss", "kl", "actor_loss", "value_loss", "model_grad_norm"):
        assert key in losses[-1], key
    assert losses[-1]["train_updates"] == 2 + 4 * 2  # pretrain + train_steps per train_every after prefill
    assert len(list((logdir / "train_episodes").glob("*.npz"))) == 6
    assert sorted(p.name for p in (logdir / "videos").glob("*.gif")) == [
        "openloop_000000000.gif", "openloop_000000300.gif", "openloop_000000600.gif"]
    assert (logdir / "videos" / "openloop_000000600.gif").stat().st_size > 1000
    assert list((logdir / "tb").glob("events.out.tfevents.*"))
    assert (logdir / "checkpoints" / "latest").read_text().strip() == "ckpt-000000000600"
    from dreamer_tf import config
    assert config.load_file(logdir / "config.yaml") == config.load("debug", {"task": TASK})


def test_last_progress_line_and_finished_line_show_the_final_test_return(finished_run):
    final = [r for r in read_metrics(finished_run) if "test_return" in r][-1]
    assert final["step"] == 600
    progress = [l for l in (finished_run.parent / "stderr").read_text().splitlines() if l.startswith("[")]
    assert progress[-1].startswith("[600/600]") and f"test_return={final['test_return']:.1f}" in progress[-1]
    assert f"last test return {final['test_return']:.1f} (step 600)" in (finished_run.parent / "stdout").read_text()


def test_eval_command_scores_saved_agent(finished_run):
    proc = cli("eval", "--logdir", str(finished_run), "--episodes", "2", "--video")
    assert "mode policy at step 600" in proc.stdout
    result = json.loads((finished_run / "eval" / "eval-600.json").read_text())
    assert len(result["returns"]) == 2 and np.isfinite(result["mean"])
    assert (finished_run / "eval" / "eval-600.gif").stat().st_size > 1000


def test_rerun_of_finished_run_is_a_no_op_and_config_change_is_refused(finished_run):
    before = (finished_run / "metrics.jsonl").read_text()
    cli("train", "--logdir", str(finished_run))  # the stored config is reused
    assert (finished_run / "metrics.jsonl").read_text().count("train_return") == before.count("train_return")
    proc = cli("train", "--logdir", str(finished_run), "--preset", "debug", "--task", TASK,
               "--set", "batch_size=4", "free_nats=2", check=False)
    assert proc.returncode == 2
    assert "batch_size: stored 3 vs new 4" in proc.stderr and "free_nats: stored 3.0 vs new 2.0" in proc.stderr
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "dmc_walker_fly", "--preset", "debug"], "dmc_walker_fly"),
    (["train", "--preset", "tiny"], "unknown preset 'tiny'"),
    (["train", "--preset", "debug", "--set", "batch_size=big"], "'batch_size': value 'big' is a str"),
    (["train", "--preset", "debug", "--set", "batchsize=3"], "unknown config key 'batchsize'"),
    (["train", "--preset", "debug", "--set", "horizon"], "'horizon' is not of the form key=value"),
    (["eval", "--episodes", "1"], "is not a run directory"),
    (["train", "--preset", "debug", "--set", "expl=epsilon_greedy"], "'epsilon_greedy' is for discrete actions"),
])
def test_bad_cli_input_is_one_clear_line(tmp_path, args, message):
    proc = cli(*args, "--logdir", str(tmp_path / "x"), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_without_checkpoint_is_refused(tmp_path):
    from dreamer_tf import config
    logdir = tmp_path / "empty"
    logdir.mkdir()
    config.save(config.load("debug", {"task": TASK}), logdir / "config.yaml")
    proc = cli("eval", "--logdir", str(logdir), "--episodes", "1", check=False, timeout=300)
    assert proc.returncode == 2 and "no checkpoint found" in proc.stderr and "Traceback" not in proc.stderr


def kill_schedule(seed: int, eval_step: int, checkpoint_every: int) -> list[tuple[str, int, float, str]]:
    """Signals for a 600-step debug run (prefill 200): a SIGKILL during prefill, a SIGKILL during
    the evaluation at `eval_step` (it follows the scalar row of that step, written once its updates
    are done or, with overlap, issued) and, at seeded random steps, a SIGTERM and a SIGKILL in the
    episodes after it (each in an interval that a resume from the checkpoint before it runs through
    again)."""
    rng = random.Random(seed)
    term = rng.randrange(eval_step + 1, eval_step + checkpoint_every // 2)
    kill = rng.randrange(term - term % 100 + 150, 560)
    return [("SIGKILL", 100, 0.2, "train_return"), ("SIGKILL", eval_step, 0.5, "train_updates"),
            ("SIGTERM", term, 1.0, "step"), ("SIGKILL", kill, 1.0, "step")]


def test_killed_runs_resume_bit_exact(finished_run, tmp_path):
    """SIGKILLs during prefill, during an evaluation and at a random step, and a SIGTERM at another,
    each resumed by the same command: the run is the uninterrupted one (`finished_run`) bit for bit
    (episodes, metric rows but wall time, final weights and loop state), with nothing lost or doubled."""
    logdir = tmp_path / "killed"
    result = soak.soak(logdir, steps=600, schedule=kill_schedule(0, 300, 200), reference=finished_run,
                       timeout=900, log=lambda line: None)
    assert result["problems"] == [], "\n".join(result["problems"])
    assert [e["code"] for e in result["events"]] == [-signal.SIGKILL, -signal.SIGKILL, 128 + signal.SIGTERM,
                                                      -signal.SIGKILL]
    assert len(list((logdir / "orphaned_episodes").glob("*.npz"))) >= 1  # redone after a SIGKILL


def test_sigint_finishes_the_episode_saves_and_resumes_losing_nothing(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, environment workers included): the run finishes
    the episode in progress without training, checkpoints there and exits 130; resuming continues
    with the deferred updates, and nothing is orphaned or counted twice."""
    logdir = tmp_path / "stopped"
    # Periodic checkpoints only at 0 and 1000; updates every 30 env steps fall inside episodes.
    args = ["train", "--task", TASK, "--preset", "debug", "--logdir", str(logdir), "--no-tensorboard",
            "--set", "steps=1000", "checkpoint_every=1000", "eval_every=500", "train_every=30"]
    proc = subprocess.Popen([sys.executable, "-m", "dreamer_tf", *args], env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while len(list((logdir / "train_episodes").glob("*.npz"))) < 4:  # past prefill (2 episodes)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "the run did not store 4 episodes in time"
        time.sleep(0.2)
    time.sleep(1.0)  # into the next episode
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "finishing the episodes in progress" in stderr
    status = json.loads((logdir / "status.json").read_text())
    stopped_at = status["step"]
    assert status["status"] == "interrupted" and f"stopped by SIGINT at step {stopped_at}" in stderr
    assert 400 <= stopped_at < 1000 and stopped_at % 100 == 0  # an episode boundary
    assert (logdir / "checkpoints" / f"ckpt-{stopped_at:012d}").is_dir()
    assert len(list((logdir / "train_episodes").glob("*.npz"))) == stopped_at // 100

    done = cli(*args)
    assert f"resume: restored ckpt-{stopped_at:012d}" in done.stderr
    assert not (logdir / "orphaned_episodes").exists()  # nothing after the checkpoint was lost
    rows = read_metrics(logdir)
    assert [r["train_episodes"] for r in rows if "train_return" in r] == list(range(1, 11))
    assert [r["step"] for r in rows if "test_return" in r] == [0, 500, 1000]
    # Every update of an uninterrupted run: pretrain at prefill, then 2 every 30 env steps.
    assert max(r.get("train_updates", 0) for r in rows) == 2 + 2 * (1 + (1000 - 200 - 30) // 30)
    assert json.loads((logdir / "status.json").read_text())["status"] == "finished"


def test_atari_debug_run_with_discrete_actions_and_pcont(tmp_path):
    pytest.importorskip("ale_py")
    logdir = tmp_path / "pong"
    cli("train", "--task", "atari_pong", "--preset", "debug", "--logdir", str(logdir), "--no-tensorboard",
        "--set", "action_repeat=4", "pcont=true", "clip_rewards=tanh", "time_limit=200", "steps=800",
        "prefill=400", "train_every=200", "eval_every=800", "video_every=0")
    rows = read_metrics(logdir)
    losses = [r for r in rows if "model_loss" in r]
    assert losses and all(np.isfinite(r["pcont_loss"]) for r in losses)
    assert [r["step"] for r in rows if "test_return" in r] == [0, 800]
    from dreamer_tf.data import load_episode
    episode = load_episode(sorted((logdir / "train_episodes").glob("*.npz"))[-1])
    actions = episode["action"][1:]
    assert actions.shape == (50, 6)  # 200 frames / repeat 4; Pong's minimal action set has 6 actions
    np.testing.assert_array_equal(actions.sum(-1), 1.0)  # one-hot
    assert set(np.unique(actions)) == {0.0, 1.0}


@pytest.mark.parametrize("representation", ["contrastive", "reward"])
def test_representation_variants_run_end_to_end(tmp_path, representation):
    logdir = tmp_path / representation
    cli("train", "--task", TASK, "--preset", "debug", "--logdir", str(logdir), "--no-tensorboard",
        "--set", f"representation={representation}", "steps=300", "eval_every=300")
    losses = [r for r in read_metrics(logdir) if "model_loss" in r]
    assert losses and all(np.isfinite(r["model_loss"]) for r in losses)
    assert ("contrastive_loss" in losses[-1]) == (representation == "contrastive")
    assert sorted(p.name for p in (logdir / "videos").glob("*.gif")) == [
        "episode_000000000.gif", "episode_000000300.gif"]  # no decoder: real frames only


def test_extending_a_finished_run_with_set_steps(finished_run):
    """`train --logdir DIR --set steps=N` resumes with the stored config and a larger budget, and
    ends with an evaluation at N although N is not a multiple of eval_every (300); rerun once more,
    the finished run does not evaluate again."""
    proc = cli("train", "--logdir", str(finished_run), "--no-tensorboard", "--set", "steps=700")
    assert "resume: restored ckpt-000000000600" in proc.stderr
    status = json.loads((finished_run / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 700
    rows = read_metrics(finished_run)
    assert [r["train_episodes"] for r in rows if "train_return" in r] == list(range(1, 8))
    assert [r["step"] for r in rows if "test_return" in r] == [0, 300, 600, 700]
    assert "last test return" in proc.stdout and "(step 700)" in proc.stdout
    cli("train", "--logdir", str(finished_run), "--no-tensorboard", "--set", "steps=700")
    assert read_metrics(finished_run) == rows
    from dreamer_tf import config
    assert config.load_file(finished_run / "config.yaml").steps == 700


def _cli_without_tf(*args: str) -> tuple[int, str, bool, str]:
    """`dreamer-tf ARGS` in a fresh interpreter: (exit status, stderr, whether TensorFlow was imported,
    stdout)."""
    code = ("import sys; from dreamer_tf import cli; rc = cli.main(sys.argv[1:]); "
            "print('tensorflow' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, env=ENV)
    return proc.returncode, proc.stderr, proc.stdout.strip().endswith("True"), proc.stdout


def test_truncated_stored_config_is_refused_before_anything_is_touched(tmp_path):
    from dreamer_tf import config
    logdir = tmp_path / "cut"
    logdir.mkdir()
    config.save(config.load("debug", {"task": TASK}), logdir / "config.yaml")
    text = (logdir / "config.yaml").read_text()
    (logdir / "config.yaml").write_text("".join(text.splitlines(keepends=True)[:10]))
    status = '{"status": "interrupted", "step": 400}'
    (logdir / "status.json").write_text(status)
    for command in ("train",):
        code, err, tf, _ = _cli_without_tf(command, "--logdir", str(logdir))
        assert code == 2 and f"config file {logdir / 'config.yaml'} lacks" in err and "time_limit" in err, err
        assert len(err.strip().splitlines()) == 1 and not tf
    assert (logdir / "status.json").read_text() == status
    (logdir / "config.yaml").write_text(text.replace("batch_size: 3", "batch_size: banana"))
    code, err, tf, _ = _cli_without_tf("train", "--logdir", str(logdir))
    assert code == 2 and f"config file {logdir / 'config.yaml'}: config key 'batch_size'" in err and not tf


def test_bad_task_or_missing_checkpoint_is_one_line_before_tensorflow_and_leaves_no_run(tmp_path):
    """A mistyped gym id makes no run directory (so the corrected command is not refused); eval of a
    run without a checkpoint, or of a directory whose task cannot be built, is one line; none of these
    waits for TensorFlow's import."""
    from dreamer_tf import config
    bad = tmp_path / "typo"
    code, err, tf, _ = _cli_without_tf("train", "--preset", "debug", "--task", "gym_Taxi-v3", "--logdir", str(bad))
    assert code == 2 and "unknown gymnasium id 'Taxi-v3'" in err and len(err.strip().splitlines()) == 1, err
    assert not bad.exists() and not tf
    logdir = tmp_path / "nockpt"
    logdir.mkdir()
    config.save(config.load("debug", {"task": TASK}), logdir / "config.yaml")
    code, err, tf, _ = _cli_without_tf("eval", "--logdir", str(logdir))
    assert code == 2 and "no checkpoint found" in err and len(err.strip().splitlines()) == 1 and not tf, err
    config.save(config.load("debug", {"task": "gym_NoSuchEnv-v0"}), logdir / "config.yaml")
    code, err, tf, _ = _cli_without_tf("eval", "--logdir", str(logdir), "--random")
    assert code == 2 and "NoSuchEnv" in err and len(err.strip().splitlines()) == 1 and not tf, err


def test_a_run_dir_without_checkpoint_or_episodes_takes_the_corrected_config(tmp_path):
    """A start that failed on its task (ids a gym_import module registers are checked only in the
    worker) leaves config.yaml and status.json: the corrected command replaces them; a run with
    episodes or a checkpoint is still protected."""
    from dreamer_tf import config
    from dreamer_tf.run.logdir import RunError, prepare_logdir
    config.save(config.load("debug", {"task": "gym_Mine-v0", "gym_import": "mypkg"}), tmp_path / "config.yaml")
    (tmp_path / "status.json").write_text('{"status": "failed", "step": 0}')
    fixed = config.load("debug", {"task": "gym_Pendulum-v1"})
    assert prepare_logdir(fixed, tmp_path) == fixed and config.load_file(tmp_path / "config.yaml") == fixed
    (tmp_path / "train_episodes").mkdir()
    (tmp_path / "train_episodes" / "ep-0.npz").write_bytes(b"")
    with pytest.raises(RunError, match="different config"):
        prepare_logdir(config.load("debug"), tmp_path)


def test_eval_random_policy_names_no_step_and_prints_the_video_path(tmp_path):
    from dreamer_tf import config
    config.save(config.load("debug", {"time_limit": 10}), tmp_path / "config.yaml")
    code, err, tf, out = _cli_without_tf("eval", "--logdir", str(tmp_path), "--random", "--episodes", "1", "--video")
    assert code == 0, err
    assert out.startswith("random policy: return") and "step" not in out.splitlines()[0]
    assert f"video: {tmp_path / 'eval' / 'eval-random.gif'}" in out and (tmp_path / "eval" / "eval-random.gif").exists()


def test_every_train_and_eval_option_has_help_with_its_default():
    from dreamer_tf import cli
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("train", "eval"):
        for action in commands[name]._actions:
            assert action.help, f"{name} {action.option_strings} has no help"
            if action.default not in (None, False) and action.dest != "help":
                assert str(action.default) in action.help, f"{name} {action.option_strings}: default not shown"


def test_short_episodes_skip_the_video_and_are_refused_in_one_line(tmp_path):
    """Blackjack's episodes are 1-3 agent steps, shorter than the debug preset's batch_length 8: the
    step-0 video is skipped with a note, and the first training phase refuses in one line naming
    batch_length and the episode lengths (no sampler traceback)."""
    pytest.importorskip("gymnasium")
    logdir = tmp_path / "blackjack"
    proc = cli("train", "--task", "gym_Blackjack-v1", "--preset", "debug", "--logdir", str(logdir),
               "--no-tensorboard", "--set", "prefill=40", check=False, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("video: skipped at step 0")]
    assert len(notes) == 1 and "open-loop video needs more than 5" in notes[0]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("dreamer-tf: error: gym_Blackjack-v1: the ") and "batch_length=8" in error, error
    assert "these have " in error and "set batch_length to at most" in error
    assert not list((logdir / "videos").glob("*.gif"))
