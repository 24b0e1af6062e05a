"""Task names, option validation and in-process construction.

Validation runs in the parent process (cheap, imports neither dm_control nor TensorFlow), so bad
names and option values fail fast with a ValueError before any worker process starts. Gym ids are
checked here too (importing gymnasium is cheap), except ids registered by a `gym_import` module,
which only the worker imports.
"""
from __future__ import annotations

import numbers
import re
from typing import Any

__all__ = ["TASKS", "ATARI_FORM", "GYM_FORM", "DMC_DEFAULTS", "ATARI_DEFAULTS", "GYM_DEFAULTS",
           "parse_task", "resolve", "build_local"]

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
GYM_FORM = "gym_<EnvId>"

# dm_control domain names differ from the task prefix only for cup.
_DMC_DOMAINS = {"cup": "ball_in_cup"}
_DMC_DOMAIN_NAMES = ("acrobot", "cartpole", "cheetah", "cup", "finger", "hopper", "pendulum",
                     "quadruped", "reacher", "walker")

# Defaults when make() is given action_repeat/time_limit=None: the paper's per-suite settings.
DMC_DEFAULTS = {"action_repeat": 2, "time_limit": 1000}
ATARI_DEFAULTS = {"action_repeat": 4, "time_limit": 108000}  # 27,000 decisions x 4 frames
GYM_DEFAULTS = {"action_repeat": 1, "time_limit": None}  # None: the env's own TimeLimit

# Suite-specific **options and their defaults.
_DMC_OPTIONS = {"msaa": True, "camera": None, "video": False}
_ATARI_OPTIONS = {"repeat_action_probability": 0.25, "terminal_on_life_loss": False, "noops": 0}
_GYM_OPTIONS = {"gym_import": None, "video": False}
_SUITE_OPTIONS = {"dmc": _DMC_OPTIONS, "atari": _ATARI_OPTIONS, "gym": _GYM_OPTIONS}
_SUITE_DEFAULTS = {"dmc": DMC_DEFAULTS, "atari": ATARI_DEFAULTS, "gym": GYM_DEFAULTS}
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATARI_ALIASES = {"james_bond": "jamesbond"}


def _valid_names() -> str:
    return (", ".join(TASKS) + f", {ATARI_FORM} (an ALE game, e.g. atari_pong, atari_boxing), "
            f"or {GYM_FORM} (a gymnasium id, e.g. gym_Pendulum-v1)")


def _atari_games() -> list[str]:
    try:
        import ale_py.roms
    except ImportError as e:  # a clear message instead of a bare ModuleNotFoundError
        raise ValueError("Atari tasks need ale-py: pip install 'ale-py==0.12.1' "
                         "(or the dreamer_tf[atari] extra)") from e
    return list(ale_py.roms.get_all_rom_ids())


def parse_task(task: Any) -> tuple[str, str, str]:
    """`dmc_walker_walk` -> ("dmc", "walker", "walk"); `atari_pong` -> ("atari", "pong", "");
    `gym_Pendulum-v1` -> ("gym", "Pendulum-v1", "").

    Raises ValueError listing the valid names. Gym ids are only checked for form here (they may
    be registered by a `gym_import` module); `resolve` checks them against the registry.
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
    if task.startswith("gym_") and len(task) > len("gym_"):
        env_id = task[len("gym_"):]
        if env_id != env_id.strip() or any(c.isspace() for c in env_id):
            raise ValueError(f"gymnasium id {env_id!r} in task {task!r} contains whitespace")
        return "gym", env_id, ""
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


def _gym_import(value: Any) -> tuple[str, ...]:
    """`gym_import`: None, a module name, or comma-separated names -> a tuple of names."""
    if value is None:
        return ()
    if not isinstance(value, str):
        raise ValueError(f"gym_import must be a module name or comma-separated module names, "
                         f"got {value!r}")
    names = tuple(n.strip() for n in value.split(","))
    bad = [n for n in names if not _MODULE_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"gym_import must be a module name or comma-separated module names, "
                         f"got {value!r} (bad name {bad[0]!r})")
    return names


def resolve(task: str, seed: int = 0, *, action_repeat: int | None = None,
            time_limit: int | None = None, size: int = 64, proprio: bool = False,
            pixels: bool = True, shadow_size: int | None = 256,
            **options: Any) -> dict[str, Any]:
    """Validates make() arguments and returns the full keyword set for `build_local`."""
    suite, name, subtask = parse_task(task)
    defaults = _SUITE_DEFAULTS[suite]
    spec: dict[str, Any] = {
        "task": task,
        "seed": _int("seed", seed, 0),
        "action_repeat": _int("action_repeat", action_repeat, 1, none_ok=True)
        or defaults["action_repeat"],
        "time_limit": _int("time_limit", time_limit, 1, none_ok=True) or defaults["time_limit"],
        "size": _int("size", size, 1),
        "proprio": _bool("proprio", proprio),
    }
    pixels = _bool("pixels", pixels)
    if spec["seed"] >= 2 ** 31:
        raise ValueError(f"seed must be < 2**31, got {seed!r}")
    allowed = _SUITE_OPTIONS[suite]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {task!r}; {suite} options are "
                         f"{sorted(allowed)} (plus action_repeat, time_limit, size, proprio"
                         f"{', pixels' if suite != 'atari' else ''}"
                         f"{', shadow_size' if suite == 'dmc' else ''})")
    opts = {**allowed, **options}
    if suite != "atari":
        if not pixels and not spec["proprio"]:
            raise ValueError(f"pixels=False needs proprio=True for {task!r}: with both False "
                             "the environment would observe nothing")
        spec["pixels"] = pixels
        spec["video"] = _bool("video", opts["video"])
    if suite == "dmc":
        spec["shadow_size"] = _int("shadow_size", shadow_size, 0, none_ok=True)
        spec["msaa"] = _bool("msaa", opts["msaa"])
        spec["camera"] = _int("camera", opts["camera"], 0, none_ok=True)
        spec["domain"], spec["subtask"] = name, subtask
    elif suite == "gym":
        from .gym import check_registered
        spec["gym_import"] = _gym_import(opts["gym_import"])
        # Ids registered by a gym_import module are checked in the worker, which imports it.
        check_registered(task, name, check_id=not spec["gym_import"])
        spec["env_id"] = name
    else:
        if not pixels:
            raise ValueError(f"pixels=False is not available for Atari tasks ({task!r})")
        if proprio:
            raise ValueError(f"proprio=True is only available for DMC and gym tasks, not {task!r}")
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
    if suite == "gym":
        from .gym import Gym
        return Gym(**spec)
    from .atari import Atari
    return Atari(**spec)
