"""Tests for flare_jax.config_flags: flags, JSON and diffs generated from config dataclasses."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import pytest
from absl import flags

from flare_jax import config_flags as cf


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    encoder: str = dataclasses.field(
        default="flare", metadata={"help": "encoder type", "choices": ("flare", "frame_stack")})
    max_steps: Optional[int] = None
    options: tuple[tuple[str, Any], ...] = (("depth", 2),)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Outer:
    verbose: bool = False
    hidden_dim: int = dataclasses.field(default=256, metadata={"help": "hidden width"})
    layers: tuple[int, ...] = (64, 64)
    tags: tuple[str, ...] = ()
    name: str | None = None
    inner: Inner = Inner()
    callback: Any = dataclasses.field(default=None, metadata={"flag": False})


@dataclasses.dataclass(frozen=True)
class Clash:
    lr: float = 0.1
    inner: Inner = Inner()


PRESET = Outer(verbose=True, hidden_dim=1024, layers=(32,), tags=("a", "b"), name="run1",
               inner=Inner(lr=3e-4, encoder="frame_stack", max_steps=7,
                           options=(("depth", 3), ("mode", "fast"))))


def _flags(cfg=PRESET, **kw):
    fv = flags.FlagValues()
    names = cf.define_flags(cfg, fv, **kw)
    return fv, names


def test_fields_flat_expands_nested_and_keeps_unflagged_fields():
    names = list(cf.fields_flat(Outer))
    assert names == ["verbose", "hidden_dim", "layers", "tags", "name", "lr", "encoder",
                     "max_steps", "options", "callback"]
    assert cf.fields_flat(PRESET)["encoder"].metadata["help"] == "encoder type"


def test_name_collision_between_nested_dataclasses_raises():
    with pytest.raises(ValueError, match=r"lr.*inner\.lr"):
        cf.fields_flat(Clash)
    with pytest.raises(ValueError, match="ambiguous"):
        _flags(Clash())


def test_json_round_trip():
    d = cf.to_dict(PRESET)
    assert d["layers"] == [32] and d["inner"]["options"] == [["depth", 3], ["mode", "fast"]]
    loaded = json.loads(json.dumps(d))
    back = cf.from_dict(Outer, loaded)
    assert back == PRESET
    assert isinstance(back.layers, tuple) and isinstance(back.inner, Inner)
    assert all(isinstance(p, tuple) for p in back.inner.options)
    assert cf.from_dict(Outer, json.loads(json.dumps(cf.to_dict(Outer())))) == Outer()


def test_from_dict_missing_keys_take_defaults():
    assert cf.from_dict(Outer, {"hidden_dim": 8, "inner": {"max_steps": 5}}) == Outer(
        hidden_dim=8, inner=Inner(max_steps=5))


def test_to_dict_rejects_unencodable_value():
    with pytest.raises(TypeError, match="callback"):
        cf.to_dict(Outer(callback=object()))


def test_from_dict_unknown_keys():
    with pytest.raises(ValueError, match=r"^unknown field\(s\) bogus, other for Outer; valid "
                                         r"fields: verbose, hidden_dim.*inner") as e:
        cf.from_dict(Outer, {"bogus": 1, "hidden_dim": 2, "other": 3})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"unknown field\(s\) nope for Inner"):
        cf.from_dict(Outer, {"inner": {"nope": 1}})


def test_from_dict_runs_nested_validation():
    with pytest.raises(ValueError, match="lr must be positive"):
        cf.from_dict(Outer, {"inner": {"lr": -1.0}})


def test_replace_routes_leaf_names_to_nested_config():
    cfg = cf.replace(PRESET, hidden_dim=8, lr=0.5, max_steps=None)
    assert cfg == dataclasses.replace(
        PRESET, hidden_dim=8, inner=dataclasses.replace(PRESET.inner, lr=0.5, max_steps=None))
    with pytest.raises(ValueError, match="lr must be positive"):
        cf.replace(PRESET, lr=0.0)


def test_replace_unknown_name():
    with pytest.raises(ValueError, match=r"unknown field\(s\) inner\.lr, zzz for Outer; "
                                         r"valid fields: callback, encoder, hidden_dim, "
                                         r"layers, lr, max_steps, name, options, tags, "
                                         r"verbose$") as e:
        cf.replace(PRESET, zzz=1, **{"inner.lr": 2})
    assert "\n" not in str(e.value)


def test_define_flags_defaults_are_preset_values():
    fv, names = _flags()
    assert names == ["verbose", "hidden_dim", "layers", "tags", "name", "lr", "encoder",
                     "max_steps", "options"]
    assert "callback" not in fv
    assert fv["hidden_dim"].default == 1024 and fv["verbose"].default is True
    assert fv["lr"].default == 3e-4 and fv["encoder"].default == "frame_stack"
    assert fv["max_steps"].default == 7 and fv["name"].default == "run1"
    assert fv["layers"].default == ["32"] and fv["options"].default == ["depth=3", "mode=fast"]
    assert fv["hidden_dim"].help == "hidden width"
    assert "frame_stack" in fv["encoder"].parser.enum_values


def test_unparsed_flags_give_preset_values():
    fv, _ = _flags()
    assert cf.from_flags(PRESET, fv) == PRESET
    fv(["prog"])
    assert cf.from_flags(PRESET, fv) == PRESET


def test_from_flags_applies_parsed_argv():
    fv, _ = _flags()
    fv(["prog", "--hidden_dim=3", "--noverbose", "--layers=1,2,3", "--tags=x", "--lr=0.01",
        "--encoder=flare", "--max_steps=9", "--options=a=1,b=x", "--name=other"])
    cfg = cf.from_flags(PRESET, fv)
    assert cfg == Outer(verbose=False, hidden_dim=3, layers=(1, 2, 3), tags=("x",), name="other",
                        inner=Inner(lr=0.01, encoder="flare", max_steps=9,
                                    options=(("a", 1), ("b", "x"))))


def test_optional_flags_default_none():
    fv, _ = _flags(Outer())
    assert fv["max_steps"].default is None and fv["name"].default is None
    fv(["prog", "--max_steps=4"])
    assert cf.from_flags(Outer(), fv) == Outer(inner=Inner(max_steps=4))


def test_exclude_keeps_cfg_values():
    fv, names = _flags(exclude=("hidden_dim", "lr"))
    assert "hidden_dim" not in fv and "lr" not in names
    flags.DEFINE_integer("hidden_dim", 5, "someone else's flag", flag_values=fv)
    fv(["prog", "--hidden_dim=5", "--encoder=flare"])
    cfg = cf.from_flags(PRESET, fv, exclude=("hidden_dim", "lr"))
    assert cfg == cf.replace(PRESET, encoder="flare")
    with pytest.raises(ValueError, match="typo"):
        _flags(exclude=("typo",))


def test_enum_choices_rejected_by_absl():
    fv, _ = _flags()
    with pytest.raises(flags.IllegalFlagValueError):
        fv(["prog", "--encoder=resnet"])


def test_int_list_conversion_error_names_flag():
    fv, _ = _flags()
    fv(["prog", "--layers=1,two"])
    with pytest.raises(ValueError, match="--layers"):
        cf.from_flags(PRESET, fv)


def test_key_value_options():
    fv, _ = _flags()
    fv(["prog", "--options=b=x,a=1,\"c=(1, 2)\",d='7'"])  # csv quoting
    assert cf.from_flags(PRESET, fv).inner.options == (
        ("a", 1), ("b", "x"), ("c", (1, 2)), ("d", "7"))
    fv, _ = _flags(cf.replace(PRESET, options=(("s", "1"), ("t", "x"))))
    assert fv["options"].default == ["s='1'", "t=x"]  # round-trips a string that looks like an int
    assert cf.from_flags(PRESET, fv).inner.options == (("s", "1"), ("t", "x"))
    fv["options"].parse("novalue")
    with pytest.raises(ValueError, match="--options.*novalue"):
        cf.from_flags(PRESET, fv)


def test_from_flags_runs_nested_validation():
    fv, _ = _flags()
    fv(["prog", "--lr=-1"])
    with pytest.raises(ValueError, match="lr must be positive"):
        cf.from_flags(PRESET, fv)


def test_unsupported_field_type_needs_flag_false():
    @dataclasses.dataclass(frozen=True)
    class Bad:
        n: int = 1
        table: dict = dataclasses.field(default_factory=dict)

    fv = flags.FlagValues()
    with pytest.raises(TypeError, match="table"):
        cf.define_flags(Bad(), fv)
    assert "n" not in fv  # nothing defined when one field is unsupported
    assert cf.define_flags(Bad(), fv, exclude=("table",)) == ["n"]


def test_flags_are_attributed_to_the_calling_module():
    fv, _ = _flags()
    assert {f.name for f in fv.flags_by_module_dict()[__name__]} >= {"hidden_dim", "options"}


def test_diff_and_describe_diff():
    a = cf.to_dict(Outer(hidden_dim=1024, inner=Inner(encoder="flare")))
    b = cf.to_dict(Outer(hidden_dim=256, inner=Inner(encoder="frame_stack")))
    a["inner"]["old_only"] = 1
    b["new_only"] = {"x": 2}
    d = cf.diff(a, b)
    assert d == [("hidden_dim", 1024, 256), ("encoder", "flare", "frame_stack"),
                 ("old_only", 1, "<missing>"), ("x", "<missing>", 2)]
    assert cf.diff(a, b, ignore=("hidden_dim", "old_only", "new_only")) == [
        ("encoder", "flare", "frame_stack")]
    assert cf.diff(a, a) == []
    assert cf.diff({"seed": 1, "sizes": [1, 2]}, {"seed": "1", "sizes": [1, 2]}) == [
        ("seed", 1, "1")]
    assert cf.describe_diff(d[:2]) == ("hidden_dim: 1024 (checkpoint) vs 256 (command); "
                                       "encoder: 'flare' (checkpoint) vs 'frame_stack' (command)")
    assert cf.describe_diff(d[2:3], "old", "new") == "old_only: 1 (old) vs <missing> (new)"
