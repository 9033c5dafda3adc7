"""The typed-config machinery: types, unknown keys with did-you-mean, overrides, round trip."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import ConfigError, apply_overrides, check, from_dict, load_yaml, to_dict


@dataclass(frozen=True)
class Inner:
    kind: Literal["a", "b"] = "a"  # which variant
    weight: float = 1.0  # how much it counts

    def __post_init__(self):
        check(self.weight >= 0, "weight", f"must be >= 0 (got {self.weight})")


@dataclass(frozen=True)
class Outer:
    steps: int = 10  # optimizer steps
    name: str | None = None  # optional label
    inner: Inner = field(default_factory=Inner)
    items: tuple[int, ...] = ()


def test_builds_nested_dataclasses_and_round_trips():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"kind": "b", "weight": 2}, "items": [1, 2]})
    assert cfg == Outer(steps=3, inner=Inner(kind="b", weight=2.0), items=(1, 2))
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("data,message", [
    ({"stpes": 3}, "stpes: unknown key (did you mean 'steps'?)"),
    ({"steps": "many"}, "steps: must be an integer (got 'many')"),
    ({"steps": True}, "steps: must be an integer (got True)"),
    ({"inner": {"kind": "c"}}, "inner.kind: must be one of 'a', 'b' (got 'c')"),
    ({"inner": {"weight": -1}}, "inner.weight: must be >= 0 (got -1.0)"),
    ({"inner": 3}, "inner: must be a mapping (got 3)"),
    ({"items": [1, "x"]}, "items[1]: must be an integer (got 'x')"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Outer, data)
    assert str(err.value) == message


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 (PyYAML) reads 3e-2 as a string; a float field still takes it.
    assert from_dict(Inner, apply_overrides({}, ["weight=3e-2"])).weight == 0.03
    with pytest.raises(ConfigError, match="must be a number"):
        from_dict(Inner, {"weight": "e-2"})


def test_overrides_parse_yaml_values():
    data = apply_overrides({"inner": {"kind": "a"}}, ["inner.weight=0.5", "steps=7", "name=run"])
    assert from_dict(Outer, data) == Outer(steps=7, name="run", inner=Inner(weight=0.5))
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="steps: is not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_yaml(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(bad)
