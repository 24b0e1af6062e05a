"""Tests of run loading, final scores, binning, IQM, bootstrap CIs and the score table."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from dreamer_tf.study import analysis, table
from dreamer_tf.study.analysis import PUBLISHED_METHOD


def write_run(root: Path, task: str, method: str, seed: int, evals: list[tuple[int, float]],
              status: str = "finished", step: int = 1000, steps: int = 1000,
              trailing: str = "") -> Path:
    logdir = root / task / method / str(seed)
    logdir.mkdir(parents=True)
    lines = []
    for s, value in evals:
        lines.append(json.dumps({"step": s, "train_return": value - 1, "model_loss": 1.0}))
        lines.append(json.dumps({"step": s, "test_return": value}))
    (logdir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + trailing)
    (logdir / "status.json").write_text(json.dumps(
        {"status": status, "step": step, "steps": steps, "message": ""}))
    (logdir / "config.yaml").write_text(f"task: {task}\nseed: {seed}\nsteps: {steps}\n")
    return logdir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """walker_walk: 3 finished seeds (finals 750, 650, 900); cheetah_run: one finished seed (400)
    and one that crashed at step 300; every other task missing."""
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 0, [(500, 100), (950, 700), (1000, 800)])
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 1, [(900, 5000), (950, 600), (1000, 700)])
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 2, [(1000, 900)],
              trailing='{"step": 1100, "test_ret')  # crash mid-write
    write_run(tmp_path, "dmc_cheetah_run", "dreamer", 0, [(1000, 400)])
    write_run(tmp_path, "dmc_cheetah_run", "dreamer", 1, [(200, 50)], status="failed", step=300)
    return tmp_path


# ------------------------------------------------------------------------------------------------
# Loading


def test_load_run_reads_metrics_status_and_budget(root):
    run = analysis.load_run(root / "dmc_walker_walk/dreamer/2")
    assert (run.task, run.method, run.seed) == ("dmc_walker_walk", "dreamer", "2")
    assert list(run.eval_steps) == [1000] and list(run.eval_returns) == [900.0]  # truncated line dropped
    assert list(run.train_returns) == [899.0]
    assert run.status == "finished" and run.step == 1000 and run.budget == 1000


def test_resumed_run_rows_replace_the_rewritten_steps(tmp_path):
    logdir = tmp_path / "dmc_cup_catch/dreamer/0"
    logdir.mkdir(parents=True)
    rows = [(100, 1.0), (200, 2.0), (300, 3.0), (200, 20.0), (300, 30.0), (400, 40.0)]
    text = "\n".join(json.dumps({"step": s, "test_return": v}) for s, v in rows)
    # A crash truncated a line, then the resumed run appended to it: unreadable line mid-file.
    text = text.replace('{"step": 200, "test_return": 20.0}', '{"step": 3{"step": 200, "test_return": 20.0}')
    (logdir / "metrics.jsonl").write_text(text + "\n")
    with pytest.warns(UserWarning, match="skipped unreadable lines"):
        run = analysis.load_run(logdir)
    assert list(run.eval_steps) == [100, 200, 300, 400]
    assert list(run.eval_returns) == [1.0, 2.0, 30.0, 40.0]
    assert run.status == "unknown" and run.budget is None and run.step == 400


def test_budget_falls_back_to_config_yaml(tmp_path):
    logdir = write_run(tmp_path, "dmc_cup_catch", "dreamer", 0, [(100, 1.0)])
    (logdir / "status.json").unlink()
    (logdir / "config.yaml").write_text("task: dmc_cup_catch\nsteps: 5000000\n")
    assert analysis.load_run(logdir).budget == 5_000_000


def test_find_runs_filters_tasks_and_methods(root):
    write_run(root, "dmc_walker_walk", "dreamer_contrastive", 0, [(1000, 10)])
    runs = analysis.find_runs(root)
    assert len(runs) == 6
    assert len(analysis.find_runs(root, tasks=["dmc_cheetah_run"])) == 2
    only = analysis.find_runs(root, methods=["dreamer_contrastive"])
    assert [r.method for r in only] == ["dreamer_contrastive"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        analysis.find_runs(root / "nowhere")


def test_published_data_matches_the_paper():
    table_ = analysis.load_paper_table()
    assert sorted(table_) == sorted(analysis.BENCHMARK_TASKS)
    expected = {"a3c_1e8_proprio": (243.70, 18), "d4pg_1e8": (786.32, 18),
                "planet_5e6": (332.97, 20), "dreamer_5e6": (823.39, 20)}
    for column, (mean, count) in expected.items():
        values = [row[column] for row in table_.values() if row[column] is not None]
        assert len(values) == count
        assert sum(values) / count == pytest.approx(mean, abs=0.01)  # stated to 2 decimals
    # The reference repository's baselines.json agrees with the paper table where both have values.
    for task, row in analysis.load_baselines().items():
        assert row["d4pg_100m"] == table_[task]["d4pg_1e8"]
        assert row["a3c_100m_proprio"] == table_[task]["a3c_1e8_proprio"]
    curves = analysis.load_published_curves()
    assert len(curves) == 100
    expected_runs = {(t, str(s)) for t in analysis.BENCHMARK_TASKS for s in range(5)}
    assert {(r.task, r.seed) for r in curves} == expected_runs
    last = np.mean([r.eval_returns[-1] for r in curves])
    assert last == pytest.approx(805.5, abs=0.1)  # "about 805" as the data's README says


# ------------------------------------------------------------------------------------------------
# Final scores and binning


def test_final_score_rule():
    steps = np.array([100, 899, 900, 901, 950, 1000])
    returns = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    assert analysis.final_score(steps, returns, 1000) == 20.0  # steps > 900: 10, 20, 30
    assert analysis.final_score(steps, returns, 1000, window=0.5) == 13.0  # (2+3+10+20+30) / 5
    assert math.isnan(analysis.final_score(steps[:3], returns[:3], 1000))
    with pytest.raises(ValueError, match="window"):
        analysis.final_score(steps, returns, 1000, window=0)
    with pytest.raises(ValueError, match="budget"):
        analysis.final_score(steps, returns, 0)


def test_summaries_with_missing_task_and_crashed_seed(root):
    summaries = analysis.summarize(analysis.find_runs(root))["dreamer"]
    assert sorted(summaries) == ["dmc_cheetah_run", "dmc_walker_walk"]
    walker = summaries["dmc_walker_walk"]
    assert list(walker.scores) == [750.0, 650.0, 900.0]
    assert walker.mean == pytest.approx(2300 / 3)
    assert walker.std == pytest.approx(math.sqrt(((750 - 2300 / 3) ** 2 + (650 - 2300 / 3) ** 2
                                                  + (900 - 2300 / 3) ** 2) / 2))
    assert (walker.n, walker.n_total, walker.n_failed, walker.n_incomplete) == (3, 3, 0, 0)
    cheetah = summaries["dmc_cheetah_run"]
    assert list(cheetah.scores) == [400.0] and math.isnan(cheetah.std)
    assert (cheetah.n, cheetah.n_total, cheetah.n_failed, cheetah.n_incomplete) == (1, 2, 1, 0)


def test_published_curves_under_the_final_rule():
    summaries = analysis.summarize(analysis.load_published_curves())[PUBLISHED_METHOD]
    # Seeds whose curve stops before 4.5e6 steps have no final score (13 of 100).
    assert sum(s.n for s in summaries.values()) == 87
    assert summaries["dmc_acrobot_swingup"].n == 3
    cheetah = [r for r in analysis.load_published_curves() if r.task == "dmc_cheetah_run"]
    expected = np.mean([r.eval_returns[-5:].mean() for r in cheetah])  # 4.505e6 ... 4.905e6
    assert summaries["dmc_cheetah_run"].mean == pytest.approx(expected)


def test_bin_curve_exact():
    centres, means = analysis.bin_curve(np.array([0, 50, 100, 150, 250]),
                                        np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 100, 400)
    assert list(centres) == [50, 150, 250, 350]
    assert list(means[:3]) == [2.0, 4.0, 5.0] and math.isnan(means[3])
    # The published curves (5e3 + k * 1e5) fill the 50 default bins one point each.
    run = [r for r in analysis.load_published_curves() if len(r.eval_steps) == 50][0]
    centres, means = analysis.bin_curve(run.eval_steps, run.eval_returns, 1e5, 5e6)
    assert len(centres) == 50 and np.array_equal(means, run.eval_returns)
    with pytest.raises(ValueError, match="bin_size"):
        analysis.bin_curve(np.zeros(1), np.zeros(1), 0)


def test_bin_runs_pads_short_runs_with_nan():
    a = analysis.Run("t", "m", "0", None, np.array([100, 200]), np.array([1.0, 2.0]))
    b = analysis.Run("t", "m", "1", None, np.array([100]), np.array([3.0]))
    centres, values = analysis.bin_runs([a, b], bin_size=100, max_step=300)
    assert list(centres) == [50, 150, 250]
    np.testing.assert_array_equal(values, [[1.0, 2.0, np.nan], [3.0, np.nan, np.nan]])


# ------------------------------------------------------------------------------------------------
# IQM and bootstrap


def test_iqm_by_hand():
    assert analysis.iqm(np.arange(1, 9)) == 4.5  # drop 1, 2 and 7, 8
    # n = 10: floor(2.5) = 2 dropped at each end -> mean of the middle six.
    scores = np.array([100.0, -50.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1000.0, 0.0])
    assert analysis.iqm(scores) == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)
    assert analysis.iqm([2.0, 4.0, 9.0]) == 5.0  # n = 3: nothing dropped
    np.testing.assert_allclose(analysis.iqm(np.array([[1, 2, 3, 4], [8, 5, 6, 7]]), axis=-1), [2.5, 6.5])
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n in (4, 7, 10, 13, 100):
        x = rng.normal(size=n)
        assert analysis.iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25))


def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(0)
    groups = [rng.uniform(0, 1, size=5) for _ in range(20)]
    for statistic in ("mean", "iqm"):
        point, low, high = analysis.stratified_bootstrap_ci(groups, statistic, reps=2000, seed=3)
        assert low < point < high
        assert (point, low, high) == analysis.stratified_bootstrap_ci(groups, statistic, reps=2000, seed=3)
        assert (low, high) != analysis.stratified_bootstrap_ci(groups, statistic, reps=2000, seed=4)[1:]
    pooled = np.concatenate(groups)
    assert analysis.stratified_bootstrap_ci(groups, "mean", reps=10)[0] == pytest.approx(pooled.mean())
    assert analysis.stratified_bootstrap_ci(groups, "iqm", reps=10)[0] == pytest.approx(analysis.iqm(pooled))


def test_bootstrap_is_stratified_by_task():
    # One seed per task: every stratified resample is the data itself, so the CI collapses.
    point, low, high = analysis.stratified_bootstrap_ci([[0.1], [0.5], [0.9]], "mean", reps=500)
    assert point == low == high == pytest.approx(0.5)
    # Constant within tasks but different across them: still no spread.
    assert analysis.stratified_bootstrap_ci([[0.2, 0.2], [1.0, 1.0]], "iqm", reps=500)[1:] == (0.6, 0.6)
    with pytest.raises(ValueError, match="finite"):
        analysis.stratified_bootstrap_ci([[0.1, float("nan")]])
    with pytest.raises(ValueError, match="statistic 'median'"):
        analysis.stratified_bootstrap_ci([[0.1]], "median")


def test_aggregate_normalises_by_1000(root):
    summaries = analysis.summarize(analysis.find_runs(root))["dreamer"]
    agg = analysis.aggregate(summaries, reps=200)
    assert agg["mean"][0] == pytest.approx((750 + 650 + 900 + 400) / 4 / 1000)
    assert agg["iqm"][0] == pytest.approx((650 + 750) / 2 / 1000)
    assert analysis.aggregate(summaries, tasks=["dmc_hopper_hop"]) is None


# ------------------------------------------------------------------------------------------------
# Table


def test_table_markdown_and_csv(root, tmp_path):
    out = tmp_path / "out" / "bench"
    assert table.main(["--root", str(root), "--out", str(out), "--reps", "200"]) == 0
    markdown = Path(f"{out}_table.md").read_text()
    lines = markdown.splitlines()
    assert lines[0] == ("| Task | dreamer (this run, 1000 env steps) | Dreamer curves (published, 5e6 env steps) | "
                        "Dreamer paper (5e6 env steps) | PlaNet (5e6 env steps) | D4PG (1e8 env steps) | "
                        "A3C proprio (1e8 env steps) |")
    walker = next(l for l in lines if l.startswith("| dmc_walker_walk |")).split(" | ")
    assert walker[1] == "766.7 ± 125.8 (n=3/3)"
    assert walker[3:] == ["961.7", "944.7", "968.3", "311.0 |"]
    cheetah = next(l for l in lines if l.startswith("| dmc_cheetah_run |")).split(" | ")
    assert cheetah[1] == "400.0 (n=1/2, 1 failed) ⚠"
    hop = next(l for l in lines if l.startswith("| dmc_hopper_hop |")).split(" | ")
    assert hop[1] == "—"
    mean = next(l for l in lines if l.startswith("| **mean over tasks** |")).split(" | ")
    assert mean[1] == "**583.3** (2/20 tasks)"  # (766.67 + 400) / 2
    assert mean[3] == "**823.4**" and mean[5] == "**786.3** (18/20 tasks)"
    assert "last 10% of its step budget" in markdown
    # Aggregates run over the 2 tasks with final scores of this run, for every method alike.
    assert "over the 2 tasks where this run has final scores" in markdown
    assert "| dreamer (this run) | 0.675 [" in markdown  # (750 + 650 + 900 + 400) / 4 / 1000
    # (961.67 + 894.56) / 2 / 1000 = 0.928
    assert "| Dreamer paper (5e6 env steps) (one score per task) | 0.928 | 0.928 | 2 |" in markdown
    rows = list(csv.DictReader(io.StringIO(Path(f"{out}_table.csv").read_text())))
    by_task = {r["task"]: r for r in rows}
    assert len(rows) == 21
    assert float(by_task["dmc_walker_walk"]["dreamer_mean"]) == pytest.approx(766.6667, abs=1e-4)
    assert (by_task["dmc_cheetah_run"]["dreamer_n"], by_task["dmc_cheetah_run"]["dreamer_seeds"],
            by_task["dmc_cheetah_run"]["dreamer_failed"]) == ("1", "2", "1")
    assert by_task["dmc_hopper_hop"]["dreamer_mean"] == "" and by_task["dmc_quadruped_run"]["d4pg_1e8"] == ""
    assert float(by_task["mean"]["a3c_1e8_proprio"]) == pytest.approx(243.70, abs=0.005)


def test_table_of_published_data_alone(tmp_path, capsys):
    assert table.main(["--out", str(tmp_path / "p"), "--reps", "200"]) == 0
    markdown = (tmp_path / "p_table.md").read_text()
    assert "(this run)" not in markdown
    assert "| dmc_acrobot_swingup | 464.8 ± 49.2 (n=3/5, 2 incomplete) | 365.3 |" in markdown
    assert table.main(["--no-published"]) == 2
    assert "nothing to tabulate" in capsys.readouterr().err


def test_aggregates_compare_methods_over_the_tasks_they_all_have(root, tmp_path):
    """dreamer has walker and cheetah, dreamer_contrastive walker only: every aggregate runs over
    walker (the report says so); methods that share no task are marked not comparable."""
    write_run(root, "dmc_walker_walk", "dreamer_contrastive", 0, [(1000, 100)])
    tbl = table.build_table(root, reps=50)
    assert tbl.aggregate_tasks == ["dmc_walker_walk"]
    assert tbl.aggregates["dreamer"]["mean"][0] == pytest.approx(0.7667, abs=1e-4)  # walker seeds only
    markdown = table.aggregate_markdown(tbl)
    assert "over the 1 task where every method of this run has final scores (dmc_walker_walk)" in markdown
    assert "not comparable" not in markdown
    write_run(root, "dmc_hopper_hop", "reward_only", 0, [(1000, 50)])  # shares no task with the others
    tbl = table.build_table(root, reps=50)
    assert set(tbl.aggregate_tasks) == {"dmc_cheetah_run", "dmc_walker_walk", "dmc_hopper_hop"}
    markdown = table.aggregate_markdown(tbl)
    assert "| reward_only (this run) ⚠ not comparable: 1 of 3 tasks |" in markdown
    assert "| dreamer (this run) ⚠ not comparable: 2 of 3 tasks |" in markdown
    # They share no task: the text must not claim that every method has scores on these tasks.
    assert "where every method" not in markdown
    assert "share no task with final scores, so each method's aggregate runs over those of these 3 tasks where it has them (dmc_cheetah_run, dmc_hopper_hop, dmc_walker_walk)" in markdown


def test_tasks_without_a_known_normaliser_are_left_out_of_aggregates_and_named(root, tmp_path):
    """Pendulum (-900) and Pong (-20) are not divided by DMC's 1000 and pooled with DMC's scores: the
    aggregates and the means over tasks use the DMC tasks, and the table names what it left out."""
    write_run(root, "gym_Pendulum-v1", "dreamer", 0, [(1000, -900)])
    write_run(root, "atari_pong", "dreamer", 0, [(1000, -20)])
    tbl = table.build_table(root, reps=50)
    assert tbl.aggregate_tasks == ["dmc_cheetah_run", "dmc_walker_walk"]
    assert tbl.aggregates["dreamer"]["mean"][0] == pytest.approx((750 + 650 + 900 + 400) / 4 / 1000)
    markdown = table.to_markdown(tbl)
    assert ("Left out of the aggregates, having no known score normaliser (known here: dmc_* tasks (return / 1000)): "
            "atari_pong, gym_Pendulum-v1.") in markdown
    assert "| gym_Pendulum-v1 | -900.0 (n=1/1) |" in markdown  # still in the table, on its own scale
    mean = next(l for l in markdown.splitlines() if l.startswith("| **mean over tasks** |")).split(" | ")
    assert mean[1] == "**583.3** (2/20 tasks)"  # DMC's tasks only, as before Pendulum and Pong came
    assert "on DMC's scale only (left out: atari_pong, gym_Pendulum-v1)" in markdown
    with pytest.raises(ValueError, match="'gym_Pendulum-v1' has no known score normaliser"):
        analysis.normalise("gym_Pendulum-v1", -900.0)
    gym_only = table.build_table(root, tasks=["gym_Pendulum-v1"], published=False, reps=50)
    assert gym_only.aggregates["dreamer"] is None
    assert table.aggregate_markdown(gym_only).startswith("No task has a known score normaliser: there is no aggregate. Left out")
