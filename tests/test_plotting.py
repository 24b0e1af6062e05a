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


@pytest.mark.slow
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


def _capture_figures(monkeypatch) -> list:
    """The figures plot_curves / plot_aggregate draw, kept for inspection (and still saved)."""
    figures = []
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda figure, prefix: figures.append(figure) or save(figure, prefix))
    return figures


def test_negative_returns_are_on_each_panels_axis_and_titles_keep_gymnasium_ids(tmp_path, monkeypatch):
    """Pendulum (-1400 to -800) and Pong (-21 to -19) panels span their data instead of DMC's fixed
    0 to 1030, which left them empty; DMC panels keep 0 to 1000. Gymnasium ids keep their capitals and
    version, and one seed is '1 seed'."""
    figures = _capture_figures(monkeypatch)
    root = tmp_path / "runs"
    for seed, shift in enumerate((0.0, -100.0)):
        _write_run(root, "gym_Pendulum-v1", seed, [(1000, -1400.0 + shift), (5000, -1100.0), (10_000, -800.0)])
    _write_run(root, "atari_pong", 0, [(1000, -21.0), (10_000, -19.0)])
    _write_run(root, "dmc_walker_walk", 0, [(1000, 30.0), (10_000, 60.0)])
    assert plotting.main(["--root", str(root), "--out", str(tmp_path / "f"), "--bin-size", "1000", "--budget",
                          "10000", "--reps", "20", "--no-published", "--tasks", "gym_Pendulum-v1", "atari_pong",
                          "dmc_walker_walk"]) == 0
    pendulum, pong, walker = figures[0].axes[:3]
    for ax, (low, high) in ((pendulum, (-1500.0, -800.0)), (pong, (-21.0, -19.0))):
        bottom, top = ax.get_ylim()
        assert bottom < low and high < top, (ax.get_title(), bottom, top)
        assert top - bottom < 1.2 * (high - low), (ax.get_title(), bottom, top)  # fitted, not a 0-1000 axis
        curve = ax.get_lines()[0].get_ydata()
        assert bottom <= min(curve) and max(curve) <= top
    assert [ax.get_title() for ax in (pendulum, pong, walker)] == [
        "Pendulum-v1 (Gymnasium) (2 seeds)", "Pong (Atari) (1 seed)", "Walker Walk (1 seed)"]
    bottom, top = walker.get_ylim()
    assert bottom <= 0 and top >= 1000  # DMC keeps its known range
    assert plotting.y_limits("dmc_walker_walk", [100.0], ymax=150) == (-3.0, 150)  # --ymax zooms as before
    assert plotting.y_limits("atari_pong", [-21.0, -19.0], zoom=True)[1] < 0


def test_aggregate_figure_leaves_out_tasks_without_a_normaliser_and_says_which(tmp_path, monkeypatch):
    """Pendulum's and Pong's returns are not divided by DMC's 1000 and pooled: the aggregate runs over
    the DMC task alone and the figure names what it left out."""
    figures = _capture_figures(monkeypatch)
    root = tmp_path / "runs"
    _write_run(root, "gym_Pendulum-v1", 0, [(4_600_000, -900.0)])
    _write_run(root, "atari_pong", 0, [(4_600_000, -20.0)])
    _write_run(root, "dmc_walker_walk", 0, [(4_600_000, 500.0)])
    assert plotting.main(["--root", str(root), "--out", str(tmp_path / "f"), "--reps", "20", "--no-published"]) == 0
    aggregate = figures[1]
    title = aggregate._suptitle.get_text()
    assert "(1 task; left out, no known normaliser: atari_pong, gym_Pendulum-v1)" in title  # the tasks with runs
    assert "dreamer (this run) [1 task]" in [t.get_text() for t in aggregate.axes[0].get_yticklabels()]
    points = [line.get_xdata()[0] for line in aggregate.axes[0].get_lines() if line.get_marker() == "o"]
    assert points == [pytest.approx(0.5)]  # walker's 500 / 1000 alone


def test_panels_are_the_tasks_with_runs_or_the_papers_20_without_any(tmp_path, monkeypatch):
    """With --root and no --tasks, a panel per task that has runs (as the report shows them): a root
    of one Gymnasium run is one panel, not the 20 DMC panels of the published curves beside it."""
    figures = _capture_figures(monkeypatch)
    root = tmp_path / "runs"
    _write_run(root, "gym_Pendulum-v1", 0, [(4_600_000, -900.0)])
    assert plotting.main(["--root", str(root), "--out", str(tmp_path / "f"), "--reps", "20"]) == 0
    assert [ax.get_title() for ax in figures[0].axes if ax.get_visible()] == ["Pendulum-v1 (Gymnasium) (1 seed)"]
    figures.clear()
    assert plotting.main(["--out", str(tmp_path / "p"), "--reps", "20"]) == 0  # the published data alone
    assert len([ax for ax in figures[0].axes if ax.get_visible()]) == 20


def test_aggregate_title_is_true_when_the_methods_share_no_task(tmp_path, monkeypatch):
    """Two methods on different tasks: the figure must not say 'where every method has final scores'."""
    figures = _capture_figures(monkeypatch)
    root = tmp_path / "runs"
    _write_run(root, "dmc_walker_walk", 0, [(4_600_000, 500.0)])
    other = root / "dmc_cheetah_run" / "contrastive" / "0"
    _write_run(tmp_path / "tmp", "dmc_cheetah_run", 0, [(4_600_000, 300.0)])
    other.parent.mkdir(parents=True)
    (tmp_path / "tmp" / "dmc_cheetah_run" / "dreamer" / "0").rename(other)
    assert plotting.main(["--root", str(root), "--out", str(tmp_path / "f"), "--reps", "20", "--no-published",
                          "--tasks", "dmc_walker_walk", "dmc_cheetah_run", "dmc_hopper_hop"]) == 0
    title = figures[1]._suptitle.get_text()
    assert "where every method" not in title and "2 tasks, none shared by every method of this run" in title


def test_every_method_gets_its_own_colour(tmp_path, monkeypatch):
    """12 methods on one task: 12 different colours, none the published grey or a baseline's."""
    figures = _capture_figures(monkeypatch)
    runs = [analysis.Run("dmc_walker_walk", f"m{i:02d}", "0", None, np.array([1000]), np.array([10.0 * i]))
            for i in range(12)]
    plotting.plot_curves(runs, tmp_path / "c", ["dmc_walker_walk"], (), {}, 1000, 2000)
    lines = [line for line in figures[0].axes[0].get_lines() if line.get_label().endswith("(this run)")]
    assert len(lines) == 12 and len({line.get_color() for line in lines}) == 12
    colors = plotting.run_colors(40)
    assert len(set(colors)) == 40 and not set(colors) & {plotting._PUBLISHED_COLOR, *plotting._BASELINE_STYLE.values()}


@pytest.mark.parametrize("command", ["plot", "table", "report"])
def test_a_root_that_is_a_file_is_one_line_saying_so(command, tmp_path, capsys):
    from dreamer_tf import cli
    (tmp_path / "afile").write_text("x")
    out = ["--out", str(tmp_path / "out")]
    assert cli.main([command, "--root", str(tmp_path / "afile"), *out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --root {tmp_path / 'afile'} is a file, not a directory"
    assert cli.main([command, "--root", str(tmp_path / "afile" / "sub"), *out]) == 2
    assert capsys.readouterr().err.strip().endswith(f"cannot be a directory: {tmp_path / 'afile'} is a file")
    assert not (tmp_path / "out").exists()
    if command == "report":  # without --out, the report's directory is the root: it said "File exists"
        assert cli.main([command, "--root", str(tmp_path / "afile")]) == 2
        assert capsys.readouterr().err.strip() == f"error: --root {tmp_path / 'afile'} is a file, not a directory"
        assert cli.main([command, "--out", str(tmp_path / "afile")]) == 2  # the report's directory
        assert capsys.readouterr().err.strip() == f"error: --out {tmp_path / 'afile'} is a file, not a directory"


def test_learning_report_plots_runs_whose_returns_are_all_negative(tmp_path):
    """scripts/learning_report.py zoomed to 1.2 x the best return rounded up to 50: 0 for Pendulum,
    which plot refused, so the report came without its figures."""
    import importlib.util
    from dreamer_tf import config as configlib
    run = tmp_path / "run"
    run.mkdir()
    configlib.save(configlib.load("debug", {"task": "gym_Pendulum-v1", "steps": 1000}), run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "test_return": v, "wall_time": 1.0}) + "\n"
                                               for s, v in ((0, -1400.0), (500, -1100.0), (1000, -800.0))))
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": 1000, "steps": 1000, "time": 0}))
    spec = importlib.util.spec_from_file_location(
        "learning_report", Path(__file__).resolve().parents[1] / "scripts" / "learning_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    assert module.main(["--runs", str(run), "--out", str(out), "--title", "t", "--bin-size", "500"]) == 0
    _check_images([Path(f"{out / 'out'}_curves.png"), Path(f"{out / 'out'}_curves.pdf")], out / "out_curves")
