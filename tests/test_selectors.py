"""Replay selectors (dreamer_tf/data/selectors.py): each one's draws against hand-computed
probabilities, the default config's draws against today's, the config's mixture, exact resume."""
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

from dreamer_tf import config
from dreamer_tf.data import Replay
from dreamer_tf.data import sampler as S
from dreamer_tf.data import selectors as X

from test_replay import make_episode, windows_of


def frequencies(windows: S.Windows, draws: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Share of the draws that hit each window, windows numbered as `Windows.at` (oldest first)."""
    episodes, starts = S.check_draw(windows, len(draws[0]), *draws)
    first = dict(zip(windows.eligible.tolist(), np.concatenate([[0], windows.cumulative[:-1]]).tolist()))
    flat = np.array([first[e] for e in episodes.tolist()]) + starts
    return np.bincount(flat, minlength=windows.total) / len(flat)


def assert_draws_follow(windows: S.Windows, sampler, expected, n: int = 40_000, seed: int = 0) -> None:
    """`n` draws (fixed seed) match the probabilities `expected` (one per window): every window's
    share within 5 standard errors, and a chi-square under its 99.9% quantile. Both bounds are loose
    enough for any seed's noise and tight enough to catch a probability off by a few percent."""
    p = np.array([float(x) for x in expected])
    assert len(p) == windows.total and abs(p.sum() - 1) < 1e-12
    freq = frequencies(windows, sampler(windows, n, np.random.default_rng(seed)))
    bound = 5 * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= bound), (freq.round(4).tolist(), p.round(4).tolist())
    chi2 = float(np.sum((freq - p) ** 2 * n / p))
    dof = len(p) - 1
    assert chi2 < dof + 3.1 * np.sqrt(2 * dof) + 8, chi2  # above the 99.9% quantile for 1..50 dof


# Two eligible episodes and one too short: windows of 3 in episodes of 4, 2 and 7 entries are
# 2 (episode 0) + 0 (episode 1) + 5 (episode 2) = 7, numbered 0..6 oldest first.
SMALL = S.Windows.of([4, 2, 7], 3)


# ---------------------------------------------------------------------------------------------
# The default config draws today's stream
# ---------------------------------------------------------------------------------------------

def test_the_default_config_draws_exactly_todays_stream(tmp_path):
    sampler = X.from_config(config.load())
    assert sampler is S.uniform_windows
    # The pinned draws of test_replay (the pre-restructuring replay, PCG64(2024)).
    windows = S.Windows.of([10, 5, 20, 40], 8)
    episodes, starts = sampler(windows, 6, np.random.Generator(np.random.PCG64(2024)))
    assert (episodes.tolist(), starts.tolist()) == ([2, 3, 2, 2, 2, 2], [8, 17, 1, 7, 12, 12])
    # Through a replay built as the train loop builds it, batch for batch.
    ours, today = Replay(tmp_path / "a", seed=4, sampler=sampler), Replay(tmp_path / "b", seed=4, sampler="uniform")
    for i in range(3):
        ours.add(make_episode(i, 12 + 7 * i))
        today.add(make_episode(i, 12 + 7 * i))
    assert [windows_of(ours.sample(5, 6)) for _ in range(4)] == [windows_of(today.sample(5, 6)) for _ in range(4)]


@pytest.mark.parametrize("preset", config.presets())
def test_every_preset_and_the_old_sampler_names_build_the_functions_of_today(preset):
    c = config.load(preset)
    assert X.from_config(c) is S.SAMPLERS[c.replay_sampler]
    for name in ["uniform", "episode", "reference"]:  # old runs' config.yaml resume with these
        assert X.from_config(c.replace(replay_sampler=name)) is S.SAMPLERS[name]
        # Entries switched off (fraction 0) draw nothing from the generator: still today's stream.
        assert X.build(name, {"uniform": 0.0, "episode": {"fraction": 0}}) is S.SAMPLERS[name]


# ---------------------------------------------------------------------------------------------
# Mixture
# ---------------------------------------------------------------------------------------------

def test_mixture_draws_follow_the_fraction_weighted_probabilities():
    # uniform (the rest, 1/4): 1/7 per window; episode (3/4): 1/2 per episode, then 1/2 or 1/5.
    u, e = Fraction(1, 4), Fraction(3, 4)
    expected = [u / 7 + e / 4] * 2 + [u / 7 + e / 10] * 5
    assert sum(expected) == 1
    sampler = X.build("uniform", {"episode": 0.75})
    assert isinstance(sampler, X.Mixture) and "0.25 uniform_windows, 0.75 uniform_episodes" in sampler.__name__
    assert_draws_follow(SMALL, sampler, expected)
    # Power: the fractions swapped, or either part alone, fail the same check.
    for wrong in [X.build("uniform", {"episode": 0.25}), S.uniform_windows, S.uniform_episodes]:
        with pytest.raises(AssertionError):
            assert_draws_follow(SMALL, wrong, expected)


def oldest(windows, batch_size, rng):
    """Always the oldest window (draws nothing)."""
    return windows.at(np.zeros(batch_size, np.int64))


def newest(windows, batch_size, rng):
    """Always the newest window (draws nothing)."""
    return windows.at(np.full(batch_size, windows.total - 1))


def test_mixture_exact_small_cases(monkeypatch):
    # Parts that always draw one window: each draw's part is then visible in the draw itself.
    rng = np.random.default_rng(5)
    draws = frequencies(SMALL, X.Mixture([(0.25, newest), (0.75, oldest)])(SMALL, 8000, rng))
    assert draws[1:6].sum() == 0 and abs(draws[6] - 0.25) < 5 * np.sqrt(0.25 * 0.75 / 8000)
    assert frequencies(SMALL, X.Mixture([(1.0, newest), (0.0, oldest)])(SMALL, 50, rng))[6] == 1
    # The stream does not depend on the order of the config's mapping (entries go by name).
    monkeypatch.setitem(S.SAMPLERS, "newest", newest)
    monkeypatch.setitem(S.SAMPLERS, "oldest", oldest)
    a = X.build("uniform", {"oldest": 0.2, "newest": 0.3})(SMALL, 100, np.random.default_rng(1))
    b = X.build("uniform", {"newest": 0.3, "oldest": 0.2})(SMALL, 100, np.random.default_rng(1))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # Everything claimed by the mixture: replay_sampler makes no draw.
    only = X.build("reference", {"newest": 0.5, "oldest": 0.5})
    assert set(frequencies(SMALL, only(SMALL, 200, rng)).nonzero()[0].tolist()) == {0, 6}


def test_bad_mixtures_are_one_line_errors_naming_the_entry():
    bad = {
        "nope: unknown selector 'nope'; registered: episode, .*uniform": {"nope": 0.5},
        "episode: expected a fraction in [0, 1]": {"episode": 1.5},
        "episode: expected a fraction in [0, 1] .* got 'half'": {"episode": "half"},
        "episode: expected a fraction in [0, 1] .* got {'p': 0.5}": {"episode": {"p": 0.5}},
        "episode: sampler 'episode' takes no settings, got decay": {"episode": {"fraction": 0.5, "decay": 1}},
        "the fractions sum to 1.2, more than 1": {"episode": 0.6, "reference": 0.6},
        "1: unknown selector 1": {1: 0.5, "episode": 0.25},  # a YAML key that is no name
    }
    for message, mixture in bad.items():
        with pytest.raises(ValueError, match="^replay_mixture: " + message.replace("[", r"\[")
                           .replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")) as error:
            X.build("uniform", mixture)
        assert "\n" not in str(error.value)
    with pytest.raises(config.ConfigError, match="replay_mixture.*expected a dict"):
        config.load("debug", {"replay_mixture": 0.5})
    with pytest.raises(ValueError, match="Mixture fractions must be >= 0 and sum to 1"):
        X.Mixture([(0.5, newest)])


def test_train_refuses_a_bad_mixture_in_one_line_before_making_the_run_directory(tmp_path):
    logdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dreamer_tf", "train", "--preset", "debug", "--logdir", str(logdir),
                           "--set", "replay_mixture={recnecy: 0.5}"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == ("dreamer-tf: error: replay_mixture: recnecy: unknown selector 'recnecy'; registered: "
                           "episode, recency, reference, uniform\n")
    assert not logdir.exists()


def test_a_mixture_from_the_command_line_round_trips_through_config_yaml(tmp_path):
    overrides = config.parse_overrides(["replay_mixture={episode: 0.25}"])
    c = config.load("debug", overrides)
    path = tmp_path / "config.yaml"
    config.save(c, path)
    assert config.load_file(path).replay_mixture == {"episode": 0.25}
    assert isinstance(X.from_config(config.load_file(path)), X.Mixture)


# ---------------------------------------------------------------------------------------------
# Recency
# ---------------------------------------------------------------------------------------------

def recency_probabilities(windows: int, exponent: float) -> list[Fraction]:
    """By hand: the window of age a (0 = newest) has weight 1 / (1 + a)^exponent; oldest first."""
    weights = [1 / Fraction(1 + age) ** exponent for age in reversed(range(windows))]
    return [w / sum(weights) for w in weights]


def test_recency_probabilities_by_hand():
    # 7 windows, exponent 1: weights 1/7 (oldest) ... 1/1 (newest) over H_7 = 363/140.
    assert recency_probabilities(7, 1) == [Fraction(140, 363) / k for k in range(7, 0, -1)]
    assert recency_probabilities(3, 2) == [Fraction(4, 49), Fraction(9, 49), Fraction(36, 49)]


@pytest.mark.parametrize("exponent", [1.0, 2.0, 0.5, 0.0])
def test_recency_draws_follow_the_hand_computed_probabilities(exponent):
    sampler = X.make("recency", exponent=exponent)
    assert_draws_follow(SMALL, sampler, recency_probabilities(SMALL.total, exponent))
    if exponent:  # power: the check rejects the reverse order, an age off by one (2 + a), uniform
        shifted = recency_probabilities(8, exponent)[:-1]  # ages 7..1: weights (2 + a)^-e for a = 6..0
        for wrong in [recency_probabilities(7, exponent)[::-1], [x / sum(shifted) for x in shifted],
                      [Fraction(1, 7)] * 7]:
            with pytest.raises(AssertionError):
                assert_draws_follow(SMALL, sampler, wrong)


def test_recency_follows_the_windows_as_the_replay_grows_and_shrinks():
    # The running sums by age are cached and grown: each size must still get its own distribution.
    sampler = X.make("recency", exponent=1.5)
    for lengths in [[4, 2, 7], [4, 2, 7, 30, 9], [5], [4, 2, 7, 30, 9, 12, 3, 3]]:
        windows = S.Windows.of(lengths, 3)
        assert_draws_follow(windows, sampler, recency_probabilities(windows.total, 1.5), n=60_000)


class Scripted:
    """A generator whose uniform draws are given: `random` returns them in order."""

    def __init__(self, *u: float):
        self.u = np.array(u, np.float64)

    def random(self, size: int) -> np.ndarray:
        assert size == len(self.u)
        return self.u


def test_recency_exact_small_case():
    # 7 windows, exponent 1: the newest (episode 2, start 4) takes u in [0, 140/363), the next
    # (2, 3) [140/363, 210/363), ... the oldest (episode 0, start 0) the last 20/363.
    sampler = X.make("recency")
    cuts = np.cumsum([float(p) for p in recency_probabilities(7, 1)[::-1]])  # by age
    u = [0.0, cuts[0] - 1e-12, cuts[0] + 1e-12, cuts[1] + 1e-12, cuts[5] - 1e-12, cuts[5] + 1e-12,
         np.nextafter(1.0, 0.0)]
    episodes, starts = sampler(SMALL, len(u), Scripted(*u))
    assert list(zip(episodes.tolist(), starts.tolist())) == [(2, 4), (2, 4), (2, 3), (2, 2), (0, 1), (0, 0),
                                                             (0, 0)]
    assert 20 / 363 == pytest.approx(1 - cuts[5])
    # One window: always it; a huge exponent: the newest window, always.
    one = S.Windows.of([2, 3], 3)
    assert X.make("recency")(one, 5, np.random.default_rng(0))[0].tolist() == [1] * 5
    assert frequencies(SMALL, X.make("recency", exponent=200)(SMALL, 1000, np.random.default_rng(0)))[6] == 1


def test_recency_settings_are_checked():
    for bad in [-1, float("nan"), float("inf"), "1", True, None]:
        with pytest.raises(ValueError, match=f"^replay_mixture: recency: recency exponent must be a finite number "
                                             f">= 0, got {bad!r}"):
            X.build("uniform", {"recency": {"fraction": 0.5, "exponent": bad}})
    with pytest.raises(ValueError, match="selector 'recency' has no setting 'exp' .its settings: exponent."):
        X.build("uniform", {"recency": {"fraction": 0.5, "exp": 1}})
    # Checked when shipped off too (fraction 0): a typo never waits for the day it is switched on.
    with pytest.raises(ValueError, match="exponent must be"):
        X.build("uniform", {"recency": {"fraction": 0.0, "exponent": -2}})


def test_recency_is_shipped_off_and_switched_on_by_a_fraction():
    c = config.load()
    assert c.replay_mixture == {"recency": {"fraction": 0.0, "exponent": 1.0}}
    assert X.from_config(c) is S.uniform_windows
    on = X.from_config(c.replace(replay_mixture={"recency": 1.0}))
    assert isinstance(on, X.Recency) and on.exponent == 1.0
    half = X.from_config(c.replace(replay_mixture={"recency": {"fraction": 0.5, "exponent": 2}}))
    assert half.__name__ == "mixture(0.5 uniform_windows, 0.5 recency(exponent=2))"
    expected = [Fraction(1, 14) + p / 2 for p in recency_probabilities(7, 2)]
    assert_draws_follow(SMALL, half, expected)


# ---------------------------------------------------------------------------------------------
# Exact resume: the replay's generator is the whole state
# ---------------------------------------------------------------------------------------------

RESUMED_MIXTURES = [{"episode": 0.5}, {"recency": 1.0}, {"recency": {"fraction": 0.3, "exponent": 0.7}, "episode": 0.3}]


@pytest.mark.parametrize("mixture", RESUMED_MIXTURES)
def test_a_restored_replay_state_continues_a_mixture_exactly(tmp_path, mixture):
    def replay(seed):
        r = Replay(tmp_path, seed=seed, sampler=X.build("uniform", mixture))
        return r
    first = replay(7)
    for i in range(4):
        first.add(make_episode(i, 15 + 5 * i))
    for _ in range(3):
        first.sample(4, 6)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
    expected = [windows_of(first.sample(4, 6)) for _ in range(4)]
    resumed = replay(123)  # a new process: the sampler rebuilt from the stored config
    resumed.set_state(state)
    assert [windows_of(resumed.sample(4, 6)) for _ in range(4)] == expected
