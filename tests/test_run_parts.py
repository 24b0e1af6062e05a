"""Unit tests of the run's parts: checkpoints, metrics log, videos, the divergence guard."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf import config
from dreamer_tf.run.checkpoint import CheckpointError, Checkpointer
from dreamer_tf.run.logger import Logger, read_metrics
from dreamer_tf.run.logdir import Diverged
from dreamer_tf.run.loop import Trainer
from dreamer_tf.run.video import encode_gif, tile_batch


class Tiny(tf.Module):
    def __init__(self, value=0.0):
        self.w = tf.Variable(tf.fill([3], value))
        self.count = tf.Variable(0, dtype=tf.int64)


def test_checkpoint_round_trip_keeps_newest_and_prunes(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ckpt.latest() is None
    for step in (100, 200, 300):
        ckpt.save(Tiny(float(step)), step, {"episodes": step // 100})
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("ckpt-*")) == ["ckpt-000000000200", "ckpt-000000000300"]
    module = Tiny()
    state = ckpt.restore(module)
    assert state == {"episodes": 3, "step": 300}
    np.testing.assert_array_equal(module.w.numpy(), [300.0] * 3)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "ckpt-000000000300"


def test_checkpoint_ignores_partial_writes(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(Tiny(1.0), 10, {})
    # A kill during a save leaves a temp dir (and maybe a directory without state.json).
    (tmp_path / "ckpt" / ".tmp-ckpt-000000000020-999").mkdir()
    (tmp_path / "ckpt" / "ckpt-000000000030").mkdir()
    assert ckpt.latest().name == "ckpt-000000000010"
    module = Tiny()
    assert ckpt.restore(module)["step"] == 10 and module.w.numpy()[0] == 1.0


def test_restore_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found in"):
        Checkpointer(tmp_path / "none").restore(Tiny())
    ckpt = Checkpointer(tmp_path / "ckpt")
    path = ckpt.save(Tiny(1.0), 10, {})
    for f in path.glob("agent.data*"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot be restored"):
        ckpt.restore(Tiny())


def test_metrics_truncate_drops_later_rows_and_partial_lines(tmp_path):
    log = Logger(tmp_path, tensorboard=False)
    for step in (0, 100, 200, 300):
        log.write(step, {"loss": step / 10, "bad": float("nan")})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 400, "lo')  # a kill mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 100, 200, 300]
    assert read_metrics(tmp_path)[0]["bad"] is None
    assert log.truncate(150) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 100]
    log.write(200, {"loss": 1})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 100, 200]


def test_tensorboard_scalars_and_gif(tmp_path):
    log = Logger(tmp_path)
    log.write(5, {"model_loss": 1.5, "test_return": 10.0})
    frames = np.random.default_rng(0).integers(0, 255, (6, 16, 24, 3), dtype=np.uint8)
    path = log.video(5, "openloop", frames)
    log.close()
    assert path.read_bytes()[:6] in (b"GIF89a", b"GIF87a")
    tags = set()
    for event_file in (tmp_path / "tb").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(v.tag for v in event.summary.value)
    assert {"train/model_loss", "test/return", "video/openloop"} <= tags


def _tensorboard_points(tb_dir):
    """{(tag, step): count} over all event files, plus the GIF sizes of image summaries."""
    points, sizes = {}, {}
    for event_file in tb_dir.glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                points[value.tag, event.step] = points.get((value.tag, event.step), 0) + 1
                if value.HasField("image"):
                    sizes[value.tag, event.step] = (value.image.height, value.image.width)
    return points, sizes


def test_rollback_rewrites_tensorboard_and_drops_later_videos(tmp_path):
    """A resumed run's TensorBoard shows each kept point once and nothing after the checkpoint."""
    log = Logger(tmp_path)
    frames = np.zeros((3, 16, 24, 3), np.uint8)
    for step in (0, 100, 200, 300):
        log.write(step, {"model_loss": step / 10, "test_return": float(step)})
        log.video(step, "openloop", frames)
    log.close()
    resumed = Logger(tmp_path)  # a restart from a checkpoint at step 100
    assert resumed.rollback(100) == 2
    resumed.write(200, {"model_loss": -1.0})  # the redone step
    resumed.close()
    points, sizes = _tensorboard_points(tmp_path / "tb")
    assert points == {("train/model_loss", 0): 1, ("test/return", 0): 1, ("video/openloop", 0): 1,
                      ("train/model_loss", 100): 1, ("test/return", 100): 1, ("video/openloop", 100): 1,
                      ("train/model_loss", 200): 1}
    assert sizes[("video/openloop", 100)] == (16, 24)
    assert sorted(p.name for p in (tmp_path / "videos").glob("*.gif")) == [
        "openloop_000000000.gif", "openloop_000000100.gif"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 100, 200]


def test_gif_and_tiling_shapes():
    import imageio.v3 as iio
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(4)[:, None, None] * 60
    decoded = iio.imread(encode_gif(frames), index=None)
    assert decoded.shape[:3] == (4, 8, 8)
    with pytest.raises(ValueError, match="uint8 frames"):
        encode_gif(frames.astype(np.float32))
    video = np.arange(3 * 2 * 2 * 2 * 1).reshape(3, 2, 2, 2, 1)
    grid = tile_batch(video)
    assert grid.shape == (2, 2, 6, 1)
    np.testing.assert_array_equal(grid[1, :, 2:4, 0], video[1, 1, :, :, 0])


class _NonFiniteAgent:
    """Returns non-finite model metrics for the first `bad` updates."""

    def __init__(self, bad):
        self.bad, self.calls = bad, 0

    def train(self, batch):
        self.calls += 1
        nonfinite = float(self.calls <= self.bad)
        return {"model_loss": float("nan") if nonfinite else 1.0, "model_nonfinite": nonfinite,
                "actor_nonfinite": 0.0, "value_nonfinite": 0.0}


def test_divergence_guard_counts_skips_and_stops(tmp_path):
    trainer = Trainer(config.load("debug", {"max_nonfinite": 3}), tmp_path, tensorboard=False)
    batches = itertools.repeat({})
    trainer.agent = _NonFiniteAgent(bad=2)
    skipped = []
    for _ in range(3):  # two skipped, then a good update resets the streak
        skipped.append(trainer._check(trainer.agent.train(next(batches)))["skipped_updates"])
    assert skipped == [1.0, 1.0, 0.0] and trainer.state.nonfinite_streak == 0
    trainer.agent = _NonFiniteAgent(bad=10)
    with pytest.raises(Diverged, match=r"3 consecutive non-finite updates .*model_loss=nan"):
        for _ in range(5):
            trainer._check(trainer.agent.train(next(batches)))
    assert trainer.agent.calls == 3


class _SeededEnvs:
    """Two envs with episodes of 2 and 3 steps that record the seed of every reset."""

    def __init__(self):
        self.lengths, self.t, self.seeds = [2, 3], [0, 0], [[], []]
        self.action_space = type("Box", (), {"shape": (1,)})()

    def __len__(self):
        return 2

    def reset(self, seeds):
        return [self.reset_at(i, seed) for i, seed in enumerate(seeds)]

    def reset_at(self, i, seed):
        self.t[i] = 0
        self.seeds[i].append(seed)
        return {"state": np.zeros(1, np.float32)}

    def step(self, actions):
        self.t = [t + 1 for t in self.t]
        dones = np.array([t == n for t, n in zip(self.t, self.lengths)])
        return [{"state": np.zeros(1, np.float32)}] * 2, np.zeros(2, np.float32), dones, [{}, {}]


def test_episode_seeds_follow_role_worker_and_index_and_survive_a_resume():
    """Each episode's reset seed is episode_seed(seed, role, worker, index), the index counted per
    role and worker; counters saved at a boundary give a rebuilt collector the same seeds."""
    from dreamer_tf.run.collect import Collector, EpisodeSeeds, episode_seed
    envs, seeds = _SeededEnvs(), EpisodeSeeds(7, {"train": 2, "prefill": 2, "eval": 1})
    collector = Collector(envs, envs.action_space, ["state"], seeds)
    collector.reset("prefill")
    for t in range(6):  # episodes that start after step 2 are training episodes
        collector.step(np.zeros((2, 1), np.float32), "prefill" if t < 2 else "train")
    assert collector.at_boundary and seeds.to_dict() == {"train": [1, 1], "prefill": [2, 1], "eval": [0]}
    expected = [[episode_seed(7, "prefill", 0, 0), episode_seed(7, "prefill", 0, 1)]
                + [episode_seed(7, "train", 0, k) for k in range(2)],
                [episode_seed(7, "prefill", 1, 0)] + [episode_seed(7, "train", 1, k) for k in range(2)]]
    assert envs.seeds == expected
    assert len({s for worker in expected for s in worker}) == 7  # roles, workers and indices all differ
    resumed = Collector(envs, envs.action_space, ["state"], EpisodeSeeds(7, {"train": 2, "prefill": 2, "eval": 1},
                                                                        seeds.to_dict()))
    resumed.reset("train")  # a resume at this boundary restarts the episodes in progress
    assert [worker[-1] for worker in envs.seeds] == [expected[0][-1], expected[1][-1]]
    with pytest.raises(ValueError, match="do not fit"):
        EpisodeSeeds(7, {"train": 2, "prefill": 2, "eval": 1}, {"train": [0]})


@pytest.mark.slow
def test_thread_pools_are_pinned_to_the_checkpoints_counts():
    """A resume on a machine whose default pool sizes differ uses the recorded ones (with a
    warning); equal counts or none recorded change nothing."""
    import json
    import subprocess
    import sys
    from dreamer_tf.run.threads import current_threads, pin_threads
    pin_threads(None)
    pin_threads(current_threads())  # the same counts: nothing to do, even with TensorFlow running
    code = ("import json; from dreamer_tf.run.threads import current_threads, pin_threads; "
            "pin_threads({'intra_op': 3, 'inter_op': 5}); import tensorflow as tf; tf.constant(1.0) + 1.0; "
            "print(json.dumps(current_threads()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"intra_op": 3, "inter_op": 5}
    assert "pinned TensorFlow thread pools to the checkpoint's {'intra_op': 3, 'inter_op': 5}" in proc.stderr


# --- issue 29: short episodes, the final evaluation, the ETA, what a stop waits for ----------------

def _episode(length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 255, (length, 64, 64, 3), dtype=np.uint8),
            "action": np.zeros((length, 1), np.float32), "reward": np.zeros(length, np.float32),
            "discount": np.ones(length, np.float32)}


class _VideoAgent:
    decoder = object()

    def video_predictions(self, batch):  # real | model | error side by side, as the agent's
        return np.concatenate([batch["image"]] * 3, axis=3)


def test_short_evaluation_episodes_skip_the_video_with_a_reason():
    from dreamer_tf.agent.openloop import CONTEXT
    from dreamer_tf.run.video import VideoSkipped, evaluation_video
    with pytest.raises(VideoSkipped, match=f"has 2 frames and an open-loop video needs more than {CONTEXT}"):
        evaluation_video(_VideoAgent(), [_episode(2)])
    # Episodes of different lengths: the video is as long as the shortest.
    name, frames = evaluation_video(_VideoAgent(), [_episode(9), _episode(7, 1)])
    assert name == "openloop" and frames.shape == (7, 64, 2 * 3 * 64, 3)


def test_the_logger_notes_a_skipped_video_once(tmp_path, capsys):
    log = Logger(tmp_path, tensorboard=False)
    for step in (0, 100):
        log.evaluation_video(step, _VideoAgent(), [_episode(3)])
    err = capsys.readouterr().err.splitlines()
    assert err == ["video: skipped at step 0: the evaluation episode has 3 frames and an open-loop video needs "
                   "more than 5 (this note is shown once)"]
    log.evaluation_video(200, _VideoAgent(), [_episode(8)])
    assert [p.name for p in (tmp_path / "videos").iterdir()] == ["openloop_000000200.gif"]
    log.close()


def test_episodes_all_shorter_than_batch_length_are_refused_in_one_line(tmp_path):
    from dreamer_tf.data import Replay
    from dreamer_tf.run.logdir import RunError
    from dreamer_tf.run.loop import trainable
    replay = Replay(tmp_path / "episodes", store="frames")
    assert not trainable(replay, 8, "gym_Blackjack-v1")  # no episode yet: nothing to train on, no error
    for i, length in enumerate((2, 4, 3, 4)):
        replay.add(_episode(length, i))
    with pytest.raises(RunError) as error:
        trainable(replay, 8, "gym_Blackjack-v1")
    message = str(error.value)
    assert "\n" not in message and message.startswith("gym_Blackjack-v1: the 4 episodes")
    assert "batch_length=8" in message and "these have 1, 2, 3;" in message and "at most 4" in message
    assert trainable(replay, 4, "gym_Blackjack-v1")  # one episode is long enough: shorter ones are skipped
    replay.sample(2, 4)


def test_the_final_evaluation_is_due_once_whatever_the_schedule():
    from dreamer_tf.run.loop import final_evaluation_due
    from dreamer_tf.run.resume import LoopState
    # steps=400, eval_every=300: the last scheduled evaluation was at 300, the next due at 600.
    assert final_evaluation_due(LoopState(step=400, next_eval=600, last_eval=300), 0)
    assert not final_evaluation_due(LoopState(step=400, next_eval=600, last_eval=400), 400)  # done, resumed
    assert final_evaluation_due(LoopState(step=600, next_eval=600, last_eval=300), 0)
    state = LoopState.from_dict(LoopState(step=400, next_eval=600, last_eval=400).to_dict())
    assert state.last_eval == 400  # in state.json, so a resume after the final checkpoint skips it
    # A checkpoint written before `last_eval` existed, and no evaluation since it was restored:
    old = {k: v for k, v in LoopState(step=400, next_eval=600).to_dict().items() if k != "last_eval"}
    assert LoopState.from_dict(old).last_eval is None
    assert not final_evaluation_due(LoopState.from_dict(old), 400)  # a finished run rerun: the old rule
    assert final_evaluation_due(LoopState.from_dict(old), 300)  # extended from 300 (e.g. 600 -> 800)


def test_progress_shows_no_eta_until_the_training_rate_is_measured():
    import io
    from dreamer_tf.run.logger import Progress
    now = [0.0]
    out = io.StringIO()
    progress = Progress(80000, 0, stream=out, measure_from=5000, clock=lambda: now[0])
    now[0] = 30.0
    progress.update(2)  # the step-0 evaluation compiled the policy: 2 steps in 30 s
    for step in range(100, 5001, 100):  # prefill: random actions, 500 steps/s
        now[0] += 0.2
        progress.update(step)
    for step in range(5010, 6001, 10):  # training: 1 step/s
        now[0] += 10.0
        progress.update(step)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[2/80000]") and " eta ? " in lines[0] + " "
    etas = [line.split(" eta ")[1].split()[0] for line in lines]
    assert all(eta == "?" for eta, line in zip(etas, lines) if int(line[1:].split("/")[0]) < 5120)
    assert etas[-1] != "?"
    hours, minutes, _ = map(int, etas[-1].split(":"))
    assert 20 <= hours + minutes / 60 <= 23  # 74000 steps left at 1 step/s: 20.6 hours


def test_a_stop_names_the_updates_it_waits_for(capsys):
    import signal
    from dreamer_tf.run.signals import GracefulStop
    stop = GracefulStop(lambda: "the 63 updates left of 100 (about 2 min)")
    stop._on_signal(signal.SIGINT, None)
    err = capsys.readouterr().err
    assert "SIGINT: finishing the episodes in progress after the 63 updates left of 100 (about 2 min), " \
           "then saving a checkpoint" in err
    GracefulStop()._on_signal(signal.SIGTERM, None)
    assert "SIGTERM: finishing the episodes in progress, then saving" in capsys.readouterr().err


def test_learner_says_how_many_updates_are_left(tmp_path):
    from dreamer_tf.run.learner import Learner
    seen = []

    class Agent:
        train_step_count = tf.Variable(0, dtype=tf.int64)

        def train(self, batch):
            seen.append(learner.in_progress())
            return {"model_loss": 1.0}

    class Replay:
        class _It:
            def __enter__(self):
                return iter(lambda: {}, None)

            def __exit__(self, *exc):
                return False

        def iterator(self, batch_size, length):
            return self._It()

    learner = Learner(Agent(), Replay(), 1, 2, lambda metrics: {})
    assert learner.in_progress() == ""
    learner.update(3)
    assert seen[0] == "the 3 updates left of 3" and seen[2].startswith("the 1 updates left of 3 (about ")
    assert learner.in_progress() == ""
