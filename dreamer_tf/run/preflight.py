"""Refusals of `dreamer-tf train` that need neither TensorFlow nor a run directory.

`check_run` runs before the logdir is created and before TensorFlow's import (7-16 s), so a run
that cannot work is refused in one line, at once, and leaves nothing behind: a tracker in `loggers`
that is not installed or whose store refuses to start (MLflow 3 and a `file:` tracking URI), a
resume whose config differs from the stored one, and a `gym_` task whose environment cannot be built
as configured (a `gym_import` module that is missing, an observation space or renderer the config
cannot use: the env is built once in a worker process and closed). The same conditions are checked
again where the run meets them (run/trackers.py, run/logdir.py, the env workers): this is the early
copy of those checks, not a second definition of what they accept.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import urllib.parse
from pathlib import Path
from typing import Mapping

from dreamer_tf import config as configlib

__all__ = ["Refused", "check_run", "check_trackers", "check_resume", "check_env_builds", "mlflow_file_store"]


class Refused(configlib.ConfigError):
    """A run refused before it starts (the CLI prints it as one line, exit status 2)."""


def check_run(config: configlib.Config, logdir: str | os.PathLike, force: bool = False) -> None:
    """Raise Refused (one line) if the run would be refused once TensorFlow has started; cheap checks first."""
    check_trackers(config.loggers)
    check_resume(config, Path(logdir), force)
    check_env_builds(config)


def check_trackers(loggers, environ: Mapping[str, str] | None = None) -> None:
    """A tracker that is not installed, or MLflow 3 with a file store it refuses to open."""
    from dreamer_tf.run.trackers import INSTALL
    environ = os.environ if environ is None else environ
    for name in loggers:
        if name in INSTALL and importlib.util.find_spec(name) is None:
            raise Refused(f"loggers: {name} is not installed; {INSTALL[name]}")
    if "mlflow" in loggers:
        uri = mlflow_file_store(environ)
        if uri is not None:
            raise Refused(f"loggers: MLflow 3 refuses the file store MLFLOW_TRACKING_URI={uri}; use a database, "
                          f"e.g. MLFLOW_TRACKING_URI=sqlite:///mlflow.db, or set MLFLOW_ALLOW_FILE_STORE=true")


def mlflow_file_store(environ: Mapping[str, str]) -> str | None:
    """The tracking URI if it names a file store that the installed MLflow (3 or later) refuses
    (MLflow's rule: a `file:` URI or a plain path, unless MLFLOW_ALLOW_FILE_STORE is true or 1)."""
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if not uri or uri == "databricks" or environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
        return None
    if urllib.parse.urlparse(uri).scheme not in ("", "file"):
        return None
    try:
        major = int(importlib.metadata.version("mlflow").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return uri if major >= 3 else None


def check_resume(config: configlib.Config, logdir: Path, force: bool = False) -> None:
    """A run directory written with another config (run/logdir.py: prepare_logdir, which decides)."""
    from dreamer_tf.run.logdir import RunError, stored_config_conflict
    if not (logdir / "config.yaml").exists():
        return
    try:
        stored_config_conflict(config, logdir, force)
    except RunError as e:
        raise Refused(str(e)) from None


def check_env_builds(config: configlib.Config) -> None:
    """A gym_ task's env, built once in a worker as the run's evaluation env will be (with frames for
    videos when it observes only its state)."""
    from dreamer_tf import envs as envlib
    from dreamer_tf.run.collect import env_options
    try:
        envlib.check_config_env(config, probe=True, **env_options(config, video=bool(config.video_every)))
    except ValueError as e:
        raise Refused(str(e)) from None
