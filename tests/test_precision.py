"""precision: bf16 (mixed bfloat16, no loss scaling) next to float32 on the CPU."""
from __future__ import annotations

from types import SimpleNamespace as NS

import numpy as np
import pytest

from dreamer_tf import config
from dreamer_tf.agent import Dreamer
from dreamer_tf.models.networks import bf16_unsupported

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


def test_bf16_is_refused_in_one_line_where_onednn_has_no_bfloat16_kernels(monkeypatch):
    assert bf16_unsupported(flags={"avx2", "avx512f", "avx512_bf16"}, environ={}) is None
    assert "AVX512_BF16" in bf16_unsupported(flags={"avx2", "avx512f"}, environ={})
    assert bf16_unsupported(flags={"avx2", "amx_bf16"}, environ={}) is None
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in bf16_unsupported(flags={"avx512_bf16"}, environ={"ONEDNN_MAX_CPU_ISA": "avx2"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # what the check reads; oneDNN itself is already loaded
    with pytest.raises(ValueError, match=r"^precision bf16 cannot run here: ONEDNN_MAX_CPU_ISA=AVX2 .*use precision 32$"):
        Dreamer(config.load("debug", {"precision": "bf16"}), OBS, ACT)


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
