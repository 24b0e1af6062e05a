"""Replay selectors: sampling schemes with settings, mixed by fractions, made from the config.

A selector is a sampler (`dreamer_tf.data.sampler`): ``selector(windows, batch_size, rng) ->
(episodes, starts)``, made once from keyword settings. A new scheme with settings is a class
registered with ``@selector("name")`` whose constructor takes its settings as keywords with
defaults and checks them (one line of error naming the value). The plain samplers of
`sampler.SAMPLERS` (uniform, episode, reference) are selectors without settings.

The config chooses them (`from_config`), in the manner of DreamerV3's ``replay.fracs``:

  replay_sampler: the name of the selector that makes the draws the mixture leaves (all, by default).
  replay_mixture: ``{name: fraction}`` or ``{name: {fraction: f, setting: value, ...}}``: that
    selector makes each draw with probability ``f``. The fractions sum to at most 1; the rest goes
    to ``replay_sampler``. Fractions of 0 (the shipped entries) switch a selector off but still have
    their settings checked. With nothing claimed the sampler is ``replay_sampler``'s own function,
    so the draws are bit-identical to a run without mixture.

Resume: a selector holds no random state and no history, only caches derived from its settings.
Every draw comes from ``rng`` (the replay's generator, saved by `Replay.get_state` into the
checkpoint) and from the windows; the settings come from the run's stored config.yaml. So a
resumed run rebuilds the same selector and continues the stream exactly. (That is why `Mixture`
draws from the replay's generator, not from one of its own as DreamerV3's does.) A selector with
state of its own, such as learned priorities, would have to add it to `Replay.get_state`.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dreamer_tf.data.sampler import SAMPLERS, Sampler, Windows, check_draw

__all__ = ["SELECTORS", "selector", "names", "make", "Mixture", "build", "from_config"]

# name -> class (or factory) taking the selector's settings as keywords.
SELECTORS: dict[str, Callable[..., Sampler]] = {}


def selector(name: str) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Class decorator: make a selector with settings available by `name` (`make`, the config)."""
    def add(cls: Callable[..., Sampler]) -> Callable[..., Sampler]:
        SELECTORS[name] = cls
        return cls
    return add


def names() -> list[str]:
    """Every name a config may use: selectors with settings and plain samplers."""
    return sorted(set(SELECTORS) | set(SAMPLERS))


def _settings(factory: Callable[..., Sampler]) -> list[str]:
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(factory).parameters.values() if p.kind in kinds]


def make(name: str, **settings: Any) -> Sampler:
    """The selector registered as `name`, made with `settings`; a plain sampler takes none."""
    if name in SELECTORS:
        allowed = _settings(SELECTORS[name])
        unknown = sorted(set(settings) - set(allowed))
        if unknown:
            raise ValueError(f"selector {name!r} has no setting {unknown[0]!r} (its settings: "
                             f"{', '.join(allowed) or 'none'})")
        return SELECTORS[name](**settings)
    if name in SAMPLERS:
        if settings:
            raise ValueError(f"sampler {name!r} takes no settings, got {', '.join(sorted(settings))}")
        return SAMPLERS[name]
    raise ValueError(f"unknown selector {name!r}; registered: {', '.join(names())}")


class Mixture:
    """Each draw is made by one of `parts`, chosen with probability its fraction, independently per
    draw (as DreamerV3's ``Mixture``): P(window) = sum_i fraction_i * P_i(window).

    Args:
      parts: (fraction, sampler) pairs; fractions >= 0 summing to 1. Parts of fraction 0 are
        dropped. Their order is part of the stream (`build` sorts them by name).
    """

    def __init__(self, parts: Sequence[tuple[float, Sampler]]):
        fractions = np.array([fraction for fraction, _ in parts], np.float64)
        if not len(parts) or not np.all(np.isfinite(fractions)) or np.any(fractions < 0) \
                or abs(fractions.sum() - 1) > 1e-6:
            raise ValueError(f"Mixture fractions must be >= 0 and sum to 1, got {fractions.tolist()}")
        kept = [(float(f), s) for f, s in parts if f > 0]
        self.fractions = np.array([f for f, _ in kept]) / sum(f for f, _ in kept)
        self.samplers = [s for _, s in kept]
        # Replay's repr names its sampler by __name__, like a function.
        self.__name__ = "mixture(" + ", ".join(
            f"{f:g} {getattr(s, '__name__', s)}" for f, s in zip(self.fractions, self.samplers)) + ")"

    def __call__(self, windows: Windows, batch_size: int, rng: np.random.Generator):
        if len(self.samplers) == 1:  # no draw of the part: the same stream as the sampler alone
            return self.samplers[0](windows, batch_size, rng)
        which = rng.choice(len(self.samplers), size=batch_size, p=self.fractions)
        episodes, starts = np.empty(batch_size, np.int64), np.empty(batch_size, np.int64)
        for i, sampler in enumerate(self.samplers):
            chosen = np.flatnonzero(which == i)
            if len(chosen):
                episodes[chosen], starts[chosen] = check_draw(
                    windows, len(chosen), *sampler(windows, len(chosen), rng))
        return episodes, starts


def _part(name: str, value: Any) -> tuple[float, dict]:
    """(fraction, settings) of one `replay_mixture` entry: a fraction, or a mapping with one."""
    settings = dict(value) if isinstance(value, Mapping) else {"fraction": value}
    fraction = settings.pop("fraction", None)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction) \
            or not 0 <= fraction <= 1:
        raise ValueError(f"{name}: expected a fraction in [0, 1] or {{fraction: f, <settings>}}, got {value!r}")
    return float(fraction), settings


def build(sampler: str, mixture: Mapping[str, Any] | None = None) -> Sampler:
    """The sampler of `replay_sampler` and `replay_mixture` (see the module doc); `ValueError`
    with one line naming the bad entry. Entries are taken in name order, so the stream does not
    depend on the mapping's order."""
    parts = [(0.0, "", make(sampler))]
    try:
        for name in sorted(mixture or {}, key=str):
            fraction, settings = _part(name, mixture[name])
            try:
                parts.append((fraction, name, make(name, **settings)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: {e}") from None
        claimed = sum(fraction for fraction, _, _ in parts)
        if claimed > 1 + 1e-9:
            raise ValueError(f"the fractions sum to {claimed:g}, more than 1")
    except ValueError as e:
        raise ValueError(f"replay_mixture: {e}") from None
    parts[0] = (max(0.0, 1 - claimed), sampler, parts[0][2])
    used = [(fraction, made) for fraction, _, made in parts if fraction > 1e-9]
    return used[0][1] if len(used) == 1 else Mixture(used)


def from_config(config: Mapping[str, Any]) -> Sampler:
    """The replay's sampler for a run's config (`replay_sampler`, `replay_mixture`)."""
    return build(config["replay_sampler"], config.get("replay_mixture"))


@selector("recency")
class Recency:
    """DreamerV3's recency selector: the window of age a (0 = the newest, by `Windows.at`'s numbering)
    is drawn with probability (1 + a)^-exponent / sum over the W stored windows of (1 + k)^-exponent."""

    def __init__(self, exponent: float = 1.0):
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not math.isfinite(exponent) \
                or exponent < 0:
            raise ValueError(f"recency exponent must be a finite number >= 0, got {exponent!r}")
        self.exponent = float(exponent)
        self.__name__ = f"recency(exponent={self.exponent:g})"
        self._cdf = np.zeros(0)  # running sums of the weights by age; its first W serve W windows

    def __call__(self, windows: Windows, batch_size: int, rng: np.random.Generator):
        total = windows.total
        if len(self._cdf) < total:  # grown by doubling, not recomputed for every batch
            ranks = np.arange(1, max(total, 2 * len(self._cdf)) + 1, dtype=np.float64)
            self._cdf = np.cumsum(ranks ** -self.exponent)
        cdf = self._cdf[:total]
        ages = np.searchsorted(cdf, rng.random(batch_size) * cdf[-1], side="right")  # u < 1: u * c < c
        return windows.at(total - 1 - ages)
