"""The learner role: gradient updates on batches drawn from the replay.

Sequential (the paper's Algorithm 1, `overlap: false`): `update(n)` runs n updates and returns.

Overlapped (`overlap: true`): `update(n)` starts the n updates in a background thread and returns at
once, so the environments and the policy keep stepping while the learner trains. The schedule is
unchanged: the same updates are issued at the same env steps, on the same replay contents, so the
replay ratio is exact. What changes is the acting policy: it is a copy of the agent's weights taken
at the last sync (`sync_policy`), one training phase older than in the sequential loop. The loop
must not touch the replay while updates run: it keeps finished episodes aside and stores them at the
next `join()`, which it calls only at fixed env steps (training due, evaluation, checkpoint, end), so
an overlapped run is as reproducible, and resumes as exactly, as a sequential one.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from dreamer_tf.run.feed import Feed

__all__ = ["Learner", "policy_variables", "seed_for"]


def policy_variables(agent) -> list:
    """The variables `agent.policy` reads: encoders, RSSM, actor and the update counter (the linear
    exploration schedule runs on it)."""
    modules = [agent.encoder, agent.state_encoder, agent.rssm, agent.actor]
    return [v for m in modules if m is not None for v in m.variables] + [agent.train_step_count]


class Learner:
    """Runs `agent.train` on batches of `replay`, here or in a background thread (`overlap`).

    check: called with each update's metrics, in the thread that runs the update; returns metrics of
    its own to record with them (first). It may raise (e.g. `Diverged`); in overlapped mode the
    error is raised again by the next `join()`.
    The metrics of finished updates are handed over at `join()` (`pop_metrics`), so a logged row
    never depends on how far the background updates have got.
    """

    def __init__(self, agent, replay, batch_size: int, batch_length: int,
                 check: Callable[[dict[str, float]], dict[str, float]], overlap: bool = False, feed: Feed | None = None):
        self.agent, self.replay = agent, replay
        # multi_worker: the chief's feed (run/feed.py) gives each update to the followers too.
        self.feed = feed if feed is not None else Feed()
        self.batch_size, self.batch_length = batch_size, batch_length
        self.check, self.overlap = check, overlap
        self._running: dict[str, list[float]] = {}  # metrics of the updates in flight
        self._done: dict[str, list[float]] = {}     # ... of joined updates, until pop_metrics()
        self.seconds = 0.0          # wall time spent in updates (either thread)
        self.sample_seconds = 0.0   # ... of it waiting for a batch
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._acting = None
        self.updates = int(agent.train_step_count.numpy())  # updates done as of the last join
        self._phase: tuple[int, int, float] | None = None  # (done, issued, start) of the updates running

    # --- updates ----------------------------------------------------------------------------
    def update(self, steps: int) -> None:
        """Issue `steps` gradient updates: done on return, or (overlap) running until `join()`."""
        self.join()
        if steps <= 0:
            return
        if not self.overlap:
            self._run(steps)
            self._hand_over()
            return
        self._thread = threading.Thread(target=self._background, args=(steps,), name="learner", daemon=True)
        self._thread.start()

    def _background(self, steps: int) -> None:
        try:
            self._run(steps)
        except BaseException as e:  # raised again in the loop's thread by join()
            self._error = e

    def _run(self, steps: int) -> None:
        # One prefetching iterator per call, closed before episodes are added or a checkpoint is
        # taken: the replay's sampler state is then exact (see dreamer_tf.data.pipeline).
        start = time.perf_counter()
        try:
            with self.replay.iterator(self.batch_size, self.batch_length) as batches:
                for done in range(steps):
                    self._phase = (done, steps, start)
                    wait = time.perf_counter()
                    batch = next(batches)
                    self.sample_seconds += time.perf_counter() - wait
                    metrics = self.feed.train(self.agent, batch)
                    for key, value in {**self.check(metrics), **metrics}.items():
                        self._running.setdefault(key, []).append(value)
        finally:
            self._phase = None
            self.seconds += time.perf_counter() - start

    def in_progress(self) -> str:
        """'the 63 updates left of 100 (about 2 min)' while updates run, else ''."""
        phase = self._phase
        if phase is None:
            return ""
        done, steps, start = phase
        left = steps - done
        text = f"the {left} updates left of {steps}"
        if done:
            seconds = left * (time.perf_counter() - start) / done
            text += f" (about {seconds:.0f} s)" if seconds < 120 else f" (about {seconds / 60:.0f} min)"
        return text

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def join(self) -> None:
        """Wait for updates in flight and hand their metrics over; raise their error, if any."""
        self.wait()
        self._hand_over()

    def wait(self) -> None:
        """Wait for updates in flight without handing them over: a graceful stop's checkpoint,
        which must not change when their metrics reach a row (`unjoined_metrics`)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _hand_over(self) -> None:
        self.updates = int(self.agent.train_step_count.numpy())
        for key, values in self._running.items():
            self._done.setdefault(key, []).extend(values)
        self._running = {}

    def pop_metrics(self) -> dict[str, list[float]]:
        """Metrics of the joined updates since the last call, per key in update order."""
        done, self._done = self._done, {}
        return done

    def unlogged_metrics(self) -> dict[str, list[float]]:
        """A copy of what `pop_metrics` would return (for a checkpoint)."""
        return {k: list(v) for k, v in self._done.items()}

    def unjoined_metrics(self) -> dict[str, list[float]]:
        """Metrics of finished updates not yet handed over (only after `wait`), for a checkpoint."""
        assert not self.busy, "unjoined_metrics while updates run"
        return {k: list(v) for k, v in self._running.items()}

    def restore_metrics(self, metrics: dict[str, list[float]], unjoined: dict[str, list[float]] | None = None,
                        updates: int | None = None) -> None:
        """Restore a checkpoint's `unlogged_metrics`, `unjoined_metrics` and `updates`."""
        self._done = {k: list(v) for k, v in metrics.items()}
        self._running = {k: list(v) for k, v in (unjoined or {}).items()}
        if updates is not None:
            self.updates = int(updates)

    def close(self) -> None:
        """Wait for updates in flight and drop their error (the run is ending for another reason)."""
        try:
            self.join()
        except BaseException:
            pass

    # --- the acting copy ------------------------------------------------------------------
    def acting(self, make_copy: Callable[[], Any]):
        """The agent the collector acts with: the agent itself, or (overlap) its copy."""
        if not self.overlap:
            return self.agent
        if self._acting is None:
            self._acting = make_copy()
        return self._acting

    def sync_policy(self, seed: int) -> None:
        """Copy the agent's policy weights into the acting copy and reseed the copy's generator from
        `seed`, so its draws depend on where the run is, not on thread timing. Only while idle."""
        if self._acting is None:
            return
        assert not self.busy, "sync_policy while updates run"
        for target, source in zip(policy_variables(self._acting), policy_variables(self.agent), strict=True):
            target.assign(source)
        self._acting.rng.reset_from_seed(int(seed))


def seed_for(seed: int, step: int) -> int:
    """The acting copy's generator seed after a sync at env step `step`."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] % (2**63))
