"""The one config loader: nested typed dataclasses from YAML or a mapping, with ``--set`` overrides.

Every job's config (``TrainConfig``, ``DistillConfig``, ``InferConfig``, ``IngestConfig``) is a
dataclass whose sections are dataclasses; each validates its own values in ``__post_init__``
(raising :class:`ConfigError` that names the dotted key). This module only checks *types* and
*keys* while building, so a wrong type or an unknown key gets the same one-line message in
every job. Section checks name keys from their job's root (``optim.base_lr``); a job config
(class attribute ``CONFIG_ROOT = True``) embedded in another gets its errors prefixed
(``train.optim.base_lr``)::

    cfg = load(TrainConfig, "configs/shapes-cpu.yaml", ["optim.base_lr=0.01"])
    cfg = build(InferConfig, {"input": "s3://b/in", "output": "out"}, source="--set")

Overrides are ``a.b=value`` with the value parsed by ``yaml.safe_load`` (``--set
schedule.steps=[100,200]`` is a list). A job's provenance is :func:`to_dict` of its config.

Which settings change a run's *results* is declared on the fields themselves: a field made with
``field(..., metadata=RUN_ONLY)`` (logging, cadence, retries, placement, worker counts) may differ
when a run is resumed; :func:`run_only_keys` collects them (dotted, sections recursed), and
:mod:`pipeline.runrecord` ignores exactly those when it compares a rerun with its record.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from collections.abc import Iterable
from typing import Any

from model.errors import MaskrayError

RUN_ONLY = {"result": False}  # field metadata: this setting does not change what a run computes


def option(default: Any, help: str, *, result: bool = True, flag: str | None = None) -> Any:
    """A config field that is also a command-line flag (``jobs.cli.add_config_arguments``).

    ``help`` is the flag's help text; ``flag`` its name when not ``--field-name``; ``result=False``
    marks it run-only (:data:`RUN_ONLY`). Mutable defaults (lists, dicts) are copied per instance.
    """
    meta = {"help": help, "flag": flag, **({} if result else RUN_ONLY)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class ConfigError(MaskrayError):
    """An invalid configuration; the one-line message names the source and the dotted key at fault."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("key: message")`` unless ``ok`` (for ``__post_init__`` checks)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


MIN_TILE = 32  # px: the smallest tile side of tiled inference and evaluation
MAX_TILE_OVERLAP = 0.9  # the largest fraction of a tile its neighbour may overlap


def require_tiling(tile: int, overlap: float, full_pass: bool, *, prefix: str = "",
                   enable: str = "--tile SIZE") -> None:
    """The one rule for the tiling options wherever they are set (``InferConfig``, ``maskray eval``,
    the train config's ``eval`` section): ``tile`` 0 (off) or >= :data:`MIN_TILE` px,
    ``overlap`` in [0, :data:`MAX_TILE_OVERLAP`], ``full_pass`` only with a tile. Errors name
    ``{prefix}tile`` / ``{prefix}tile_overlap`` / ``{prefix}tile_full_pass``; ``enable`` says
    how tiling is turned on."""
    require(tile == 0 or tile >= MIN_TILE, f"{prefix}tile", f"must be 0 (off) or >= {MIN_TILE} px, got {tile}")
    require(0.0 <= overlap <= MAX_TILE_OVERLAP, f"{prefix}tile_overlap",
            f"must be in [0, {MAX_TILE_OVERLAP}], got {overlap}")
    require(tile > 0 or not full_pass, f"{prefix}tile_full_pass", f"needs {enable}")


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mapping"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (ints accepted for floats, never bools for numbers)."""
    def wrong() -> ConfigError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {shown}")

    if dataclasses.is_dataclass(tp):
        if getattr(tp, "CONFIG_ROOT", False):
            # a whole job's config inside another (a distill config's `train`): its checks name
            # keys from its own root, so its errors are prefixed with where it sits here
            try:
                return _build(tp, value, "")
            except ConfigError as exc:
                text = str(exc)
                if text.startswith("unknown key "):
                    raise ConfigError(f"unknown key {key}.{text[len('unknown key '):]}") from None
                raise ConfigError(f"{key}.{text}") from None
        return _build(tp, value, key + ".")
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise wrong()
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise wrong()
        args = typing.get_args(tp)
        item = args[0] if args else Any
        out = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise wrong()
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong()
        return value
    if tp is type(None):
        if value is not None:
            raise wrong()
        return None
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a bug in a config class, not in the file


def _build(cls: type, data: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "the config"
    if data is None and prefix:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s} (known keys{' in ' + section if prefix else ''}: {', '.join(fields)})"
        )
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in list(missing):
        if dataclasses.is_dataclass(hints[name]):  # a missing section: its own checks name the key
            kwargs[name] = _build(hints[name], {}, prefix + name + ".")
            missing.remove(name)
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required section/key is missing")
    return cls(**kwargs)


def build(cls: type, data: Any, *, source: str = "config") -> Any:
    """``cls`` built from a plain mapping; a ConfigError names ``source`` and the dotted key."""
    try:
        return _build(cls, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- files and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], yaml.safe_load("value"))."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.base_lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {first}") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with each ``a.b=value`` override set (sections created when absent)."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str, overrides: Iterable[str] | None = None) -> dict[str, Any]:
    """A YAML config file (local path or URI) as a mapping, with ``--set`` overrides applied."""
    import yaml

    try:
        if "://" in path:
            from pipeline import storage

            text = storage.read_bytes(path).decode("utf-8")
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    except MaskrayError as exc:  # storage errors (missing object, credentials)
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = " ".join(str(exc).split())
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    overrides = list(overrides or ())
    return apply_overrides(data, overrides) if overrides else data


def load(cls: type, path: str | None, overrides: Iterable[str] | None = None, *,
         base: dict[str, Any] | None = None) -> Any:
    """``cls`` from the YAML file ``path`` (or ``base`` when ``path`` is None), ``--set`` overrides applied.

    ``base`` are values set before the file (e.g. a job's CLI flags), the file's values win over them
    and ``overrides`` win over both.
    """
    overrides = list(overrides or ())
    data = copy.deepcopy(base or {})
    if path:
        data = _merge(data, read_yaml(path))
    data = apply_overrides(data, overrides) if overrides else data
    source = path or "the command line"
    return build(cls, data, source=f"{source} (with --set)" if overrides and path else source)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


# --------------------------------------------------------------------------- records


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (``dataclasses.asdict``): the run's provenance."""
    return dataclasses.asdict(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dicts flattened; lists and scalars are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def field_defaults(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default value of every field of ``cls`` that has one (sections recursed), as
    JSON data (what a record read back holds): what a key missing from an older record meant."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        if dataclasses.is_dataclass(value):
            out.update(field_defaults(type(value), f"{prefix}{f.name}."))
        else:
            out.update(flatten({f"{prefix}{f.name}": json.loads(json.dumps(value))}))
    return out


def run_only_keys(cls: type, prefix: str = "") -> tuple[str, ...]:
    """Dotted keys of ``cls`` (sections recursed) whose fields carry :data:`RUN_ONLY`: the settings
    a resumed run may change without changing what it computes."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("result", True) is False:
            keys.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            keys.extend(run_only_keys(hints[f.name], f"{prefix}{f.name}."))
    return tuple(keys)
