"""Test tiers (docs/development.md#tests).

`slow` marks the tests that start processes of their own that run TensorFlow (a `dreamer-tf` run, a
replica or oneDNN child, a multi_worker or Ray cluster) or train end to end. Everything else is the
fast tier, `pytest -m "not slow" tests`: in-process unit and oracle tests on synthetic batches, for
the edit-test loop. CI runs both tiers (`pytest tests`).

A fast-tier run over the whole of tests/ also checks that it still touches every module of the
package: a module that no fast test imports fails the session, naming it, so that moving a test to
the slow tier cannot leave a module untested between CI runs.
"""
from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

import pytest

import dreamer_tf

# Modules that run only in processes of their own, which fast tests start but cannot see import:
# MuJoCo rendering may not share a process with TensorFlow (docs/environments.md).
_ELSEWHERE = {
    "dreamer_tf.envs.worker": "the env worker process (tests/test_envs.py starts it)",
    "dreamer_tf.envs.dmc": "built inside env worker processes only",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts TensorFlow processes of its own (runs, children, clusters) or trains end to "
                   "end; left out of the fast tier (-m 'not slow')")


# The files whose tests take longest (results/test_suite.md, per file), started first so that the two
# xdist workers end together (longest processing time first; pytest.ini turns off xdist's own order,
# most tests first). The other files follow in name order; a stale list costs time, never a test.
_LONGEST_FIRST = ("test_rehearsal.py", "test_train.py", "test_multi_worker.py", "test_reliability.py",
                  "test_observations.py", "test_replicas.py", "test_overlap.py", "test_agent.py", "test_matrix.py",
                  "test_replay_corruption.py", "test_benchmark.py", "test_onednn.py", "test_precision.py",
                  "test_golden.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept
    _check_fast_tests_use_no_slow_fixture(items)


def _shared_fixtures(item) -> set[str]:
    """The module- or session-scoped fixtures an item uses that its own test file defines."""
    out = set()
    for name, defs in item._fixtureinfo.name2fixturedefs.items():
        fixture = defs[-1]
        if fixture.scope in ("module", "session") and getattr(fixture, "baseid", "").startswith(
                item.nodeid.split("::")[0]):
            out.add(name)
    return out


def _check_fast_tests_use_no_slow_fixture(items: list) -> None:
    """A fast test that requests a shared fixture its file's slow tests use (the runs of a matrix, a
    cluster) builds it in the fast tier, even if the test then skips: refused at collection."""
    slow: dict[str, set[str]] = {}
    for item in items:
        if item.get_closest_marker("slow"):
            slow.setdefault(item.path.name, set()).update(_shared_fixtures(item))
    for item in items:
        if not item.get_closest_marker("slow") and (used := _shared_fixtures(item) & slow.get(item.path.name, set())):
            raise pytest.UsageError(f"{item.nodeid} is in the fast tier but uses the fixture {sorted(used)[0]!r} "
                                    f"that slow tests share: mark it @pytest.mark.slow")


def _package_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(dreamer_tf.__path__, "dreamer_tf.")
                  if not m.name.endswith("__main__"))


def _fast_tier_of_everything(session: pytest.Session) -> bool:
    config = session.config
    tests_dir = Path(__file__).resolve().parent
    args = [Path(a.split("::")[0]).resolve() for a in config.args]
    return (config.getoption("markexpr", "").replace(" ", "") == "notslow"
            and args == [tests_dir] and not config.getoption("keyword", ""))


def _imported() -> set[str]:
    return {m for m in sys.modules if m == "dreamer_tf" or m.startswith("dreamer_tf.")}


_WORKER_IMPORTS = pytest.StashKey[set]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist, in the controller: a worker's imports, which the controller cannot see."""
    modules = getattr(node, "workeroutput", {}).get("dreamer_modules", [])
    node.config.stash.setdefault(_WORKER_IMPORTS, set()).update(modules)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):  # an xdist worker: hand its imports to the controller
        config.workeroutput["dreamer_modules"] = sorted(_imported())
        return
    if exitstatus != 0 or not _fast_tier_of_everything(session):
        return
    imported = _imported() | config.stash.get(_WORKER_IMPORTS, set())
    untouched = [m for m in _package_modules() if m not in imported and m not in _ELSEWHERE]
    if untouched:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"fast tier: no fast test imports {', '.join(untouched)}: add one, or move a "
                                f"test of it out of the slow tier", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
