"""Tests of the learning-curve grid and the aggregate figure (dreamer_tf.study.plotting)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.study import analysis, plotting


def _write_run(root: Path, task: str, seed: int, evals: list[tuple[int, float]], status: str = "finished"):
    logdir = root / task / "dreamer" / str(seed)
    logdir.mkdir(parents=True)
    (logdir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "test_return": v}) + "\n" for s, v in evals))
    (logdir / "status.json").write_text(json.dumps(
        {"status": status, "step": evals[-1][0] if evals else 0, "steps": 5_000_000, "message": ""}))


def _check_images(paths: list[Path], prefix: Path) -> None:
    assert paths == [Path(f"{prefix}.png"), Path(f"{prefix}.pdf")]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[0].stat().st_size > 10_000
    assert paths[1].read_bytes()[:5] == b"%PDF-" and paths[1].stat().st_size > 5_000


def test_curve_stats_mean_and_std_across_seeds():
    a = analysis.Run("t", "m", "0", None, np.array([50, 150, 160]), np.array([100.0, 200.0, 400.0]))
    b = analysis.Run("t", "m", "1", None, np.array([50]), np.array([300.0]))
    x, mean, low, high = plotting.curve_stats([a, b], bin_size=100, max_step=300)
    assert list(x) == [50, 155, 250]  # where the evaluations are (the empty bin: its centre)
    std = np.std([100.0, 300.0], ddof=1)
    np.testing.assert_allclose([mean[0], low[0], high[0]], [200.0, 200 - std, 200 + std])
    np.testing.assert_allclose([mean[1], low[1], high[1]], [300.0, 300.0, 300.0])  # one seed: no spread
    assert np.isnan(mean[2]) and np.isnan(low[2])
    x, mean, low, high = plotting.curve_stats([a, b], bin_size=100, max_step=300, spread="ci", reps=500)
    assert 100.0 <= low[0] <= mean[0] == 200.0 <= high[0] <= 300.0
    with pytest.raises(ValueError, match="'iqr'"):
        plotting.curve_stats([a], spread="iqr")


def test_plot_writes_curves_and_aggregate_with_partial_data(tmp_path):
    root = tmp_path / "runs"
    steps = np.arange(10_000, 5_000_001, 100_000)
    for seed in range(3):
        _write_run(root, "dmc_walker_walk", seed, [(int(s), 900 * s / 5e6 + 10 * seed) for s in steps])
    _write_run(root, "dmc_cheetah_run", 0, [(10_000, 5.0), (110_000, 50.0)], status="failed")
    out = tmp_path / "figs" / "bench"
    assert plotting.main(["--root", str(root), "--out", str(out), "--reps", "200"]) == 0
    _check_images([Path(f"{out}_curves.png"), Path(f"{out}_curves.pdf")], Path(f"{out}_curves"))
    _check_images([Path(f"{out}_aggregate.png"), Path(f"{out}_aggregate.pdf")], Path(f"{out}_aggregate"))


def test_plot_functions_return_paths(tmp_path):
    published = analysis.load_published_curves()
    paper = analysis.load_paper_table()
    tasks = ["dmc_cup_catch", "dmc_hopper_hop"]
    prefix = tmp_path / "curves"
    _check_images(plotting.plot_curves([], prefix, tasks, published, paper, spread="ci"), prefix)
    summaries = analysis.summarize([r for r in published if r.task in tasks])
    prefix = tmp_path / "aggregate"
    _check_images(plotting.plot_aggregate(summaries, prefix, tasks, paper, reps=200), prefix)


def test_plot_rejects_bad_options(tmp_path, capsys):
    assert plotting.main(["--no-published"]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert plotting.main(["--bin-size", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--bin-size" in capsys.readouterr().err
    assert plotting.main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_random_policy_baseline_option(tmp_path, capsys):
    root = tmp_path / "runs"
    _write_run(root, "dmc_cheetah_run", 0, [(0, 5.0), (5_000, 2.0), (60_000, 80.0)])
    out = tmp_path / "learning"
    args = ["--root", str(root), "--out", str(out), "--tasks", "dmc_cheetah_run", "--bin-size", "5000",
            "--budget", "60000", "--reps", "100"]
    assert plotting.main(args + ["--random-policy", "dmc_cheetah_run=7.4", "--ymax", "150"]) == 0
    _check_images([Path(f"{out}_curves.png"), Path(f"{out}_curves.pdf")], Path(f"{out}_curves"))
    capsys.readouterr()
    assert plotting.main(args + ["--random-policy", "dmc_cheetah_run:7.4"]) == 2
    assert "TASK=RETURN, got 'dmc_cheetah_run:7.4'" in capsys.readouterr().err
    assert plotting.main(args + ["--ymax", "nan"]) == 2  # any finite top is allowed: returns can be negative
    assert "--ymax must be a finite number, got nan" in capsys.readouterr().err


def test_closeup_points_sit_at_the_evaluation_steps_and_offscale_lines_leave_the_legend(tmp_path, monkeypatch):
    """Evaluations at 0/300/600 env steps in 150-step bins are drawn at 0/300/600 (not at the bins'
    centres); the paper's lines far above a zoomed y-axis are neither drawn nor in the legend."""
    runs = [analysis.Run("dmc_cartpole_balance", "dreamer", str(s), None, np.array([0, 300, 600]),
                         np.array([30.0, 40.0, 50.0 + s])) for s in range(2)]
    x, mean, _, _ = plotting.curve_stats(runs, bin_size=150, max_step=600)
    assert list(x[np.isfinite(mean)]) == [0, 300, 600]
    from matplotlib.figure import Figure
    legends = []
    monkeypatch.setattr(Figure, "legend", lambda self, handles, labels, **kw: legends.append(labels))
    paper = analysis.load_paper_table()
    plotting.plot_curves(runs, tmp_path / "closeup", ["dmc_cartpole_balance"], (), paper, 30, 600,
                         ymax=70.0, random_policy={"dmc_cartpole_balance": 20.0})
    assert legends == [["dreamer (this run)", "random policy"]]
