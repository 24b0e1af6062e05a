"""The overlapped loop (`overlap: true`, run/learner.py): updates in the background, the same
updates at the same env steps, an acting copy one phase old, and runs that resume bit-exact."""
import contextlib
import json
import threading

import numpy as np
import pytest
import tensorflow as tf

from dreamer_tf.run.learner import Learner, policy_variables, seed_for
from dreamer_tf.run.logger import read_metrics
from test_train import TASK, cli, kill_schedule, soak

pytestmark = pytest.mark.slow  # tests/conftest.py: the slow tier

WALL_CLOCK = ("env_steps_per_second", "train_seconds", "wall_time")


class _Module(tf.Module):
    def __init__(self, value):
        super().__init__()
        self.w = tf.Variable(float(value))


class _Agent:
    """Just what the Learner touches: modules with variables, a counter, a generator and train()."""

    def __init__(self, gate: threading.Event | None = None, fail_at: int | None = None):
        self.encoder, self.state_encoder = _Module(1.0), None
        self.rssm, self.actor, self.value = _Module(2.0), _Module(3.0), _Module(4.0)
        self.train_step_count = tf.Variable(0, dtype=tf.int64)
        self.rng = tf.random.Generator.from_seed(0)
        self.gate, self.fail_at = gate, fail_at

    def train(self, batch):
        if self.gate is not None:
            assert self.gate.wait(30)
        self.train_step_count.assign_add(1)
        for module in (self.encoder, self.rssm, self.actor, self.value):
            module.w.assign_add(1.0)
        return {"loss": float(batch), "model_nonfinite": 0.0}


class _Replay:
    def __init__(self):
        self.draws = 0

    @contextlib.contextmanager
    def iterator(self, batch_size, length):
        def batches():
            while True:
                self.draws += 1
                yield self.draws
        yield batches()


def _learner(agent, overlap, check=lambda metrics: {"skipped_updates": 0.0}):
    return Learner(agent, _Replay(), 2, 3, check, overlap=overlap)


def test_sequential_update_is_done_on_return():
    agent = _Agent()
    learner = _learner(agent, overlap=False)
    assert learner.acting(lambda: pytest.fail("no copy without overlap")) is agent
    learner.update(3)
    assert int(agent.train_step_count) == 3 and not learner.busy and learner.updates == 3
    assert learner.pop_metrics() == {"skipped_updates": [0.0] * 3, "loss": [1.0, 2.0, 3.0],
                                     "model_nonfinite": [0.0] * 3}


def test_overlapped_update_runs_beside_the_caller_and_hands_over_at_join():
    gate = threading.Event()
    agent = _Agent(gate)
    learner = _learner(agent, overlap=True)
    acting = learner.acting(lambda: _Agent())
    learner.sync_policy(seed_for(0, 0))
    before = [float(v) for v in policy_variables(acting)]
    learner.update(2)  # returns while the updates wait on the gate
    assert learner.busy and int(agent.train_step_count) == 0
    assert learner.pop_metrics() == {} and learner.updates == 0  # nothing handed over before join
    gate.set()
    learner.join()
    assert int(agent.train_step_count) == 2 and learner.updates == 2
    assert learner.pop_metrics()["loss"] == [1.0, 2.0]
    # The acting copy still has the weights of the last sync (one phase old) ...
    assert [float(v) for v in policy_variables(acting)] == before
    # ... until the next sync, which copies the policy's variables only (not the value model).
    learner.sync_policy(seed_for(0, 100))
    assert [float(v) for v in policy_variables(acting)] == [float(v) for v in policy_variables(agent)]
    assert float(acting.value.w) == 4.0 and float(agent.value.w) == 6.0


def test_overlapped_errors_surface_at_join_and_syncs_reseed_by_step():
    def check(metrics):
        raise RuntimeError("diverged")
    learner = _learner(_Agent(), overlap=True, check=check)
    learner.update(1)
    with pytest.raises(RuntimeError, match="diverged"):
        learner.join()
    assert not learner.busy
    learner.close()  # nothing in flight: no error
    # The acting copy's draws depend on the env step of the sync only.
    learner = _learner(_Agent(), overlap=True)
    acting = learner.acting(lambda: _Agent())
    draws = []
    for step in (100, 200, 100):
        learner.sync_policy(seed_for(0, step))
        draws.append(acting.rng.normal([3]).numpy())
    np.testing.assert_array_equal(draws[0], draws[2])
    assert not np.array_equal(draws[0], draws[1])


def test_wait_hands_nothing_over_and_a_restored_learner_joins_it_later():
    """A graceful stop waits for the updates in flight; their metrics and the logged update count
    still change only at the next join, also in the resumed process."""
    agent = _Agent()
    learner = _learner(agent, overlap=True)
    learner.update(2)
    learner.wait()
    assert not learner.busy and int(agent.train_step_count) == 2
    assert learner.updates == 0 and learner.unlogged_metrics() == {}
    unjoined = learner.unjoined_metrics()
    assert unjoined["loss"] == [1.0, 2.0]
    resumed = _learner(agent, overlap=True)
    resumed.restore_metrics({}, unjoined, learner.updates)
    assert resumed.updates == 0 and resumed.pop_metrics() == {}
    resumed.join()
    assert resumed.updates == 2 and resumed.pop_metrics()["loss"] == [1.0, 2.0]


def _rows(logdir):
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK and not k.startswith("seconds_")}
            for row in read_metrics(logdir)]


ARGS = ["overlap=true", "video_every=0"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted overlapped debug run (600 steps) the other runs are compared with."""
    logdir = tmp_path_factory.mktemp("overlap") / "whole"
    cli("train", "--task", TASK, "--preset", "debug", "--no-tensorboard", "--logdir", str(logdir),
        "--set", *ARGS, "steps=600")
    return logdir


def test_overlapped_runs_keep_the_schedule(whole):
    """The replay ratio is exact with the updates in the background. (That thread timing does not
    matter is shown by test_killed_overlapped_runs_resume_bit_exact: a run killed and resumed four
    times, with other timings throughout, gives the uninterrupted run's rows bit for bit.)"""
    rows = _rows(whole)
    # Pretrain (2) at the end of prefill (200), then 2 updates every 100 env steps; the updates
    # issued at the last step are finished and held for the next row.
    state = json.loads((whole / "checkpoints" / "ckpt-000000000600" / "state.json").read_text())
    last = max(r.get("train_updates", 0) for r in rows)
    assert last + len(state["unlogged"]["model_loss"]) == 2 + 2 * (600 - 200) // 100
    assert [r["train_episodes"] for r in rows if "train_return" in r] == list(range(1, 7))


def test_killed_overlapped_runs_resume_bit_exact(whole, tmp_path):
    """As test_train's test_killed_runs_resume_bit_exact, with the updates in the background: the
    SIGTERM's stop waits for the updates in flight, saves the acting copy and hands nothing over
    early, so the resumed run joins and syncs where the uninterrupted one does."""
    result = soak.soak(tmp_path / "killed", steps=600, schedule=kill_schedule(1, 300, 200), args=ARGS,
                       reference=whole, timeout=900, log=lambda line: None)
    assert result["problems"] == [], "\n".join(result["problems"])
    assert [e["signal"] for e in result["events"]] == ["SIGKILL", "SIGKILL", "SIGTERM", "SIGKILL"]
