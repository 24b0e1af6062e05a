"""No behaviour change, proven: the agent and a seeded debug run reproduce tests/golden/debug_seed0.json.

The golden file was written by tests/golden/record.py from the code before the package was
restructured (and is rewritten, in a commit of its own, only when a change is meant to alter the
numbers). On a machine like the one that wrote it (same TF version, same CPU vector ISA) every
value must match to 1e-6 relative (float rounding of reordered sums); elsewhere different kernels
round differently, and only what rounding cannot move is compared exactly.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "golden"
spec = importlib.util.spec_from_file_location("golden_record", HERE / "record.py")
record = importlib.util.module_from_spec(spec)
spec.loader.exec_module(record)


def _mismatches(expected, actual, rtol: float, path: str = "") -> list[str]:
    if isinstance(expected, dict):
        if sorted(expected) != sorted(actual):
            return [f"{path}: keys {sorted(expected)} != {sorted(actual)}"]
        return [m for k in expected for m in _mismatches(expected[k], actual[k], rtol, f"{path}/{k}")]
    if isinstance(expected, list):
        if len(expected) != len(actual):
            return [f"{path}: length {len(expected)} != {len(actual)}"]
        return [m for i, (e, a) in enumerate(zip(expected, actual)) for m in _mismatches(e, a, rtol, f"{path}[{i}]")]
    if isinstance(expected, float) and not math.isclose(expected, actual, rel_tol=rtol, abs_tol=rtol):
        return [f"{path}: {expected!r} != {actual!r}"]
    if not isinstance(expected, float) and expected != actual:
        return [f"{path}: {expected!r} != {actual!r}"]
    return []


@pytest.fixture(scope="module")
def golden():
    return json.loads(record.GOLDEN.read_text())


@pytest.fixture(scope="module")
def same_machine(golden):
    return record.fingerprint() == golden["fingerprint"]


def test_agent_train_and_policy_match_golden(golden, same_machine):
    actual = record.agent_metrics()
    if same_machine:
        problems = _mismatches(golden["agent"], actual, 1e-6)
    else:  # other kernels: the first update only, loosely
        problems = _mismatches(golden["agent"]["train"][0], actual["train"][0], 1e-3)
    assert not problems, "\n".join(problems[:20])


def test_seeded_debug_run_matches_golden(golden, same_machine):
    actual = record.run_metrics()
    if same_machine:
        problems = _mismatches(golden["run"], actual, 1e-6)
    else:  # the prefill episodes (random actions, no network) do not depend on float kernels
        prefill = [e for e in golden["run"]["episodes"] if e.get("prefill")]
        problems = _mismatches(prefill, actual["episodes"][:len(prefill)], 0.0)
        problems += _mismatches([r["step"] for r in golden["run"]["metrics"]],
                                [r["step"] for r in actual["metrics"]], 0.0)
    assert not problems, "\n".join(problems[:20])
