"""Config defaults equal the paper's values; presets, overrides and error messages."""
import pytest

from dreamer_tf import config

# Dreamer v1 hyperparameters (paper Sec. 6 and Appendix; num_units as the released code).
PAPER = dict(
    batch_size=50, batch_length=50, deter_size=200, stoch_size=30, num_units=400, cnn_depth=32,
    free_nats=3.0, kl_scale=1.0, model_lr=6e-4, value_lr=8e-5, actor_lr=8e-5, grad_clip=100.0,
    horizon=15, discount=0.99, disclam=0.95, action_repeat=2, time_limit=1000, prefill=5000,
    train_every=1000, train_steps=100, expl_amount=0.3, eval_every=10000, steps=5_000_000,
    expl="auto", action_init_std=5.0, precision=32, representation="reconstruction",
    pcont=False, dense_act="elu", cnn_act="relu", size=64,
)


def test_paper_defaults():
    cfg = config.load()
    for key, value in PAPER.items():
        assert cfg[key] == value, key
        assert type(cfg[key]) is type(value), key
    assert config.load("paper") == cfg


def test_attribute_and_mapping_access():
    cfg = config.load("debug")
    assert cfg.batch_size == cfg["batch_size"] == 3
    with pytest.raises(AttributeError, match="no key 'nope'"):
        cfg.nope
    with pytest.raises(AttributeError, match="read-only"):
        cfg.batch_size = 4
    assert cfg.replace(batch_size=4).batch_size == 4 and cfg.batch_size == 3


def test_presets_override_only_their_keys():
    paper, cpu = config.load("paper"), config.load("cpu")
    assert set(config.presets()) >= {"paper", "cpu", "debug", "atari"}
    changed = {k for k in paper if paper[k] != cpu[k]}
    assert {"batch_size", "cnn_depth", "num_units"} <= changed
    assert cpu.free_nats == 3.0 and cpu.horizon == 15
    atari = config.load("atari")
    assert (atari.action_repeat, atari.horizon, atari.kl_scale, atari.clip_rewards) == (4, 10, 0.1, "tanh")
    assert (atari.expl, atari.expl_amount, atari.expl_min, atari.expl_decay) == ("epsilon_greedy", 0.4, 0.1, 200000)


def test_overrides_are_typed():
    cfg = config.load("paper", {"batch_size": 16, "model_lr": 1, "steps": 1e6, "pcont": True})
    assert cfg.batch_size == 16 and cfg.model_lr == 1.0 and type(cfg.model_lr) is float
    assert cfg.steps == 1_000_000 and type(cfg.steps) is int
    assert cfg.pcont is True


def test_parse_overrides_reads_yaml_scalars():
    parsed = config.parse_overrides(["model_lr=1e-4", "pcont=true", "task=dmc_cartpole_swingup", "steps=3",
                                     "free_nats=0"])
    assert parsed == {"model_lr": 1e-4, "pcont": True, "task": "dmc_cartpole_swingup", "steps": 3, "free_nats": 0}
    assert config.load("paper", parsed).free_nats == 0.0
    with pytest.raises(config.ConfigError, match="'batch_size' is not of the form key=value"):
        config.parse_overrides(["batch_size"])


@pytest.mark.parametrize("overrides, message", [
    ({"batchsize": 3}, "unknown config key 'batchsize'"),
    ({"batch_size": 1.5}, "'batch_size': value 1.5 is a float, expected a int"),
    ({"batch_size": "big"}, "'batch_size': value 'big' is a str, expected a int"),
    ({"pcont": 1}, "'pcont': value 1 is a int, expected a bool"),
    ({"discount": 1.5}, r"'discount': value 1.5 is out of range \(must be >= 0 and <= 1\)"),
    ({"batch_size": 0}, r"'batch_size': value 0 is out of range \(must be > 0\)"),
    ({"free_nats": -1.0}, r"'free_nats': value -1.0 is out of range \(must be >= 0\)"),
    ({"representation": "pixels"}, r"'representation': value 'pixels' is not one of \['reconstruction', "
                                   r"'contrastive', 'reward'\]"),
    ({"precision": 64}, r"'precision': value 64 is not one of \[16, 32\]"),
])
def test_bad_overrides_name_key_value_and_rule(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("paper", overrides)


def test_unknown_preset_lists_presets():
    with pytest.raises(config.ConfigError, match=r"unknown preset 'huge' \(known presets: paper, cpu, debug"):
        config.load("huge")


def test_save_load_round_trip_and_diff(tmp_path):
    cfg = config.load("cpu", {"seed": 3})
    config.save(cfg, tmp_path / "config.yaml")
    back = config.load_file(tmp_path / "config.yaml")
    assert back == cfg
    assert config.diff(cfg, back) == {}
    assert config.diff(cfg, cfg.replace(seed=4, steps=10)) == {"seed": (3, 4), "steps": (cfg.steps, 10)}
    assert config.diff(cfg, cfg.replace(seed=4, steps=10), ignore=["steps"]) == {"seed": (3, 4)}
    (tmp_path / "bad.yaml").write_text("batch_size: [1, 2\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load_file(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("batch_sise: 3\n")
    with pytest.raises(config.ConfigError, match="unknown config key 'batch_sise'"):
        config.load_file(tmp_path / "typo.yaml")


def test_every_key_has_a_comment():
    from pathlib import Path
    text = (Path(config.__file__).resolve().parent.parent / "configs" / "dreamer.yaml").read_text()
    defaults = text.split("defaults:")[1].split("_range:")[0]
    for line in defaults.splitlines():
        if line.startswith("  ") and not line.strip().startswith("#") and ":" in line:
            assert "#" in line, f"no comment on config line: {line.strip()}"
