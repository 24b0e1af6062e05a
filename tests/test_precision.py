"""precision: bf16 (mixed bfloat16, no loss scaling) next to float32 on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace as NS

import numpy as np
import pytest

from dreamer_tf import config
from dreamer_tf.agent import Dreamer
from dreamer_tf.models.networks import bf16_unsupported
from dreamer_tf.run.logdir import Diverged, check_divergence
from dreamer_tf.run.logger import read_metrics

needs_bf16 = pytest.mark.skipif(bool(bf16_unsupported()), reason=f"bf16 cannot run here: {bf16_unsupported()}")

OBS = {"image": NS(shape=(64, 64, 3), dtype=np.uint8)}
ACT = NS(shape=(2,), low=-np.ones(2, np.float32), high=np.ones(2, np.float32))


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, l = cfg.batch_size, cfg.batch_length
    x = np.linspace(0, 1, 64)
    image = (255 * (0.5 + 0.5 * np.sin(2 * np.pi * (x[None, None, :, None, None]
                                                     + rng.uniform(0, 1, (b, l, 1, 1, 1)))))).astype(np.uint8)
    return {"image": np.broadcast_to(image, (b, l, 64, 64, 3)).copy(),
            "action": rng.uniform(-1, 1, (b, l, 2)).astype(np.float32),
            "reward": rng.normal(size=(b, l)).astype(np.float32)}


def test_bf16_is_accepted_by_the_config_and_refused_misspelt():
    assert config.load("debug", {"precision": "bf16"}).precision == "bf16"
    with pytest.raises(config.ConfigError, match="precision"):
        config.load("debug", {"precision": "bf32"})


# CPU flag sets of the two kinds of x86-64 machine the suite runs on (tests pose as either, on either).
AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
AVX512_BF16 = AVX512 | {"avx512_bf16"}
ON = {"TF_ENABLE_ONEDNN_OPTS": "1"}  # what importing dreamer_tf sets unless the user chose


def test_bf16_is_refused_in_one_line_where_onednn_has_no_bfloat16_kernels(monkeypatch):
    assert bf16_unsupported(flags=AVX512_BF16, environ=ON, gpus=0) is None
    assert "AVX512_BF16" in bf16_unsupported(flags=AVX512, environ=ON, gpus=0)
    assert "AVX512_BF16" in bf16_unsupported(flags=AVX2, environ=ON, gpus=0)
    assert bf16_unsupported(flags=AVX2 | {"amx_bf16"}, environ=ON, gpus=0) is None
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in bf16_unsupported(flags=AVX512_BF16, environ={**ON, "ONEDNN_MAX_CPU_ISA": "avx2"},
                                                         gpus=0)
    assert bf16_unsupported(flags=AVX2, environ={"TF_ENABLE_ONEDNN_OPTS": "0"}, gpus=0) is None  # Eigen kernels
    assert bf16_unsupported(flags=AVX2, environ={}, gpus=0) is None  # TensorFlow leaves oneDNN off on AVX2 ...
    assert "AVX512_BF16" in bf16_unsupported(flags=AVX512, environ={}, gpus=0)  # ... and turns it on with VNNI
    assert bf16_unsupported(flags=AVX2, environ=ON, gpus=1) is None  # a GPU runs it
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what the check reads; oneDNN itself is already loaded
    with pytest.raises(ValueError, match=r"^precision bf16 cannot run here: ONEDNN_MAX_CPU_ISA=AVX2 .*use precision 32$"):
        Dreamer(config.load("debug", {"precision": "bf16"}), OBS, ACT)


def test_bf16_check_reads_nothing_of_the_machine_it_is_given(monkeypatch):
    """On an AVX2 host the check returned None for the AVX-512 flags a test handed it: it read the
    real process's oneDNN state. Given flags, environment and GPUs it must read nothing else."""
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from dreamer_tf.models import networks

    def machine(*_):
        raise AssertionError("read the real machine")
    monkeypatch.setattr(_pywrap_util_port, "IsMklEnabled", lambda: False)  # what that host's process reported
    monkeypatch.setattr(networks, "cpu_model_and_flags", machine)
    monkeypatch.setattr(tf.config, "list_physical_devices", machine)
    for flags in (AVX2, AVX512):
        assert "AVX512_BF16" in bf16_unsupported(flags=flags, environ=ON, gpus=0)
    assert bf16_unsupported(flags=AVX512_BF16, environ=ON, gpus=0) is None


@needs_bf16
def test_bf16_train_steps_are_finite_and_close_to_float32():
    f32 = Dreamer(config.load("debug", {"seed": 3}), OBS, ACT)
    b16 = Dreamer(config.load("debug", {"seed": 3, "precision": "bf16"}), OBS, ACT)
    assert b16.encoder.convs[0].compute_dtype == "bfloat16" and b16.encoder.convs[0].kernel.dtype == "float32"
    assert not hasattr(b16.model_opt, "dynamic_scale")  # no loss scaling with bfloat16
    for x, y in zip(f32.model_variables, b16.model_variables):  # same initial weights
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    batch = _batch(f32.config)
    first = [(f32.train(batch), b16.train(batch))]
    for _ in range(10):
        a, b = f32.train(batch), b16.train(batch)
    for m32, m16 in first + [(a, b)]:
        for key in ("model_loss", "image_loss", "reward_loss", "kl", "actor_loss", "value_loss"):
            assert np.isfinite(m16[key])
        # bfloat16 keeps 8 bits of mantissa: the losses agree to a few percent, not to float rounding.
        assert m16["model_loss"] == pytest.approx(m32["model_loss"], rel=0.03)
        assert m16["image_loss"] == pytest.approx(m32["image_loss"], rel=0.03)
    assert b["model_loss"] < first[0][1]["model_loss"]  # and it learns


# --- float16: the loss scaler's search is not divergence (issue 29 item 1) -------------------------
SEARCH = {"model_nonfinite": 1.0, "model_loss_scale_skip": 1.0, "model_loss": 11622.75,
          "actor_nonfinite": 0.0, "actor_loss_scale_skip": 0.0, "value_nonfinite": 0.0, "value_loss_scale_skip": 0.0}
REAL = {**SEARCH, "model_loss_scale_skip": 0.0, "model_loss": float("inf")}


def test_divergence_guard_counts_real_skips_not_the_loss_scale_search(tmp_path):
    streak = 0
    for _ in range(30):  # more than max_nonfinite: the search never stops a run ...
        streak, extra = check_divergence(SEARCH, streak, 10, 600, tmp_path)
        assert extra == {"skipped_updates": 1.0}  # ... but its skips are still reported
    assert streak == 0
    for _ in range(2):  # a search skip between real ones neither counts nor ends the streak
        streak, _ = check_divergence(REAL, streak, 3, 600, tmp_path)
    streak, _ = check_divergence(SEARCH, streak, 3, 600, tmp_path)
    assert streak == 2
    with pytest.raises(Diverged, match=rf"^3 consecutive non-finite updates at step 600 \(model_loss=inf\); "
                                       rf"the last good checkpoint is kept in {tmp_path}$"):
        check_divergence(REAL, streak, 3, 600, tmp_path)
    streak, extra = check_divergence({**SEARCH, "model_nonfinite": 0.0}, 2, 3, 600, tmp_path)
    assert streak == 0 and extra == {"skipped_updates": 0.0}


def _train(logdir, *overrides):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir", str(logdir),
                           "--set", "precision=16", *overrides], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_float16_debug_run_trains_through_the_loss_scale_search(tmp_path):
    """The debug preset with precision=16: the scale starts at 2^15 and the first ~10 updates
    overflow (the pretrain's 2 and the first phase's 10 cover them); the run gets past them and
    trains through 2 more training phases (steps 400 and 500) with no skip."""
    proc = _train(tmp_path / "f16", "steps=500", "train_steps=10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DT_HALF" not in proc.stderr  # an AVX2 CPU's harmless "E0000 ... oneDNN supports DT_HALF" line
    rows = [r for r in read_metrics(tmp_path / "f16") if "model_nonfinite" in r]
    assert rows[0]["skipped_updates"] > 0  # the search happened ...
    last = [r for r in rows if r["step"] >= 400]
    assert len(last) >= 2 and all(r["model_nonfinite"] == 0.0 for r in last), last  # ... and ended
    assert all(np.isfinite(r[k]) for r in last for k in ("model_loss", "actor_loss", "value_loss"))


@pytest.mark.slow
def test_float16_real_divergence_stops_the_run_in_one_line(tmp_path):
    """An infinite float32 loss (kl_scale beyond float32) is no loss-scale search: max_nonfinite
    skipped updates stop the run with one line, no traceback."""
    proc = _train(tmp_path / "inf", "steps=300", "max_nonfinite=3", "world_model.kl_scale=1e39")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "diverged" in line]
    assert len(lines) == 1 and "3 consecutive non-finite updates" in lines[0] and "model_loss=inf" in lines[0], \
        proc.stderr[-3000:]
