"""`dreamer-tf bench --settings`: one child process per oneDNN setting, one report for all of them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dreamer_tf import cli
from dreamer_tf.study import bench

BASE = {"PATH": "/usr/bin", "TF_ENABLE_ONEDNN_OPTS": "junk", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
        "DNNL_MAX_CPU_ISA": "SSE41", "ONEDNN_VERBOSE": "1", "OTHER": "kept"}
WANT = {"onednn": ("1", None), "no-onednn": ("0", None), "avx2": ("1", "AVX2"), "avx2-no-onednn": ("0", "AVX2")}


@pytest.mark.parametrize("name", list(WANT))
def test_setting_env_sets_the_two_variables_and_clears_the_rest(name):
    base = dict(BASE)
    env = bench.setting_env(name, base)
    opts, cap = WANT[name]
    assert env["TF_ENABLE_ONEDNN_OPTS"] == opts
    assert env.get("ONEDNN_MAX_CPU_ISA") == cap  # removed (not inherited) when the setting has no cap
    for key in ("DNNL_MAX_CPU_ISA", "ONEDNN_VERBOSE"):
        assert key not in env
    assert env["OTHER"] == "kept" and env["PATH"] == "/usr/bin"
    assert base == BASE  # the caller's mapping is untouched
    assert bench.check_env(name, env) is None


def test_check_setting_refuses_a_setting_that_did_not_take_effect():
    good = bench.setting_env("avx2-no-onednn", {})
    assert bench.check_setting("avx2-no-onednn", good, False, "Intel AVX2") is None
    assert bench.check_setting("onednn", bench.setting_env("onednn", {}), True, None) is None
    refusals = [
        bench.check_setting("avx2-no-onednn", good, True, "Intel AVX2"),  # TF reports oneDNN on
        bench.check_setting("avx2-no-onednn", good, False, "Intel AVX-512 with Intel DL Boost"),  # cap ignored
        bench.check_setting("avx2-no-onednn", good, False, None),  # cap unverified
        bench.check_setting("avx2-no-onednn", {**good, "TF_ENABLE_ONEDNN_OPTS": "1"}, False, "Intel AVX2"),
        bench.check_setting("onednn", {**bench.setting_env("onednn", {}), "ONEDNN_MAX_CPU_ISA": "AVX2"}, True, None),
        bench.check_setting("onednn", {**bench.setting_env("onednn", {}), "DNNL_MAX_CPU_ISA": "AVX2"}, True, None),
    ]
    for reason in refusals:
        assert reason and "\n" not in reason, refusals
    assert bench.parse_onednn_isa("x\nonednn_verbose,v1,info,cpu,isa:Intel AVX2\ny\n") == "Intel AVX2"
    assert bench.parse_onednn_isa("onednn_verbose,v1,info,gpu,runtime:none\n") is None


@pytest.mark.parametrize("entry", ["bench", "cli"])
def test_unknown_setting_is_one_line_naming_it(entry, capsys, tmp_path):
    argv = ["--settings", "onednn", "avx-512", "--out", str(tmp_path)]
    code = bench.main(argv) if entry == "bench" else cli.main(["bench", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "'avx-512'" in err and "error" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(bench.SettingError, match="'nope'"):
        bench.setting_env("nope")


def test_child_refuses_a_setting_missing_from_its_environment(tmp_path):
    """A child whose environment does not hold its setting writes nothing and says why in one line."""
    env = bench.setting_env("onednn")  # no ONEDNN_MAX_CPU_ISA, but asked to measure avx2
    out = subprocess.run([sys.executable, "-m", "dreamer_tf", "bench", "--presets", "debug", "--child-setting",
                          "avx2", "--child-json", str(tmp_path / "avx2.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == bench.SETTING_FAILED
    assert out.stderr.strip().count("\n") == 0 and "setting avx2 did not take effect" in out.stderr
    assert "ONEDNN_MAX_CPU_ISA" in out.stderr
    assert not (tmp_path / "avx2.json").exists()


def test_parent_writes_no_rows_for_a_refused_setting(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "setting_env", lambda name, base=None: {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"})
    code = bench.main(["--settings", "no-onednn", "--presets", "debug", "--variants", "float32", "--no-envs",
                       "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "setting no-onednn did not take effect: TF_ENABLE_ONEDNN_OPTS is 1" in err
    assert not (tmp_path / "bench.md").exists() and not (tmp_path / "bench.json").exists()


def _setting(name, opts, cap, peak, seconds, onednn_isa):
    gflop = 100.0
    return {"name": name, "setting": {"name": name, "env": {"TF_ENABLE_ONEDNN_OPTS": opts, "ONEDNN_MAX_CPU_ISA": cap},
                                      "onednn_isa": onednn_isa},
            "machine": {"onednn": opts == "1", "intra_op_threads": 8, "inter_op_threads": 2, "load_average": 0.1},
            "matmul_gflops": peak, "matmul_size": 2048,
            "train_step": [{"preset": preset, "variant": "float32", "device": "CPU", "gflop": gflop,
                            "seconds": seconds * scale, "first_call_seconds": 9.0, "cores_busy": 7.5,
                            "gflops_per_second": gflop / (seconds * scale),
                            "fraction_of_matmul_peak": gflop / (seconds * scale) / peak}
                           for preset, scale in (("cpu", 1.0), ("paper", 10.0))],
            "policy": [{"preset": "cpu", "seconds": 0.002, "steps_per_second": 500.0}]}


def fabricated(cpu_isa):
    return {"command": "dreamer-tf bench --settings onednn no-onednn avx2", "date": "2030-01-02T03:04:05+00:00",
            "commit": "abc1234+dirty", "matmul_size": 2048,
            "machine": {"cpu": "Some CPU", "cores": 8, "isa": cpu_isa},
            "settings": [_setting("onednn", "1", "unset", 200.0, 1.0, "Intel AVX-512"),
                         _setting("no-onednn", "0", "unset", 100.0, 2.5, "Intel AVX-512"),
                         _setting("avx2", "1", "AVX2", 50.0, 1.5, "Intel AVX2")],
            "refused": []}


def _row(md, preset, setting):
    rows = [line for line in md.splitlines() if line.startswith(f"| {preset} | float32 | {setting} |")]
    assert len(rows) == 1, md
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_markdown_of_several_settings():
    md = bench.markdown(fabricated(["avx2", "avx512f", "avx512_vnni"]))
    lines = md.splitlines()
    assert lines[0] == "# dreamer_tf benchmark"
    assert lines[2] == "Command: `dreamer-tf bench --settings onednn no-onednn avx2`"
    assert "2030-01-02T03:04:05+00:00" in md and "abc1234+dirty" in md
    assert "Some CPU, 8 cores; vector ISA avx2, avx512f, avx512_vnni" in md
    assert "from different machines must not be compared" in md
    # the ratio vs the first setting, for the same preset and variant
    assert _row(md, "cpu", "onednn")[-1] == "1.00 (reference)"
    assert _row(md, "cpu", "no-onednn")[-1] == "2.50 (no-onednn / onednn)"
    assert _row(md, "paper", "avx2")[-1] == "1.50 (avx2 / onednn)"
    # % of that setting's own peak: 100 GFLOP in 2.5 s = 40 GFLOP/s = 40% of no-onednn's 100
    assert _row(md, "cpu", "no-onednn")[10] == "40%"
    assert _row(md, "paper", "avx2")[10] == "13%"  # 100 / 15 s = 6.7 GFLOP/s of 50
    # what bench reports per row: oneDNN as TF reports it, ISA, threads, cores busy
    assert _row(md, "cpu", "no-onednn")[3:6] == ["off", "Intel AVX-512", "8/2"]
    assert _row(md, "cpu", "avx2")[3:5] == ["on", "Intel AVX2"]
    assert _row(md, "cpu", "avx2")[11] == "7.50"
    assert "AVX2 (emulated with ONEDNN_MAX_CPU_ISA=AVX2 on an AVX-512 CPU)" in md
    assert "Eigen and TensorFlow's own kernels, XLA's code generation" in md
    assert "memory system, clock and caches of real AVX2 machines are not reproduced" in md
    # on a CPU without AVX-512 the cap emulates nothing
    refused = {**fabricated(["avx2", "avx512f"]), "refused": [{"name": "avx2-no-onednn", "reason": "why"}]}
    assert "| avx2-no-onednn | not measured: why |" in bench.markdown(refused)
    assert "| cpu | float32 | avx2-no-onednn |" not in bench.markdown(refused)
    plain = bench.markdown(fabricated(["avx2"]))
    assert "emulated" not in plain and "XLA's code generation" not in plain
    assert _row(plain, "cpu", "no-onednn")[-1] == "2.50 (no-onednn / onednn)"


def test_markdown_only_rewrites_new_and_old_layouts(tmp_path):
    results = fabricated(["avx2", "avx512f"])
    (tmp_path / "bench.json").write_text(json.dumps(results))
    assert bench.main(["--markdown-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "bench.md").read_text() == bench.markdown(results)
    old = {"machine": {"cpu": "AMD EPYC", "cores": 2, "gpus": [], "tensorflow": "2.21.0", "python": "3.11.7",
                       "platform": "Linux"},
           "matmul_gflops": 200.0,
           "train_step": [{"preset": "cpu", "variant": "float32", "device": "CPU", "gflop": 72.4,
                           "gflops_per_second": 131.2, "fraction_of_matmul_peak": 0.656, "seconds": 0.55,
                           "all_seconds": [0.55], "first_call_seconds": 6.2, "finite": True}],
           "policy": [{"preset": "cpu", "seconds": 0.0016, "steps_per_second": 638.4}]}
    (tmp_path / "bench.json").write_text(json.dumps(old))
    assert bench.main(["--markdown-only", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| cpu | float32 | CPU | 0.55 | 6.2 | 72 | 131.2 | 66% | - |" in md
    assert "Command: not recorded" in md and "must not be compared" in md


@pytest.mark.slow
def test_children_really_run_with_onednn_off_and_on(tmp_path, capsys):
    """One real pair of child processes (debug preset, one repeat, a small matmul)."""
    code = bench.main(["--settings", "no-onednn", "onednn", "--presets", "debug", "--variants", "float32",
                       "--repeats", "1", "--no-envs", "--matmul-size", "128", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    off, on = results["settings"]
    assert (off["name"], off["machine"]["onednn"], off["setting"]["env"]["TF_ENABLE_ONEDNN_OPTS"]) == \
        ("no-onednn", False, "0")
    assert (on["name"], on["machine"]["onednn"], on["setting"]["env"]["TF_ENABLE_ONEDNN_OPTS"]) == \
        ("onednn", True, "1")
    for s in (off, on):
        assert s["matmul_gflops"] > 0 and s["setting"]["onednn_isa"]
        assert [(r["preset"], r["variant"]) for r in s["train_step"]] == [("debug", "float32")]
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("# dreamer_tf benchmark\n\nCommand: `dreamer-tf bench --settings no-onednn onednn")
    assert _row(md, "debug", "no-onednn")[3] == "off" and _row(md, "debug", "onednn")[3] == "on"
    assert _row(md, "debug", "onednn")[-1].endswith("(onednn / no-onednn)")


def test_bench_never_overwrites_the_committed_results_by_default_and_says_where_it_wrote(tmp_path, monkeypatch,
                                                                                         capsys):
    """Run from a checkout, a plain `dreamer-tf bench` wrote over results/bench.md without a word."""
    measured = {"machine": {"cpu": "Some CPU", "cores": 2, "gpus": [], "tensorflow": "2.21.0", "python": "3.11",
                            "platform": "Linux"}, "matmul_gflops": 100.0, "train_step": [], "policy": []}
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: dict(measured))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bench.md").write_text("committed\n")
    assert bench.main(["--presets", "debug", "--variants", "float32", "--no-envs"]) == 0
    assert (tmp_path / "results" / "bench.md").read_text() == "committed\n"
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bench.md"]
    written = tmp_path / bench.DEFAULT_OUT / "bench.md"
    assert written.read_text() == bench.markdown(json.loads(written.with_suffix(".json").read_text()))
    out = capsys.readouterr().out
    assert f"wrote {bench.DEFAULT_OUT / 'bench.md'} and {bench.DEFAULT_OUT / 'bench.json'}" in out
    # --out results, given explicitly, is how the committed numbers are regenerated.
    assert bench.main(["--presets", "debug", "--variants", "float32", "--no-envs", "--out", "results"]) == 0
    assert (tmp_path / "results" / "bench.md").read_text() != "committed\n"
    # An --out that is a file: one line, before anything is measured.
    monkeypatch.setattr(bench, "measure", lambda *args, **kwargs: pytest.fail("measured before checking --out"))
    assert bench.main(["--presets", "debug", "--no-envs", "--out", "results/bench.md"]) == 2
    assert capsys.readouterr().err.strip() == "dreamer-tf bench: error: --out results/bench.md is a file, not a directory"


def test_markdown_only_without_a_bench_json_is_one_line(tmp_path, capsys):
    assert bench.main(["--markdown-only", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"dreamer-tf bench: error: --markdown-only: {tmp_path / 'bench.json'} "
                                               "does not exist (give the --out that holds bench.json)")


def test_bench_devices_says_where_it_wrote(tmp_path, monkeypatch, capsys):
    from dreamer_tf.study import bench_devices

    def fake(presets, n, repeats, out, argv, module):
        (out / "bench_devices.md").write_text("x")
        return 0
    monkeypatch.setattr(bench_devices, "main", fake)
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--devices", "2", "--presets", "debug"]) == 0
    assert (tmp_path / bench.DEFAULT_OUT / "bench_devices.md").exists()
    out = bench.DEFAULT_OUT
    assert f"wrote {out / 'bench_devices.md'} and {out / 'bench_devices.json'}" in capsys.readouterr().out


@pytest.mark.parametrize("n", ["1", "0", "-3"])
def test_devices_below_two_is_one_line_before_anything_runs(tmp_path, capsys, n):
    assert bench.main(["--devices", n, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--devices must be >= 2 (one device vs that many replicas), got {n}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
