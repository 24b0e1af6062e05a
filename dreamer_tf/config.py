"""Typed hyperparameter configs: `configs/dreamer.yaml` defaults, named presets and overrides.

Every key is typed by its default in the YAML file. Overrides (a dict, or `key=value` strings
from the command line parsed as YAML scalars) must match that type; unknown keys, wrong types
and out-of-range values raise `ConfigError` naming the key, the value and what is allowed.
List keys (`loggers`) take a YAML list or comma-separated words (`[jsonl,mlflow]`, `jsonl,mlflow`),
each checked against `_range`; the config holds them as tuples (read-only) and saves them as lists.

Groups: a key whose default is a mapping (`world_model: {free_nats: 3.0, ...}`) holds the settings
of one loss, passed whole to it (`**config.world_model`); `--set world_model.free_nats=2` addresses
one of them. Key metadata lives in the YAML's `_meta` table, beside the keys: bounds (`min`, `max`,
`above`), `added` (runs written before the key lack it and take its default) and `was` (the key's
old flat name, still accepted in stored configs, overrides and reads). Adding a key changes this
module not at all (docs/configuration.md).
"""
from __future__ import annotations

import difflib
import io
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ruamel.yaml import YAML

__all__ = ["Config", "ConfigError", "load", "presets", "parse_overrides", "save", "load_file", "diff",
           "current_names"]


class ConfigError(ValueError):
    """A config key, value or preset that is not allowed."""


def _yaml_path() -> Path:
    candidates = [
        Path(__file__).resolve().parent.parent / "configs" / "dreamer.yaml",  # source / editable
        Path(sys.prefix) / "share" / "dreamer_tf" / "configs" / "dreamer.yaml",  # installed wheel
    ]
    for path in candidates:
        if path.exists():
            return path
    raise FileNotFoundError(f"dreamer.yaml not found in any of {[str(p) for p in candidates]}")


def _read_spec() -> dict:
    with open(_yaml_path()) as f:
        return YAML(typ="safe").load(f)


def _meta(spec: Mapping[str, Any] | None = None) -> dict:
    """{key: metadata} from the YAML's `_meta` table (group keys as `group.key`)."""
    return dict((spec or _read_spec()).get("_meta") or {})


def _aliases(spec: Mapping[str, Any] | None = None) -> dict[str, str]:
    """{old flat name: `group.key`} of keys moved into a group (`was` in `_meta`)."""
    return {m["was"]: k for k, m in _meta(spec).items() if isinstance(m, dict) and "was" in m}


def _mappings(spec: Mapping[str, Any] | None = None) -> frozenset[str]:
    """Keys whose value is one free-form mapping that its reader checks (`mapping: true` in `_meta`,
    e.g. replay_mixture), not a group of typed keys."""
    return frozenset(k for k, m in _meta(spec).items() if isinstance(m, dict) and m.get("mapping"))


def _flat(values: Mapping[str, Any]) -> dict:
    """Groups spelled out: {"world_model.free_nats": 3.0, ...} beside the plain keys."""
    out, mappings = {}, _mappings()
    for key, value in values.items():
        if isinstance(value, Mapping) and key not in mappings:
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class Config(Mapping):
    """Read-only mapping of hyperparameters with attribute access (`config.batch_size`)."""

    def __init__(self, values: Mapping[str, Any]):
        object.__setattr__(self, "_values", {
            k: tuple(v) if isinstance(v, list) else Config(v) if isinstance(v, Mapping) else v
            for k, v in values.items()})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # copy/pickle probe before _values exists
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only; use config.replace(key=value)")

    def __getitem__(self, key: str) -> Any:
        """A key, a group's key as `group.key`, or a moved key by its old flat name (`was`)."""
        if key in self._values:
            return self._values[key]
        group, dot, sub = _aliases().get(key, key).partition(".")
        if dot and isinstance(self._values.get(group), Config):
            return self._values[group][sub]
        raise KeyError(key)

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"

    def replace(self, **overrides: Any) -> "Config":
        """A copy with `overrides` applied (validated like any override)."""
        return Config(_apply(dict(self._values), overrides, _read_spec()))

    def to_dict(self) -> dict:
        """Plain values (lists for list keys, dicts for groups), as saved to config.yaml."""
        return {k: list(v) if isinstance(v, tuple) else v.to_dict() if isinstance(v, Config) else v
                for k, v in self._values.items()}


def presets() -> list[str]:
    return list(_read_spec()["presets"])


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", tuple: "list", dict: "group"}.get(
        type(value), type(value).__name__)


def _a(word: str) -> str:
    """`word` with its indefinite article: "an int", "a float"."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _word_or_mib(key: str, value: Any, spec: dict) -> str | int:
    """`gpu_memory: growth` or `gpu_memory: 8192` (MiB); anything else is one ConfigError line."""
    if type(value) is float and value.is_integer():
        value = int(value)
    if (type(value) is int and value > 0) or value in spec["_range"][key]:
        return value
    raise ConfigError(f"config key {key!r}: value {value!r} is not one of {spec['_range'][key]} "
                      f"or a positive whole number of MiB")


def _coerce(key: str, value: Any, default: Any, allowed: Sequence[Any] = ()) -> Any:
    """Check `value` against the type of `default`; ints are accepted for floats, and a word that the
    key's `_range` lists whatever the default's type (`precision: bf16` beside 16 and 32)."""
    expected = type(default)
    if isinstance(value, str) and value in allowed and expected in (int, float):
        return value
    if expected in (list, tuple):
        return _coerce_list(key, value, default)
    if expected is float and type(value) is int:
        value = float(value)
    elif expected is int and type(value) is float and value.is_integer():
        value = int(value)  # `steps=1e6` on the command line
    if type(value) is not expected and any(type(a) is not expected for a in allowed):
        raise ConfigError(f"config key {key!r}: value {value!r} is not one of {list(allowed)}")
    if type(value) is not expected:
        raise ConfigError(
            f"config key {key!r}: value {value!r} is {_a(_type_name(value))}, expected "
            f"{_a(_type_name(default))} (default {default!r})")
    return value


def _coerce_list(key: str, value: Any, default: Any) -> tuple:
    """A list key: a list, or comma-separated words; items typed like the default's (str if empty);
    repeated items are dropped."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") != text.endswith("]") or text.count("[") > 1 or text.count("]") > 1:
            raise ConfigError(f"config key {key!r}: value {value!r} has unbalanced brackets, expected a list "
                              f"such as [{','.join(map(str, default))}] or {','.join(map(str, default))}")
        value = [v.strip() for v in text.removeprefix("[").removesuffix("]").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key {key!r}: value {value!r} is {_a(_type_name(value))}, expected a list "
                          f"such as [{','.join(map(str, default))}] (default {list(default)!r})")
    item_type = type(default[0]) if len(default) else str
    for item in value:
        if type(item) is not item_type:
            raise ConfigError(f"config key {key!r}: item {item!r} is {_a(_type_name(item))}, expected "
                              f"{_a(_type_name(item_type()))}")
    return tuple(dict.fromkeys(value))


def _check_range(key: str, value: Any, spec: dict) -> None:
    allowed = spec.get("_range", {}).get(key)
    if allowed is not None and isinstance(value, tuple):
        for item in value:
            if item not in allowed:
                raise ConfigError(f"config key {key!r}: item {item!r} is not one of {allowed}")
    elif allowed is not None and value not in allowed:
        raise ConfigError(f"config key {key!r}: value {value!r} is not one of {allowed}")
    meta = _meta(spec).get(key) or {}
    rules = [(op, meta[name]) for name, op in (("above", ">"), ("min", ">="), ("max", "<=")) if name in meta]
    broken = {">": lambda v, b: v <= b, ">=": lambda v, b: v < b, "<=": lambda v, b: v > b}
    if any(broken[op](value, bound) for op, bound in rules):
        rule = " and ".join(f"{op} {bound}" for op, bound in rules)
        raise ConfigError(f"config key {key!r}: value {value!r} is out of range (must be {rule})")


# Keys renamed since run directories were first written: old key -> (new key, old value -> new value).
RENAMED = {"dataset_balance": ("replay_sampler", {False: "uniform", True: "episode"})}


def _renamed(overrides: Mapping[str, Any], spec: Mapping[str, Any] | None = None) -> dict:
    """`overrides` with renamed keys under their new names (a stored config.yaml, an old --set):
    RENAMED below, and keys moved into a group (`was` in `_meta`)."""
    out = dict(overrides)
    for old, new in _aliases(spec).items():
        if old in out:
            out.setdefault(new, out.pop(old))
    for old, (new, mapping) in RENAMED.items():
        if old in out:
            value = out.pop(old)
            if value not in mapping:
                raise ConfigError(f"config key {old!r} (now {new!r}): value {value!r} is not one of {list(mapping)}")
            out.setdefault(new, mapping[value])
    return out


def _unknown(key: str, defaults: Mapping[str, Any], spec: Mapping[str, Any]) -> ConfigError:
    aliases = _aliases(spec)
    known = list(dict.fromkeys([*_flat(defaults), *defaults, *aliases]))
    close = list(dict.fromkeys(aliases.get(k, k) for k in difflib.get_close_matches(key, known, n=3, cutoff=0.6)))
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (docs/configuration.md lists the keys)")


def _set(values: dict, key: str, value: Any, spec: dict) -> None:
    """Check one plain key (`steps`) or group key (`world_model.free_nats`) and store it in `values`."""
    defaults = spec["defaults"]
    group, dot, sub = key.partition(".")
    if dot:
        if not isinstance(defaults.get(group), dict) or sub not in defaults[group]:
            raise _unknown(key, defaults, spec)
        default = defaults[group][sub]
    elif key not in defaults:
        raise _unknown(key, defaults, spec)
    else:
        default = defaults[key]
    if not dot and key in _mappings(spec):  # one value, checked by its reader (cli checks it before a run)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: value {value!r} is {_a(_type_name(value))}, expected a dict")
        values[key] = dict(value)
        return
    if isinstance(default, dict):  # a whole group, as a stored config.yaml holds it
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r}: value {value!r} is {_a(_type_name(value))}, expected a group "
                              f"of keys {sorted(default)} (set one as {key}.{next(iter(default), 'key')}=...)")
        for k, v in value.items():
            _set(values, f"{key}.{k}", v, spec)
        return
    if (_meta(spec).get(key) or {}).get("mib"):  # a word of `_range` or a positive whole number of MiB
        value = _word_or_mib(key, value, spec)
    else:
        value = _coerce(key, value, default, spec.get("_range", {}).get(key) or ())
        _check_range(key, value, spec)
    if dot:
        values[group] = {**values[group], sub: value}  # never the defaults' own dict
    else:
        values[key] = value


def _apply(values: dict, overrides: Mapping[str, Any], spec: dict) -> dict:
    for key, value in _renamed(overrides, spec).items():
        _set(values, key, value, spec)
    return values


def parse_overrides(items: Iterable[str]) -> dict:
    """Parse command-line `key=value` strings; values are YAML scalars (`3`, `1e-4`, `true`)."""
    result = {}
    yaml = YAML(typ="safe")
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.load(raw) if raw.strip() else ""
        except Exception:
            value = raw
        if isinstance(value, str) and _looks_numeric(raw):
            value = float(raw)  # YAML 1.2 reads `1e-4` as a string; users mean a number
        result[key] = value
    return result


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# Defaults that depend on the task's suite, applied where neither the preset nor the user sets the
# key. Gymnasium envs are not the paper's DMC tasks: no action repeat unless asked for (Atari's
# settings are a whole preset, `atari`).
TASK_DEFAULTS = {"gym_": {"action_repeat": 1}}


def _task_defaults(values: dict, *explicit: Mapping[str, Any]) -> None:
    for prefix, defaults in TASK_DEFAULTS.items():
        if str(values["task"]).startswith(prefix):
            values.update({k: v for k, v in defaults.items() if not any(k in e for e in explicit)})


def load(preset: str = "paper", overrides: Mapping[str, Any] | None = None) -> Config:
    """The resolved config: YAML defaults, then the preset, then `overrides`; then the task's suite
    defaults (TASK_DEFAULTS) for keys neither the preset nor `overrides` set."""
    spec = _read_spec()
    if preset not in spec["presets"]:
        raise ConfigError(f"unknown preset {preset!r} (known presets: {', '.join(spec['presets'])})")
    values = dict(spec["defaults"])
    preset_values, overrides = spec["presets"][preset] or {}, _renamed(overrides or {})
    _apply(values, preset_values, spec)
    _apply(values, overrides, spec)
    _task_defaults(values, preset_values, overrides)
    return Config(values)


def save(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    buffer = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.dump(config.to_dict(), buffer)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    os.replace(tmp, path)


def added_keys(spec: Mapping[str, Any] | None = None) -> frozenset[str]:
    """Keys added to configs/dreamer.yaml after the first run directories were written (`added` in
    `_meta`); their defaults are what those runs did, so an older config.yaml may lack them. Lacking
    any other key means the file was cut short or edited: filling in defaults would build another
    agent than the checkpoints hold (tests/test_config.py checks the marks against the oldest run)."""
    return frozenset(k for k, m in _meta(spec).items() if isinstance(m, dict) and m.get("added"))


ADDED_KEYS = added_keys()


def missing_keys(values: Mapping[str, Any]) -> list[str]:
    """Keys of the defaults (groups spelled out) that a stored config lacks and that existed when
    any run was written."""
    spec = _read_spec()
    present = _flat(_renamed(values, spec))
    added = added_keys(spec)
    return [k for k in _flat(spec["defaults"]) if k not in present and k not in added]


def load_file(path: str | os.PathLike, fill_missing: bool = False) -> Config:
    """Read a config written by `save`, validated against the current defaults. Keys added since the
    file was written take their defaults; other missing keys raise ConfigError naming the file and
    the keys, unless `fill_missing` (train's --force). Every error names the file."""
    path = Path(path)
    try:
        with open(path) as f:
            values = YAML(typ="safe").load(f)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} does not hold a mapping of keys to values")
    spec = _read_spec()
    try:
        missing = missing_keys(values)
        config = Config(_apply(dict(spec["defaults"]), values, spec))
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if missing and not fill_missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} keys)" if len(missing) > 8 else "")
        raise ConfigError(f"config file {path} lacks {shown}: cut short or edited? Restore it, or resume "
                          f"with `dreamer-tf train --logdir {path.parent} --force` to take the defaults")
    return config


def current_names(values: Mapping[str, Any]) -> dict:
    """A stored config of any version under today's names, groups spelled out (`world_model.free_nats`):
    an older run's flat `free_nats` or `dataset_balance` is read as `load_file` reads it, so runs of
    different versions compare key by key (the report's config section)."""
    try:
        return _flat(_renamed(values))
    except ConfigError:  # an old value with no new spelling: shown as stored
        return _flat(values)


def diff(a: Mapping[str, Any], b: Mapping[str, Any], ignore: Iterable[str] = ()) -> dict:
    """{key: (a_value, b_value)} for keys whose values differ (group keys as `group.key`)."""
    a, b = _flat(a), _flat(b)
    skip = set(ignore)
    keys = (set(a) | set(b)) - skip
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}
