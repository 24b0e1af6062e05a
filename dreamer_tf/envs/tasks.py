"""Task names, option validation and in-process construction.

Validation runs in the parent process (cheap, imports neither dm_control nor TensorFlow), so bad
names and option values fail fast with a ValueError before any worker process starts.
"""
from __future__ import annotations

import numbers
from typing import Any

__all__ = ["TASKS", "ATARI_FORM", "DMC_DEFAULTS", "ATARI_DEFAULTS", "resolve", "build_local"]

# The paper's 20 DeepMind Control tasks (Figure 8 / Appendix), as dmc_<domain>_<task>.
TASKS: tuple[str, ...] = (
    "dmc_acrobot_swingup",
    "dmc_cartpole_balance", "dmc_cartpole_balance_sparse",
    "dmc_cartpole_swingup", "dmc_cartpole_swingup_sparse",
    "dmc_cheetah_run",
    "dmc_cup_catch",
    "dmc_finger_spin", "dmc_finger_turn_easy", "dmc_finger_turn_hard",
    "dmc_hopper_hop", "dmc_hopper_stand",
    "dmc_pendulum_swingup",
    "dmc_quadruped_walk", "dmc_quadruped_run",
    "dmc_reacher_easy", "dmc_reacher_hard",
    "dmc_walker_stand", "dmc_walker_walk", "dmc_walker_run",
)
ATARI_FORM = "atari_<game>"

# dm_control domain names differ from the task prefix only for cup.
_DMC_DOMAINS = {"cup": "ball_in_cup"}
_DMC_DOMAIN_NAMES = ("acrobot", "cartpole", "cheetah", "cup", "finger", "hopper", "pendulum",
                     "quadruped", "reacher", "walker")

# Defaults when make() is given action_repeat/time_limit=None: the paper's per-suite settings.
DMC_DEFAULTS = {"action_repeat": 2, "time_limit": 1000}
ATARI_DEFAULTS = {"action_repeat": 4, "time_limit": 108000}  # 27,000 decisions x 4 frames

# Suite-specific **options and their defaults.
_DMC_OPTIONS = {"msaa": True, "camera": None}
_ATARI_OPTIONS = {"repeat_action_probability": 0.25, "terminal_on_life_loss": False, "noops": 0}
_ATARI_ALIASES = {"james_bond": "jamesbond"}


def _valid_names() -> str:
    return ", ".join(TASKS) + f", or {ATARI_FORM} (an ALE game, e.g. atari_pong, atari_boxing)"


def _atari_games() -> list[str]:
    try:
        import ale_py.roms
    except ImportError as e:  # a clear message instead of a bare ModuleNotFoundError
        raise ValueError("Atari tasks need ale-py: pip install 'ale-py==0.12.1' "
                         "(or the dreamer_tf[atari] extra)") from e
    return list(ale_py.roms.get_all_rom_ids())


def parse_task(task: Any) -> tuple[str, str, str]:
    """`dmc_walker_walk` -> ("dmc", "walker", "walk"); `atari_pong` -> ("atari", "pong", "").

    Raises ValueError listing the valid names.
    """
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {task!r}; valid tasks: {_valid_names()}")
    if task in TASKS:
        rest = task[len("dmc_"):]
        domain = next(d for d in _DMC_DOMAIN_NAMES if rest.startswith(d + "_"))
        return "dmc", _DMC_DOMAINS.get(domain, domain), rest[len(domain) + 1:]
    if task.startswith("atari_") and len(task) > len("atari_"):
        game = task[len("atari_"):]
        game = _ATARI_ALIASES.get(game, game)
        games = _atari_games()
        if game not in games:
            raise ValueError(f"unknown Atari game {game!r} in task {task!r}; ale-py has: "
                             f"{', '.join(games)}")
        return "atari", game, ""
    raise ValueError(f"unknown task {task!r}; valid tasks: {_valid_names()}")


def _int(name: str, value: Any, low: int, *, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def resolve(task: str, seed: int = 0, *, action_repeat: int | None = None,
            time_limit: int | None = None, size: int = 64, proprio: bool = False,
            shadow_size: int | None = 256, **options: Any) -> dict[str, Any]:
    """Validates make() arguments and returns the full keyword set for `build_local`."""
    suite, name, subtask = parse_task(task)
    defaults = DMC_DEFAULTS if suite == "dmc" else ATARI_DEFAULTS
    spec: dict[str, Any] = {
        "task": task,
        "seed": _int("seed", seed, 0),
        "action_repeat": _int("action_repeat", action_repeat, 1, none_ok=True)
        or defaults["action_repeat"],
        "time_limit": _int("time_limit", time_limit, 1, none_ok=True) or defaults["time_limit"],
        "size": _int("size", size, 1),
        "proprio": _bool("proprio", proprio),
    }
    if spec["seed"] >= 2 ** 31:
        raise ValueError(f"seed must be < 2**31, got {seed!r}")
    allowed = _DMC_OPTIONS if suite == "dmc" else _ATARI_OPTIONS
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {task!r}; {suite} options are "
                         f"{sorted(allowed)} (plus action_repeat, time_limit, size, proprio"
                         f"{', shadow_size' if suite == 'dmc' else ''})")
    opts = {**allowed, **options}
    if suite == "dmc":
        spec["shadow_size"] = _int("shadow_size", shadow_size, 0, none_ok=True)
        spec["msaa"] = _bool("msaa", opts["msaa"])
        spec["camera"] = _int("camera", opts["camera"], 0, none_ok=True)
        spec["domain"], spec["subtask"] = name, subtask
    else:
        if proprio:
            raise ValueError(f"proprio=True is only available for DMC tasks, not {task!r}")
        p = opts["repeat_action_probability"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
            raise ValueError(f"repeat_action_probability must be a number in [0, 1], got {p!r}")
        spec["repeat_action_probability"] = float(p)
        spec["terminal_on_life_loss"] = _bool("terminal_on_life_loss",
                                              opts["terminal_on_life_loss"])
        spec["noops"] = _int("noops", opts["noops"], 0)
        spec["game"] = name
    spec["suite"] = suite
    return spec


def build_local(spec: dict[str, Any]):
    """Builds the environment described by a `resolve()` dict in this process."""
    spec = dict(spec)
    suite = spec.pop("suite")
    if suite == "dmc":
        from .dmc import DMC
        return DMC(**spec)
    from .atari import Atari
    return Atari(**spec)
