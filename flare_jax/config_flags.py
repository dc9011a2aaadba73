"""Command-line flags, JSON and diffs generated from frozen config dataclasses.

A config is a frozen dataclass whose fields may themselves be dataclasses (e.g. a TrainConfig with
`sac: SACConfig` and `run: RunConfig`). Every leaf field is addressed by its own name (not a
dotted path), so leaf names must be unique across the nesting; `fields_flat` checks this.

- `define_flags(cfg)` defines one absl flag per leaf field with the value in `cfg` as its default
  (a preset instance gives preset defaults in `--helpfull`) and `metadata["help"]` as help text;
  `from_flags(cfg)` reads the flags back into a config. Fields with `metadata={"flag": False}`
  get no flag; `metadata["choices"]` turns a str field into an enum flag.
- `to_dict` / `from_dict` convert to and from JSON-ready nested dicts (`config.json`).
- `replace` is `dataclasses.replace` keyed by leaf name, rebuilding the nested dataclasses so
  their `__post_init__` validation runs.
- `diff` / `describe_diff` name the leaf fields in which two config dicts differ.

Supported flag types: bool, int, float, str, `X | None` of those, `tuple[int, ...]`,
`tuple[str, ...]` and keyword options `tuple[tuple[str, Any], ...]` (flag items "key=value",
values parsed with `ast.literal_eval`, else kept as strings). Only `init=True` fields are
config fields. Under `Any`, JSON lists come back as tuples (configs are frozen/hashable).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import flags

MISSING = "<missing>"  # stands for a key present on one side only, in `diff` results
_SCALAR_DEFINES = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
                   "float": flags.DEFINE_float, "str": flags.DEFINE_string}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X] / X | None; (tp, False) otherwise."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 2 \
            and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _config_fields(cls: type) -> Iterator[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) for each init field of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.init:
            yield f, hints[f.name]


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted path, field, resolved type) for each leaf field, nested dataclasses expanded."""
    for f, tp in _config_fields(cls):
        if _is_dataclass_type(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def _leaf_table(cls_or_instance: Any) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    cls = cls_or_instance if isinstance(cls_or_instance, type) else type(cls_or_instance)
    table: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for path, f, tp in _leaves(cls):
        if f.name in table:
            raise ValueError(f"leaf field name {f.name!r} of {cls.__name__} is ambiguous: "
                             f"{table[f.name][0]} and {path}")
        table[f.name] = (path, f, tp)
    return table


def fields_flat(cls_or_instance: Any) -> dict[str, dataclasses.Field]:
    """Leaf fields of a (nested) config dataclass keyed by leaf name; ValueError on collisions."""
    return {name: f for name, (_, f, _) in _leaf_table(cls_or_instance).items()}


def to_dict(cfg: Any) -> dict:
    """Nested JSON-ready dict of `cfg` (tuples become lists); TypeError for unencodable values."""
    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return to_dict(value)
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        return value

    out = {}
    for f, _ in _config_fields(type(cfg)):
        out[f.name] = convert(getattr(cfg, f.name))
        try:
            json.dumps(out[f.name])
        except (TypeError, ValueError) as e:
            raise TypeError(f"field {type(cfg).__name__}.{f.name} is not JSON-encodable: "
                            f"{getattr(cfg, f.name)!r} ({e})") from e
    return out


def _from_json(tp: Any, value: Any) -> Any:
    """`value` (decoded JSON) converted to type `tp`: lists to tuples, dicts to dataclasses."""
    base, optional = _strip_optional(tp)
    if value is None and optional:
        return None
    if _is_dataclass_type(base) and isinstance(value, Mapping):
        return from_dict(base, value)
    if base is Any:
        return tuple(_from_json(Any, v) for v in value) if isinstance(value, list) else value
    if tuple in (base, typing.get_origin(base)) and isinstance(value, (list, tuple)):
        args = typing.get_args(base)  # () for a bare `tuple`
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_from_json(a, v) for a, v in zip(args, value))
        return tuple(value)
    return value


def from_dict(cls: type, d: Mapping) -> Any:
    """Config `cls` built from a nested dict (inverse of `to_dict`); missing keys take defaults."""
    fields = dict((f.name, tp) for f, tp in _config_fields(cls))
    unknown = [k for k in d if k not in fields]
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(str, unknown))} for {cls.__name__}; "
                         f"valid fields: {', '.join(fields)}")
    return cls(**{k: _from_json(fields[k], v) for k, v in d.items()})


def replace(cfg: Any, **overrides: Any) -> Any:
    """`dataclasses.replace` keyed by leaf names, routed to (and rebuilding) nested configs."""
    valid = fields_flat(cfg)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} for {type(cfg).__name__}; "
                         f"valid fields: {', '.join(sorted(valid))}")
    changes = {}
    for f, tp in _config_fields(type(cfg)):
        if _is_dataclass_type(tp):
            sub = {k: v for k, v in overrides.items() if k in fields_flat(tp)}
            if sub:
                changes[f.name] = replace(getattr(cfg, f.name), **sub)
        elif f.name in overrides:
            changes[f.name] = overrides[f.name]
    return dataclasses.replace(cfg, **changes)


def _flag_kind(path: str, f: dataclasses.Field, tp: Any) -> str:
    base, _ = _strip_optional(tp)
    if base in (bool, int, float):
        return base.__name__
    if base is str:
        return "enum" if f.metadata.get("choices") is not None else "str"
    args = typing.get_args(base) if typing.get_origin(base) is tuple else ()
    if len(args) == 2 and args[1] is Ellipsis:
        if args[0] in (int, str):
            return f"{args[0].__name__}_list"
        pair = typing.get_args(args[0]) if typing.get_origin(args[0]) is tuple else ()
        if len(pair) == 2 and pair[0] is str and pair[1] is not Ellipsis:
            return "kv_list"  # tuple[tuple[str, Any], ...]
    raise TypeError(f"config field {path} has type {tp!r}, which has no flag type; "
                    'mark it with metadata={"flag": False}')


def _flag_fields(cfg: Any, exclude: Sequence[str]) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    table = _leaf_table(cfg)
    unknown = sorted(set(exclude) - set(table))
    if unknown:
        raise ValueError(f"exclude names unknown field(s) {', '.join(unknown)} "
                         f"for {type(cfg).__name__}")
    return {name: entry for name, entry in table.items()
            if name not in exclude and entry[1].metadata.get("flag", True)}


def _getattr_path(obj: Any, path: str) -> Any:
    """`obj.a.b.c` for path "a.b.c"."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _format_kv_value(v: Any) -> str:
    """`v` as text that `_parse_kv` turns back into `v`."""
    if isinstance(v, str):
        try:
            ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return repr(v)


def _parse_kv(name: str, items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    pairs = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--{name}: expected key=value items, got {item!r}")
        try:
            pairs[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            pairs[key.strip()] = text.strip()
    return tuple(sorted(pairs.items()))


def define_flags(cfg: Any, flag_values: flags.FlagValues = flags.FLAGS,
                 exclude: Sequence[str] = ()) -> list[str]:
    """Defines one absl flag per leaf field of `cfg` (default: its value there); returns names."""
    # Check every field's type before defining any flag, so a TypeError leaves no partial set.
    kinds = {name: (path, f, _flag_kind(path, f, tp))
             for name, (path, f, tp) in _flag_fields(cfg, exclude).items()}
    flags.disclaim_key_flags()  # attribute the flags to our caller's module (for --help)
    for name, (path, f, kind) in kinds.items():
        value, help_text = _getattr_path(cfg, path), f.metadata.get("help", "")
        if kind == "enum":
            flags.DEFINE_enum(name, value, list(f.metadata["choices"]), help_text,
                              flag_values=flag_values)
        elif kind.endswith("_list"):
            if value is not None:
                value = ([f"{k}={_format_kv_value(v)}" for k, v in value] if kind == "kv_list"
                         else [str(v) for v in value])
            flags.DEFINE_list(name, value, help_text, flag_values=flag_values)
        else:
            _SCALAR_DEFINES[kind](name, value, help_text, flag_values=flag_values)
        for alias in f.metadata.get("aliases", ()):     # other names of the same flag
            flags.DEFINE_alias(alias, name, flag_values=flag_values)
    return list(kinds)


def from_flags(cfg: Any, flag_values: flags.FlagValues = flags.FLAGS,
               exclude: Sequence[str] = ()) -> Any:
    """`cfg` with the current value of each flag `define_flags(cfg, ...)` defined applied."""
    overrides = {}
    for name, (path, f, tp) in _flag_fields(cfg, exclude).items():
        if name not in flag_values:
            continue
        kind, value = _flag_kind(path, f, tp), flag_values[name].value
        if value is not None and kind == "int_list":
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ValueError(f"--{name}: expected a comma-separated list of integers, "
                                 f"got {','.join(map(str, value))!r}") from None
        elif value is not None and kind == "str_list":
            value = tuple(str(v) for v in value)
        elif value is not None and kind == "kv_list":
            value = _parse_kv(name, value)
        overrides[name] = value
    return replace(cfg, **overrides)


def diff(a: Mapping, b: Mapping, ignore: Sequence[str] = ()) -> list[tuple[str, Any, Any]]:
    """(leaf name, a value, b value) for each differing leaf of two nested dicts (`MISSING`
    for a key on one side only), in the key order of `a`, then the extra keys of `b`."""
    out = []
    for key in list(a) + [k for k in b if k not in a]:
        if key in ignore:
            continue
        va, vb = a.get(key, MISSING), b.get(key, MISSING)
        sub_a = va if isinstance(va, Mapping) else {} if va is MISSING else None
        sub_b = vb if isinstance(vb, Mapping) else {} if vb is MISSING else None
        if sub_a is not None and sub_b is not None and (sub_a or sub_b):
            out.extend(diff(sub_a, sub_b, ignore))  # nested dicts: compare their leaves
        elif va != vb:
            out.append((key, va, vb))
    return out


def describe_diff(diffs: Sequence[tuple[str, Any, Any]], a_label: str = "checkpoint",
                  b_label: str = "command") -> str:
    """One line: "name: a (a_label) vs b (b_label); ..." for the results of `diff`."""
    show = lambda v: MISSING if v is MISSING else repr(v)  # noqa: E731
    return "; ".join(f"{name}: {show(va)} ({a_label}) vs {show(vb)} ({b_label})"
                     for name, va, vb in diffs)
