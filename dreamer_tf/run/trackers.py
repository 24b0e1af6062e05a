"""Where a run's metrics go besides `metrics.jsonl`: the `Sink` interface and the experiment trackers
Weights & Biases (`wandb`) and MLflow (`mlflow`), chosen by the config key `loggers`.

Every sink gets the same scalars (named as in TensorBoard: `train/model_loss`, `test/return`,
`perf/env_steps_per_second`), the resolved config as run parameters, and the open-loop videos
(a W&B video; an MLflow artifact under `videos/`). The step of every point is the env step
(frames, action repeat included); W&B rows also carry `env_steps` (their x-axis) and
`agent_steps` (env steps / action repeat).

Each tracker reads its own environment variables: W&B `WANDB_PROJECT` (default `dreamer_tf`),
`WANDB_MODE`, `WANDB_ENTITY`, `WANDB_DIR` (default: the logdir), `WANDB_NAME`, `WANDB_RUN_GROUP`
(default: the task), `WANDB_API_KEY`, ...; MLflow `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`
(default `dreamer_tf`) or `MLFLOW_EXPERIMENT_ID`, `MLFLOW_RUN_ID`, ... The tracker's run id is
kept in `<logdir>/trackers.json`, so a resumed run continues the same W&B or MLflow run.

**Rows rolled back after a kill are never sent twice.** A killed run resumes from its newest
checkpoint and redoes the env steps after it, writing new rows in place of the dropped ones.
Neither tracker can take points back (MLflow has no API to delete metric points and appends a
second point at the same step; W&B ignores steps below its last one), so a tracker only gets rows
that a checkpoint has made permanent: rows are held back until the next checkpoint (`commit`),
and then sent. The tracker therefore lags the run by at most `checkpoint_every` env steps and
always shows exactly what `metrics.jsonl` keeps. `trackers.json` records the highest step sent;
on resume the kept rows above it are sent first (a kill between checkpoint and send loses
nothing; a tracker added on resume gets the whole history), and rows at or below it are never
sent again. When the process ends without a kill (finished, interrupted, failed, diverged), the
rows held back are sent too, so a failed run's last losses reach the tracker. The one case where
a tracker and `metrics.jsonl` then differ: a *failed* run that is later resumed redoes the steps
after its checkpoint, and the tracker keeps the values the failed attempt logged for them.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dreamer_tf.run.logdir import RunError
from dreamer_tf.utils import atomic_write_json

__all__ = ["TRACKERS", "STATE_FILE", "Sink", "Tracker", "MlflowTracker", "WandbTracker",
           "open_trackers", "scalar_name"]

STATE_FILE = "trackers.json"
INSTALL = {"wandb": 'pip install "dreamer_tf[wandb]"', "mlflow": 'pip install "dreamer_tf[mlflow]"'}
_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def scalar_name(key: str) -> str:
    """Group losses, returns and speed as TensorBoard does: "model_loss" -> "train/model_loss"."""
    if key.startswith(("test_", "train_return", "train_length", "eval_")):
        return key.replace("_", "/", 1)
    if key in ("fps", "train_fps", "updates_per_second", "env_steps_per_second"):
        return f"perf/{key}"
    return f"train/{key}"


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    return {scalar_name(k): float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Sink:
    """A destination of the run's metrics besides `metrics.jsonl` (which the Logger writes itself).

    `scalars` gets each row as written, `video` each GIF written under `videos/`; `commit(step)`
    says that a checkpoint now holds everything up to `step`; `rollback(step, rows, videos)` says the
    run resumes at `step` and `metrics.jsonl` / `videos/` keep `rows` / `videos`."""

    name = "sink"

    def params(self, config: Mapping[str, Any]) -> None:
        pass

    def scalars(self, step: int, row: Mapping[str, Any]) -> None:
        pass

    def video(self, step: int, name: str, path: Path) -> None:
        pass

    def commit(self, step: int) -> None:
        pass

    def rollback(self, step: int, rows: Sequence[Mapping[str, Any]],
                 videos: Sequence[tuple[str, int, Path]]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def read_state(logdir: Path) -> dict:
    try:
        return json.loads((Path(logdir) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _run_status(logdir: Path) -> tuple[str, str]:
    try:
        status = json.loads((logdir / "status.json").read_text())
        return str(status.get("status", "")), str(status.get("message", ""))
    except (FileNotFoundError, json.JSONDecodeError):
        return "", ""


class Tracker(Sink):
    """An experiment tracker fed only with committed rows (see the module docstring). Subclasses
    open or continue their run in `_open` and send a list of items in `_send`."""

    def __init__(self, logdir: str | os.PathLike, config: Mapping[str, Any] | None = None):
        self.logdir = Path(logdir)
        self.config = dict(config or {})
        stored = read_state(self.logdir).get(self.name, {})
        self.run_id, continued, self.target = self._open(stored)
        # Rows at or below `resume_mark` were sent by an earlier process: never again.
        self.resume_mark = int(stored.get("sent", -1)) if continued else -1
        self.sent = self.resume_mark
        self._pending: list[tuple] = []  # ("scalars", step, row) | ("video", step, name, path)
        self._save_state()
        if self.config:
            self.params(self.config)

    # --- subclass hooks -----------------------------------------------------------------
    def _open(self, stored: Mapping[str, Any]) -> tuple[str, bool, dict]:
        """(run id, whether it continues the stored run, what identifies the target)."""
        raise NotImplementedError

    def _send(self, items: Sequence[tuple]) -> None:
        raise NotImplementedError

    def _finish(self, status: str, message: str) -> None:
        raise NotImplementedError

    # --- the Sink interface ----------------------------------------------------------------
    def scalars(self, step: int, row: Mapping[str, Any]) -> None:
        if step > self.resume_mark:
            self._pending.append(("scalars", int(step), dict(row)))

    def video(self, step: int, name: str, path: Path) -> None:
        if step > self.resume_mark:
            self._pending.append(("video", int(step), name, Path(path)))

    def commit(self, step: int) -> None:
        """Send everything held back up to `step` (a checkpoint now holds it)."""
        ready = [item for item in self._pending if item[1] <= step]
        if self._deliver(ready):
            self.sent = max(self.sent, int(step))
            self._save_state()

    def rollback(self, step: int, rows: Sequence[Mapping[str, Any]],
                 videos: Sequence[tuple[str, int, Path]]) -> None:
        """Drop held-back items after `step`; send the kept rows and videos an earlier process did
        not send (those between the last step sent and the checkpoint)."""
        self._pending = [item for item in self._pending if item[1] <= step]
        missed = [("scalars", int(r["step"]), dict(r)) for r in rows if self.sent < int(r["step"]) <= step]
        missed += [("video", s, name, path) for name, s, path in videos if self.sent < s <= step]
        missed.sort(key=lambda item: item[1])  # stable: rows keep their order within a step
        self._pending = missed + self._pending
        self.commit(step)

    def close(self) -> None:
        """Send what is held back (the process ends without a kill) and end the tracker's run with
        the run's status from status.json."""
        if self._pending:
            last = max(item[1] for item in self._pending)
            if self._deliver(list(self._pending)):
                self.sent = max(self.sent, last)
                self._save_state()
        self._finish(*_run_status(self.logdir))

    # --- helpers --------------------------------------------------------------------------
    def _deliver(self, items: list[tuple]) -> bool:
        """Send `items` in order; on an error keep them for the next commit and warn."""
        if not items:
            return True
        try:
            self._send(items)
        except Exception as e:  # a tracker server that is down must not stop a long run
            print(f"warning: {self.name}: could not send {len(items)} item(s), retrying at the next "
                  f"checkpoint: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            return False
        sent = {id(item) for item in items}
        self._pending = [item for item in self._pending if id(item) not in sent]
        return True

    def _save_state(self) -> None:
        state = read_state(self.logdir)
        state[self.name] = {"run_id": self.run_id, "sent": self.sent, **self.target}
        atomic_write_json(self.logdir / STATE_FILE, state)

    def _run_name(self) -> str:
        task, seed = self.config.get("task"), self.config.get("seed")
        return f"{task} seed {seed} ({self.logdir.name})" if task else self.logdir.name


class MlflowTracker(Tracker):
    """MLflow: metrics with step = env steps, params = the resolved config, GIFs as artifacts."""

    name = "mlflow"

    def _open(self, stored):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        self.client = MlflowClient()
        uri = mlflow.get_tracking_uri()
        run_id = stored.get("run_id") if stored.get("tracking_uri") == uri else None
        continued = bool(run_id)
        run_id = run_id or os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            try:
                self.client.get_run(run_id)
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:
                print(f"warning: mlflow: run {run_id} not found at {uri}; starting a new run", file=sys.stderr)
                run_id, continued = None, False
        if not run_id:
            tags = {"dreamer_tf.logdir": str(self.logdir.resolve()),
                    "dreamer_tf.step_unit": "env steps (frames, action repeat included)"}
            tags.update({f"dreamer_tf.{k}": str(self.config[k]) for k in ("task", "seed") if k in self.config})
            run_id = self.client.create_run(self._experiment_id(), run_name=self._run_name(), tags=tags).info.run_id
        return run_id, continued, {"tracking_uri": uri}

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dreamer_tf"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run created it just now
            return self.client.get_experiment_by_name(name).experiment_id

    def params(self, config):
        """Log the config as params; params cannot change, so on a resume with changed values
        (e.g. a longer `steps`) the new values become tags `resumed.<key>`."""
        from mlflow.entities import Param, RunTag
        logged = self.client.get_run(self.run_id).data.params
        values = {k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in config.items()}
        new = [Param(k, v[:6000]) for k, v in values.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v[:5000]) for k, v in values.items() if k in logged and logged[k] != v]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)

    def _send(self, items):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        metrics = []
        for item in items:
            if item[0] == "scalars":
                metrics += [Metric(k, v, now, item[1]) for k, v in _scalars(item[2]).items()]
            elif item[3].exists():  # ("video", step, name, path)
                self.client.log_artifact(self.run_id, str(item[3]), artifact_path="videos")
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

    def _finish(self, status, message):
        from mlflow.entities import RunTag
        tags = [RunTag("dreamer_tf.status", status or "unknown")]
        if message:
            tags.append(RunTag("dreamer_tf.message", message[:5000]))
        self.client.log_batch(self.run_id, tags=tags)
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FINISHED"))


class WandbTracker(Tracker):
    """Weights & Biases: one history row per env step (`step` = env steps), the config, GIF videos."""

    name = "wandb"

    def _open(self, stored):
        import wandb
        run_id = stored.get("run_id") or os.environ.get("WANDB_RUN_ID")  # else W&B makes one
        defaults = {"WANDB_PROJECT": ("project", "dreamer_tf"), "WANDB_NAME": ("name", self._run_name()),
                    "WANDB_RUN_GROUP": ("group", self.config.get("task")),
                    "WANDB_DIR": ("dir", str(self.logdir))}
        kwargs = {arg: value for env, (arg, value) in defaults.items() if not os.environ.get(env) and value}
        # quiet: no ~35-line history and summary on the console at the end (the run keeps them); the
        # user's WANDB_QUIET / WANDB_SILENT win.
        quiet = {} if os.environ.get("WANDB_QUIET") or os.environ.get("WANDB_SILENT") else {"quiet": True}
        self.run = wandb.init(id=run_id, resume="allow", reinit="create_new", settings=wandb.Settings(**quiet),
                              **kwargs)
        self.run.define_metric("env_steps")
        for prefix in ("train", "test", "perf", "eval", "video"):
            self.run.define_metric(f"{prefix}/*", step_metric="env_steps")
        self._repeat = int(self.config.get("action_repeat", 1) or 1)
        return self.run.id, bool(stored.get("run_id")), {"project": self.run.project or "",
                                                          "mode": os.environ.get("WANDB_MODE", "")}

    def params(self, config):
        self.run.config.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                               allow_val_change=True)

    def _send(self, items):
        import wandb
        rows: dict[int, dict] = {}
        for item in items:  # one history row per env step (W&B steps only go up)
            row = rows.setdefault(item[1], {"env_steps": item[1], "agent_steps": item[1] // self._repeat})
            if item[0] == "scalars":
                row.update(_scalars(item[2]))
            elif item[3].exists():
                row[f"video/{item[2]}"] = wandb.Video(str(item[3]), format="gif")
        for step in sorted(rows):
            self.run.log(rows[step], step=step)

    def _finish(self, status, message):
        self.run.summary["status"] = status or "unknown"
        if message:
            self.run.summary["message"] = message
        self.run.finish(exit_code=1 if status == "failed" else 0)


_CLASSES = {"wandb": WandbTracker, "mlflow": MlflowTracker}


def open_trackers(logdir: str | os.PathLike, names: Iterable[str],
                  config: Mapping[str, Any] | None = None) -> list[Tracker]:
    """The trackers among `names` (others, e.g. jsonl and tensorboard, are the Logger's own), opened
    on `logdir`. A missing package or a tracker that cannot start raises RunError with one line."""
    opened: list[Tracker] = []
    try:
        for name in names:
            if name not in _CLASSES:
                continue
            try:
                __import__(name)
            except ImportError:
                raise RunError(f"loggers: {name} is not installed; {INSTALL[name]}") from None
            try:
                opened.append(_CLASSES[name](logdir, config))
            except RunError:
                raise
            except Exception as e:
                raise RunError(f"loggers: {name} could not start a run: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}") from None
    except BaseException:
        for tracker in opened:
            tracker.close()
        raise
    return opened
