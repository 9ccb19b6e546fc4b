"""bft.config: the one configuration approach (dataclasses from YAML + key=value overrides) of train, eval and
reproduce."""

from dataclasses import dataclass, field

import pytest

from bft.config import ConfigError, apply_overrides, build_dataclass, load_yaml_mapping


@dataclass
class Inner:
    lr: float = 1e-5
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int = 1
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)
    note: str | None = None


def test_nested_build_with_coercion_and_defaults():
    cfg = build_dataclass(Outer, {"steps": 3.0, "inner": {"lr": "2e-5"}, "extra": {"a": 1}})
    assert cfg == Outer(steps=3, inner=Inner(lr=2e-5), extra={"a": 1})


def test_unknown_key_names_the_closest_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.lrr' \(did you mean 'inner.lr'\?\)"):
        build_dataclass(Outer, {"inner": {"lrr": 1}})


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match="steps must be an integer"):
        build_dataclass(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match=r"inner.names\[0\] must be a string"):
        build_dataclass(Outer, {"inner": {"names": [1]}})


def test_overrides_are_yaml_values_at_dotted_paths():
    data = apply_overrides({"inner": {"lr": 1.0}}, ["inner.lr=0.5", "steps=7", "note=hi", "inner.names=[a, b]"])
    assert build_dataclass(Outer, data) == Outer(steps=7, inner=Inner(lr=0.5, names=["a", "b"]), note="hi")
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"steps": 1}, ["steps.x=1"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_yaml_mapping(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml_mapping(tmp_path / "list.yaml")


def test_eval_and_reproduce_take_overrides():
    import bft.commands.eval as eval_cli
    import bft.commands.reproduce as reproduce_cli
    from bft.cli import build_parser

    args = build_parser(["eval"]).parse_args(["eval", "--aligned", "x", "generation.top_p=0.6", "limit=4"])
    config, models = eval_cli.build_config(args)
    assert config.generation.top_p == 0.6 and config.limit == 4 and models["aligned"] == "x"
    args = build_parser(["reproduce"]).parse_args(["reproduce", "--quick", "bft_steps=3", "--n-test", "5"])
    cfg = reproduce_cli.config_from_args(args)
    assert (cfg.bft_steps, cfg.n_test, cfg.quick, cfg.n_train) == (3, 5, True, 32)
    with pytest.raises(ConfigError, match="did you mean 'bft_steps'"):
        reproduce_cli.config_from_args(build_parser(["reproduce"]).parse_args(["reproduce", "bft_stpes=3"]))
