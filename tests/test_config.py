import tomllib

import pytest

from stylegen.config import Config, ConfigError, from_dict, load_config, to_toml, with_overrides
from stylegen.cli import main


def test_defaults_file_and_set_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[loss]\nstyle = 3.0\ncontent = 2.0\n[data]\nbatch_size = 8\n")
    cfg = load_config(f, ["loss.style=7", "data.content=[\"a\", \"b\"]", "train.amp=false"])
    assert cfg.loss.style == 7.0 and cfg.loss.content == 2.0  # --set beats file beats default
    assert cfg.data.batch_size == 8 and cfg.data.content == ["a", "b"]
    assert cfg.train.amp is False
    assert cfg.loss.tv == Config().loss.tv


def test_typed_conversion_int_to_float_and_comma_lists():
    cfg = load_config(None, ["optim.lr=1", "loss.style_layers=relu1_1,relu2_1"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.loss.style_layers == ["relu1_1", "relu2_1"]


def test_toml_round_trip():
    cfg = load_config(None, ["tune.space={\"loss.style\" = {loguniform = [1.0, 100.0]}}", "ray.name=x y"])
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg


@pytest.mark.parametrize("override, needle", [
    ("loss.stlye=1", "valid keys in [loss]: pixel_l1"),
    ("lossx.style=1", "valid sections: data"),
    ("model.fusion=mix", "not one of 'concat', 'adain'"),
    ("data.batch_size=-4", "data.batch_size: -4 is out of range; expected >= 1"),
    ("data.batch_size=99999", "expected <= 4096"),
    ("optim.lr=fast", "optim.lr: expected float, got 'fast'"),
    ("optim.lr=0", "expected > 0.0"),
    ("optim.lr=nan", "not a finite number"),
    ("train.amp=maybe", "train.amp: expected bool"),
    ("loss.style_layers=[\"relu9_9\"]", "relu9_9"),
    ("noequals", "expected section.key=value"),
    ("tune.space={\"loss.style\" = {normal = [1, 2]}}", "unknown distribution 'normal'"),
    ("tune.space={\"loss.nope\" = {choice = [1]}}", "unknown config key 'loss.nope'"),
    ("tune.space={\"loss.style\" = {loguniform = [0, 1]}}", "loguniform needs low > 0"),
    ("tune.space={\"loss.style\" = {uniform = [5, 1]}}", "low < high"),
    ("tune.space={\"model.fusion\" = {choice = [\"concat\", \"bad\"]}}", "'bad' is not one of"),
])
def test_bad_overrides_name_key_value_and_expectation(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[loss\nstyle=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "u.toml"
    unknown.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="unknown config section \\[optimizer\\]"):
        load_config(unknown)


def test_with_overrides_copies():
    base = Config()
    new = with_overrides(base, {"loss.style": 42.0})
    assert new.loss.style == 42.0 and base.loss.style != 42.0


def test_cli_config_show(capsys):
    assert main(["config", "show", "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["train"]["steps"] == 7


def test_cli_config_error_is_one_line(capsys):
    assert main(["config", "show", "--set", "loss.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'loss.bogus'" in err
