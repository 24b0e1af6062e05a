"""Config defaults equal the paper's values; presets, overrides and error messages."""
import pytest

from dreamer_tf import config

# Dreamer v1 hyperparameters as the paper states them (Hafner et al., "Dream to Control", ICLR 2020,
# Appendix A "Hyper Parameters", and Sec. 6), each with the paper's words.
PAPER = dict(
    batch_size=50, batch_length=50,          # "We draw batches of 50 sequences of length 50"
    model_lr=6e-4, value_lr=8e-5, actor_lr=8e-5,  # "Adam ... learning rates 6e-4, 8e-5, 8e-5" (world, value, action)
    grad_clip=100.0,                         # "scale down gradient norms that exceed 100"
    kl_scale=1.0,                            # "We do not scale the KL regularizers (beta = 1)"
    free_nats=3.0,                           # "but clip them below 3 free nats as in PlaNet"
    horizon=15,                              # "The imagination horizon is H = 15"
    discount=0.99, disclam=0.95,             # "V_lambda targets with gamma = 0.99 and lambda = 0.95"
    stoch_size=30,                           # "Distributions in latent space are 30-dimensional diagonal Gaussians"
    dense_act="elu",                         # "three dense layers of size 300 with ELU activations"
    expl_amount=0.3,                         # "the predicted mode action with Normal(0, 0.3) exploration noise"
    action_repeat=2,                         # "we fix it [the action repeat] to 2 for all environments"
    train_steps=100,                         # "We iterate between 100 training steps and collecting 1 episode":
    train_every=1000,                        #   an episode is 1000 env steps (frames; time_limit below)
    prefill=5000,                            # "initialized with S = 5 episodes collected using random actions"
    time_limit=1000,                         # not a quote: the DeepMind Control Suite's episode length
    size=64,                                 # 64 x 64 RGB images
    representation="reconstruction",         # the main agent (Sec. 6 compares contrastive and reward-only)
    pcont=False,                             # continuation model only for episode ends (Atari, DMLab)
    steps=5_000_000,                         # the DMC results are reported at 5e6 env steps (Sec. 6,
                                             #   from memory of the figures, not checked against the text)
)

# Not in the paper's text: the released code's values (github.com/danijar/dreamer).
RELEASED_CODE = dict(
    num_units=400,       # the paper says "dense layers of size 300"; the released code uses 400
    deter_size=200,      # the GRU size of PlaNet's RSSM, which Dreamer uses; Dreamer's appendix does not state it
    cnn_depth=32, cnn_act="relu",  # "the convolutional encoder and decoder networks from PlaNet" (no sizes given)
    action_init_std=5.0,  # the paper gives the mean scale 5 (below), not the initial std
    eval_every=10000, precision=32, expl="auto", jit=False,
)


def test_paper_defaults():
    cfg = config.load()
    for key, value in {**PAPER, **RELEASED_CODE}.items():
        assert cfg[key] == value, key
        assert type(cfg[key]) is type(value), key
    assert config.load("paper") == cfg


def test_paper_action_model_and_exploration():
    """"The action model outputs a tanh mean scaled by a factor of 5 and a softplus standard deviation";
    continuous control explores with additive Gaussian noise."""
    import inspect
    from types import SimpleNamespace as NS

    import numpy as np

    from dreamer_tf.agent import explore
    from dreamer_tf.models import ActionHead
    assert inspect.signature(ActionHead.__init__).parameters["mean_scale"].default == 5.0
    box = NS(shape=(6,), low=-np.ones(6), high=np.ones(6))
    assert explore.action_kind(config.load(), box) == (False, "additive_gaussian")


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
    ({"batchsize": 3}, r"^unknown config key 'batchsize'; did you mean 'batch_size'.*\? \(docs/configuration.md"),
    ({"batch_size": 1.5}, "'batch_size': value 1.5 is a float, expected an int"),
    ({"batch_size": "big"}, "'batch_size': value 'big' is a str, expected an int"),
    ({"pcont": 1}, "'pcont': value 1 is an int, expected a bool"),
    ({"world_model.kl_scal": 1.0}, r"^unknown config key 'world_model.kl_scal'; did you mean 'world_model.kl_scale'"),
    ({"world_model.free_nats": -1.0}, r"'world_model.free_nats': value -1.0 is out of range \(must be >= 0\)"),
    ({"world_model": 3}, r"'world_model': value 3 is an int, expected a group of keys \[.*'free_nats'"),
    ({"discount": 1.5}, r"'discount': value 1.5 is out of range \(must be >= 0 and <= 1\)"),
    ({"batch_size": 0}, r"'batch_size': value 0 is out of range \(must be > 0\)"),
    ({"free_nats": -1.0}, r"'world_model.free_nats': value -1.0 is out of range \(must be >= 0\)"),  # old name
    ({"representation": "pixels"}, r"'representation': value 'pixels' is not one of \['reconstruction', "
                                   r"'contrastive', 'reward'\]"),
    ({"precision": 64}, r"'precision': value 64 is not one of \[16, 32, 'bf16'\]"),
    ({"precision": "bf17"}, r"'precision': value 'bf17' is not one of \[16, 32, 'bf16'\]"),
])
def test_bad_overrides_name_key_value_and_rule(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load("paper", overrides)


def test_unknown_key_suggests_the_closest_not_all_keys():
    with pytest.raises(config.ConfigError) as error:
        config.load("paper", {"kl_scael": 1.0})
    message = str(error.value)
    assert "did you mean 'world_model.kl_scale'?" in message  # an old flat name suggests its new place
    assert "steps" not in message and "\n" not in message
    with pytest.raises(config.ConfigError, match=r"^unknown config key 'zzz' \(docs"):  # nothing close: no guess
        config.load("paper", {"zzz": 1})


def test_unbalanced_list_brackets_are_refused():
    """`--set "loggers=[jsonl"` is a typo, not [jsonl] (which would turn TensorBoard off)."""
    for raw in ("[jsonl", "jsonl]", "[jsonl]]", "[[jsonl]"):
        with pytest.raises(config.ConfigError, match=rf"^config key 'loggers': value '{__import__('re').escape(raw)}' "
                                                     r"has unbalanced brackets"):
            config.load("paper", config.parse_overrides([f"loggers={raw}"]))
    assert config.load("paper", config.parse_overrides(["loggers=[jsonl]"])).loggers == ("jsonl",)
    assert config.load("paper", config.parse_overrides(["loggers=jsonl,wandb"])).loggers == ("jsonl", "wandb")


def test_loss_settings_are_groups_addressed_by_dotted_keys_and_old_names():
    cfg = config.load("paper", config.parse_overrides(["world_model.kl_scale=0.5"]))
    assert dict(cfg.world_model) == {**config.load().world_model, "kl_scale": 0.5}
    assert config.load().world_model.kl_scale == 1.0  # the defaults are not changed in place
    # The old flat names (runs and scripts written before the groups) are aliases, read and write.
    old = config.load("paper", {"free_nats": 2, "kl_scale": 0.1})
    assert (old.world_model.free_nats, old.world_model.kl_scale) == (2.0, 0.1)
    assert old.free_nats == old["free_nats"] == old["world_model.free_nats"] == 2.0
    assert old.replace(pcont_scale=5.0).world_model.pcont_scale == 5.0
    assert config.load("atari").world_model.kl_scale == 0.1  # a preset sets one key of a group
    assert "free_nats" not in config.load().to_dict() and config.load().to_dict()["world_model"]["free_nats"] == 3.0
    assert config.diff(config.load(), old) == {"world_model.free_nats": (3.0, 2.0), "world_model.kl_scale": (1.0, 0.1)}
    with pytest.raises(AttributeError, match="no key 'nope'"):
        config.load().world_model.nope


def test_key_metadata_lives_beside_the_keys_in_the_yaml():
    """Bounds, `added` and `was` come from configs/dreamer.yaml's _meta table: no row for a key that
    does not exist, and config.py holds no per-key lists."""
    from pathlib import Path
    flat = set(config._flat(config.load()))
    assert set(config._meta()) <= flat, sorted(set(config._meta()) - flat)
    assert set(config.ADDED_KEYS) == config.added_keys() and config.added_keys() <= flat
    source = Path(config.__file__).read_text()
    for key in ("batch_size", "free_nats", "atari_sticky", "contrastive_negatives"):
        assert f'"{key}"' not in source, key
    assert config._meta()["batch_size"] == {"above": 0}


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
    defaults = text.split("\ndefaults:")[1].split("\n_")[0]  # up to the next top-level table
    for line in defaults.splitlines():
        if line.startswith("  ") and not line.strip().startswith("#") and ":" in line:  # group keys too
            assert "#" in line, f"no comment on config line: {line.strip()}"


def test_gymnasium_tasks_default_to_action_repeat_one():
    """The paper's action repeat 2 is for DMC; a gym_ task gets 1 unless the preset or user sets it."""
    assert config.load("debug", {"task": "gym_Pendulum-v1"}).action_repeat == 1
    assert config.load("state", {"task": "gym_Pendulum-v1", "action_repeat": 2}).action_repeat == 2
    assert config.load("debug").action_repeat == 2  # DMC keeps the paper's
    assert config.load("atari", {"task": "gym_Pendulum-v1"}).action_repeat == 4  # the preset's choice


def test_stored_config_lacking_keys_is_refused_naming_the_file_and_keys(tmp_path):
    """A config.yaml cut short would be resumed with defaults for the lost keys (another agent than
    its checkpoints hold): refused, naming the file and the keys; --force (fill_missing) takes the
    defaults. Keys added since old runs were written (tests/golden/run_v0) are filled silently."""
    from pathlib import Path
    path = tmp_path / "config.yaml"
    config.save(config.load("debug"), path)
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(config.ConfigError, match=rf"config file {path} lacks .*action_repeat.*--force"):
        config.load_file(path)
    assert config.load_file(path, fill_missing=True).batch_size == config.load().batch_size
    golden = Path(__file__).parent / "golden" / "run_v0" / "config.yaml"
    old = config.load_file(golden)  # an old run still resumes: flat loss settings, no groups
    assert old.replay_sampler == "uniform" and old.world_model.free_nats == 3.0
    assert set(config.ADDED_KEYS) <= set(config._flat(config.load()))  # no stale names in the list
    grouped = tmp_path / "grouped.yaml"  # a group cut short is cut short too
    config.save(config.load("debug"), grouped)
    grouped.write_text(grouped.read_text().replace("  kl_scale: 1.0\n", ""))
    with pytest.raises(config.ConfigError, match=r"lacks world_model\.kl_scale"):
        config.load_file(grouped)
    full = tmp_path / "full.yaml"
    config.save(config.load("debug"), full)
    full.write_text(full.read_text().replace("batch_size: 3", "batch_size: banana"))
    with pytest.raises(config.ConfigError, match=rf"config file {full}: config key 'batch_size': value 'banana'"):
        config.load_file(full)


def test_every_key_added_since_the_oldest_run_is_marked_added():
    """A new config key must be marked `added: true` in configs/dreamer.yaml's _meta, or every run
    directory written before it is refused on resume as a config.yaml "cut short". The oldest
    committed run (tests/golden/run_v0) plus the marked keys must cover the defaults exactly
    (group keys one by one)."""
    from pathlib import Path
    from ruamel.yaml import YAML
    stored = YAML(typ="safe").load((Path(__file__).parent / "golden" / "run_v0" / "config.yaml").read_text())
    unlisted = set(config._flat(config.load())) - set(config._flat(config._renamed(stored))) - config.added_keys()
    assert not unlisted, f"mark {sorted(unlisted)} `added: true` in configs/dreamer.yaml's _meta"
