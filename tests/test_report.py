"""`dreamer-tf report`: the Markdown report's content (table, curves, aggregate, runs, configs,
hardware, failed and incomplete seeds, units) and its self-contained HTML, on synthetic run
directories (finished, failed, running, just started) and on the published data alone."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from dreamer_tf import cli
from dreamer_tf.study import report, report_html, runinfo

CPU = {"cpu": "Test CPU 9000", "cores": 8, "usable_cores": 4, "avx512f": True, "memory_gb": 31.2,
       "gpus": [{"name": "NVIDIA T4", "compute_capability": "7.5"}], "tensorflow": "2.21.0"}


def write_run(root: Path, task: str, method: str, seed: int, evals: list[tuple[int, float]],
              status: str | None = "finished", steps: int = 1000, config: dict | None = None,
              wall: float | None = None, hardware: dict | None = None, message: str = "",
              updated: float | None = None) -> Path:
    logdir = root / task / method / str(seed)
    logdir.mkdir(parents=True)
    rows = []
    for step, value in evals:
        rows.append({"step": step, "train_return": value - 1})
        rows.append({"step": step, "test_return": value})
    if wall is not None and evals:
        rows.append({"step": evals[-1][0], "env_steps_per_second": 1.0, "wall_time": wall})
    (logdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status:
        (logdir / "status.json").write_text(json.dumps(
            {"status": status, "step": evals[-1][0] if evals else 0, "steps": steps, "message": message,
             "time": updated or time.time()}))
    values = {"task": task, "seed": seed, "steps": steps, "action_repeat": 2, **(config or {})}
    (logdir / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    if hardware:
        (logdir / "hardware.json").write_text(json.dumps({"sessions": [{"time": 0, "step": 0, **hardware}]}))
    return logdir


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """walker_walk: 2 finished seeds with a smaller batch (finals 750, 650); cheetah_run: one failed
    seed, one running seed whose status is 3 hours old, one that has only just written its config."""
    small = {"batch_size": 16, "num_units": 200}
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 0, [(500, 100), (950, 700), (1000, 800)], config=small,
              wall=600.0, hardware=CPU)
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 1, [(500, 50), (1000, 650)], config=small, wall=5400.0)
    write_run(tmp_path, "dmc_cheetah_run", "dreamer", 0, [(200, 5.0)], status="failed", steps=1000,
              message="Diverged: 10 consecutive non-finite updates at step 300 (model_loss=nan)")
    write_run(tmp_path, "dmc_cheetah_run", "dreamer", 1, [(200, 9.0), (400, 30.0)], status="running",
              updated=time.time() - 3 * 3600)
    write_run(tmp_path, "dmc_cheetah_run", "dreamer", 2, [], status=None, config={"model_lr": 0.001})
    return tmp_path


def _report(tmp_path: Path, *args: str) -> tuple[str, str]:
    out = tmp_path / "out"
    assert report.main([*args, "--out", str(out), "--reps", "200"]) == 0
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def _row(markdown: str, start: str) -> list[str]:
    line = next(l for l in markdown.splitlines() if l.startswith(start))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_content_on_runs(root, tmp_path):
    markdown, _ = _report(tmp_path, "--root", str(root))
    assert markdown.startswith("# Dreamer benchmark report")
    assert f"5 run(s) under `{root}` (1 failed, 2 finished, 1 running, 1 unknown)" in markdown
    assert "1 run(s) still going" in markdown
    # The per-task table against the published curves and the paper's table, units in every header.
    header = _row(markdown, "| Task |")
    assert header == ["Task", "dreamer (this run, 1000 env steps)", "Dreamer curves (published, 5e6 env steps)",
                      "Dreamer paper (5e6 env steps)", "PlaNet (5e6 env steps)", "D4PG (1e8 env steps)",
                      "A3C proprio (1e8 env steps)"]
    assert _row(markdown, "| dmc_walker_walk |")[1:3] == ["700.0 ± 70.7 (n=2/2)", "945.8 ± 37.5 (n=4/5, 1 incomplete)"]
    assert _row(markdown, "| dmc_cheetah_run |")[1] == "— (n=0/3, 1 failed, 2 incomplete)"
    assert "| dmc_hopper_hop |" not in markdown  # only the tasks with runs
    # Curves (and a close-up: the runs are far shorter than 5e6 env steps) and the aggregate.
    assert "Test return over env steps (frames) = 2 × agent steps" in markdown
    assert "![learning curves](figures/curves.png)" in markdown
    assert "![learning curves, close-up](figures/curves_closeup.png)" in markdown
    assert "| Method | Mean [95% CI] | IQM [95% CI] | tasks |" in markdown
    assert re.search(r"\| dreamer \(this run\) \| 0\.700 \[0\.\d+, 0\.\d+\] \| 0\.700 \[", markdown)
    # Every run, with env steps and agent steps, wall-clock and machine.
    assert "| task | method | seed | status | env steps done / budget | agent steps done (action repeat) |" in markdown
    walker = _row(markdown, "| dmc_walker_walk | dreamer | 0 |")
    assert walker[3:10] == ["finished", "1000 / 1000", "500 (2)", "750.0", "0:10:00", "1.7",
                            "Test CPU 9000, 4 of 8 cores, AVX-512, 1 x NVIDIA T4"]
    assert _row(markdown, "| dmc_walker_walk | dreamer | 1 |")[7] == "1:30:00"
    # What differs from the paper preset.
    assert "- `batch_size`: `16` in 2 run(s) (dmc_walker_walk/0, dmc_walker_walk/1), `50` in 3 run(s)" in markdown
    assert "- `model_lr`: `0.0006` in 4 run(s)" in markdown and "`0.001` in 1 run(s) (dmc_cheetah_run/2)" in markdown
    assert "(paper: `50`)" in markdown and "- `steps`: `1000` (paper: `5000000`)" in markdown
    assert "`task`" not in markdown.split("## Configs")[1].split("## Hardware")[0].split("left out")[1]
    # Hardware.
    assert "| Test CPU 9000, 4 of 8 cores, AVX-512, 1 x NVIDIA T4 | 31.2 | 2.21.0 | 1 | 0.17 |" in markdown
    assert "| unknown (no hardware.json) | ? | ? | 4 | 1.50 |" in markdown
    # Failed and incomplete seeds, each with why.
    problems = markdown.split("## Failed and incomplete seeds")[1]
    failed = _row(problems, "| dmc_cheetah_run/dreamer/0 |")
    assert failed[1:3] == ["failed", "200 / 1000"]
    assert failed[3] == "failed: Diverged: 10 consecutive non-finite updates at step 300 (model_loss=nan)"
    running = _row(problems, "| dmc_cheetah_run/dreamer/1 |")[3]
    assert running.startswith("running, last update 3.0 h ago ⚠ no update for over 1 h") and "scored on" in running
    assert _row(problems, "| dmc_cheetah_run/dreamer/2 |")[1] == "unknown"
    assert "dmc_walker_walk/dreamer" not in problems
    assert "Published curves without a final score (1 of 10 seeds" in problems  # walker_walk seed 4


def test_config_section_reads_every_version_under_todays_key_names(tmp_path):
    """A run written before the loss settings became groups stores `free_nats: 3.0`; a newer one
    `world_model: {free_nats: 1.0, ...}`. Both are compared key by key under today's names: the old
    run's paper value is no difference, the new run's changed key is shown alone."""
    root = tmp_path / "root"
    write_run(root, "dmc_walker_walk", "dreamer", 0, [(1000, 700)], config={"free_nats": 3.0, "kl_scale": 0.5})
    write_run(root, "dmc_walker_walk", "dreamer", 1, [(1000, 600)],
              config={"world_model": "{free_nats: 1.0, kl_scale: 1.0, pcont_scale: 10.0, kl_balance: 0.5}",
                      "dataset_balance": True})
    markdown, _ = _report(tmp_path, "--root", str(root))
    configs = markdown.split("## Configs")[1].split("## Hardware")[0]
    assert "- `world_model.free_nats`: `1.0` in 1 run(s) (dmc_walker_walk/1), `3.0` in 1 run(s)" in configs
    assert "(paper: `3.0`)" in configs
    assert "- `world_model.kl_scale`: `0.5` in 1 run(s) (dmc_walker_walk/0), `1.0` in 1 run(s)" in configs
    assert "- `replay_sampler`: `episode` in 1 run(s) (dmc_walker_walk/1), `uniform` in 1 run(s)" in configs
    for stale in ("`free_nats`", "`kl_scale`", "`world_model`", "`dataset_balance`", "not a key of this version"):
        assert stale not in configs, configs


def test_report_html_is_self_contained(root, tmp_path):
    _, page = _report(tmp_path, "--root", str(root))
    assert page.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in page
    images = re.findall(r'<img alt="[^"]*" src="([^"]{0,40})', page)
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the file
    assert "<th>dreamer (this run, 1000 env steps)</th>" in page
    assert "<td>dmc_cheetah_run/dreamer/0</td>" in page and '<span class="warn">⚠</span>' in page
    assert page.count("<table>") == 5  # scores, aggregate, runs, hardware, problems (configs are lists)
    assert "<li><code>batch_size</code>: <code>16</code> in 2 run(s)" in page


def test_report_of_the_published_data_alone(tmp_path):
    markdown, page = _report(tmp_path)
    assert "no runs (the published data alone), on 20 task(s)" in markdown
    assert _row(markdown, "| dmc_acrobot_swingup |")[1:3] == ["464.8 ± 49.2 (n=3/5, 2 incomplete)", "365.3"]
    assert "## Runs" not in markdown and "closeup" not in markdown
    assert "Published curves without a final score (13 of 100 seeds" in markdown
    assert "| Dreamer paper (5e6 env steps) (one score per task) | 0.823 | " in markdown
    assert page.count("data:image/png;base64,") == 2


def test_report_command_and_errors(tmp_path, capsys):
    assert cli.DELEGATED["report"][0] == "dreamer_tf.study.report"
    assert report.main(["--no-published"]) == 2
    assert "nothing to report on" in capsys.readouterr().err
    assert report.main(["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_units_and_html_helpers():
    assert [runinfo.format_steps(n) for n in (600, 9999, 80000, 5e6, 1.25e6, 1e8)] == [
        "600", "9999", "8e4", "5e6", "1.25e6", "1e8"]
    assert runinfo.steps_axis_label(4) == "env steps (frames) = 4 × agent steps"
    page = report_html.render("# T\n\n| a | b \\| c |\n|---|---|\n| `x` | **1.5** |\n\n- *it* [l](#t)\n", ".")
    assert "<th>a</th><th>b | c</th>" in page and '<td class="num"><strong>1.5</strong></td>' in page
    assert "<li><em>it</em> <a href=\"#t\">l</a></li>" in page and "<td><code>x</code></td>" in page


def test_report_and_table_on_a_run_directory_or_any_parent(root, tmp_path, capsys):
    """`--root` may be one run directory or a directory of runs at any depth: the runs are found by
    their files, task and seed from their config. A root without runs is one line, exit 2."""
    import shutil
    from dreamer_tf.study import analysis, table
    markdown, _ = _report(tmp_path, "--no-published", "--root", str(root / "dmc_walker_walk" / "dreamer" / "0"))
    assert "1 run(s) under" in markdown and _row(markdown, "| dmc_walker_walk | dreamer | 0 |")[6] == "750.0"
    nested = tmp_path / "nested" / "runs"
    for task in ("dmc_walker_walk", "dmc_cheetah_run"):  # the runs two levels below a root
        shutil.copytree(root / task, nested / task)
    runs = analysis.find_runs(nested.parent)
    assert sorted((r.task, r.method, r.seed) for r in runs) == sorted(
        (r.task, r.method, r.seed) for r in analysis.find_runs(nested))
    assert len(runs) == 5
    assert table.main(["--no-published", "--root", str(nested / "dmc_walker_walk"), "--out", str(tmp_path / "t"),
                       "--reps", "20"]) == 0
    assert "| dmc_walker_walk | 700.0 ± 70.7 (n=2/2) |" in (tmp_path / "t_table.md").read_text()
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    assert report.main(["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "no runs under" in err and "ROOT/<task>/<method>/<seed>/" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e" / "report.md").exists()


def test_close_up_fits_each_panel_to_its_runs_negative_returns_included(tmp_path, monkeypatch):
    """The close-up's y-axis was 0 to 1.15 x the best return of all runs (at least 11.5): a Pendulum
    panel (-1400 to -800) beside a DMC one was empty. Each panel now spans its own runs."""
    from dreamer_tf.study import plotting
    figures = {}
    save = plotting._save
    monkeypatch.setattr(plotting, "_save", lambda figure, prefix: figures.setdefault(Path(prefix).name, figure)
                        and save(figure, prefix))
    for seed in range(2):
        write_run(tmp_path, "gym_Pendulum-v1", "dreamer", seed, [(0, -1400.0 + 50 * seed), (500, -1100.0),
                                                                 (1000, -800.0)])
    write_run(tmp_path, "dmc_walker_walk", "dreamer", 0, [(0, 30.0), (1000, 60.0)])
    markdown, _ = _report(tmp_path, "--root", str(tmp_path), "--no-published")
    walker, pendulum = figures["curves_closeup"].axes[:2]  # the paper's tasks first
    bottom, top = pendulum.get_ylim()
    assert bottom <= -1400 and -800 <= top and top - bottom < 800
    assert walker.get_ylim()[0] <= 0 and 60 <= walker.get_ylim()[1] < 100  # fitted, from DMC's 0
    assert pendulum.get_title() == "Pendulum-v1 (Gymnasium) (2 seeds)"
    assert "Left out of the aggregates, having no known score normaliser" in markdown
    assert "gym_Pendulum-v1." in markdown
