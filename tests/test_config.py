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
    cfg = load_config(None, ["tune.space={\"loss.style\" = {loguniform = [1.0, 100.0]}}", "ray.storage=runs/x y"])
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
    # issue 19: numbers too large for their type, seeds numpy/torch refuse, spaces of the wrong type, names
    ("optim.warmup_steps=9223372036854775808", "optim.warmup_steps: 9223372036854775808 is out of range; expected <= 9223372036854775807"),
    ("train.checkpoint_every=1e300", "train.checkpoint_every: 1000000000000000052504"),
    ("train.seed=4294967296", "train.seed: 4294967296 is out of range; expected <= 4294967295"),
    ("data.seed=-1", "data.seed: -1 is out of range"),
    ("tune.seed=4294967296", "tune.seed: 4294967296 is out of range"),
    ("tune.space={\"train.steps\" = {loguniform = [10, 100]}}", "loguniform samples floats but train.steps is int"),
    ("tune.space={\"model.res_blocks\" = {uniform = [1, 3]}}", "use randint"),
    ("tune.space={\"loss.normalize\" = {uniform = [0.0, 1.0]}}", "but loss.normalize is bool; use choice"),
    ("tune.space={\"model.fusion\" = {randint = [0, 2]}}", "randint samples integers but model.fusion is str"),
    ("tune.space={\"train.steps\" = {randint = [1, 2.5]}}", "randint needs integer"),
    ("tune.space={\"model.adain_levels\" = {randint = [1, 5]}}", "model.adain_levels: 4 is out of range"),
    ("tune.space={\"loss.style\" = {choice = [\"low\", \"high\"]}}", "loss.style: expected float, got 'low'"),
    ("ray.name=..", "ray.name: '..': use 1-64"),
    ("ray.name=a/b", "ray.name: 'a/b'"),
    ("ray.name=.hidden", "ray.name: '.hidden'"),
    ("ray.name=-flag", "ray.name: '-flag'"),
    ("ray.name=" + "x" * 65, "use 1-64"),
    ("ray.name=\"\"", "ray.name: ''"),
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


def test_valid_spaces_and_names_pass():
    cfg = load_config(None, ['tune.space={"model.adain_levels" = {randint = [1, 4]}, "train.steps" = {choice = [10, 20]},'
                             ' "loss.style" = {randint = [1, 10]}}', "ray.name=run-1.a_B", "train.seed=4294967295"])
    assert cfg.ray.name == "run-1.a_B" and cfg.train.seed == 2**32 - 1
    from stylegen.config import check_name

    assert check_name("x" * 64) == "x" * 64


def test_search_space_samples_only_valid_values():
    """What Tune draws from an accepted space is accepted by the trial's config (randint's high is exclusive)."""
    pytest.importorskip("ray")
    import numpy as np

    from stylegen.config import with_overrides
    from stylegen.tune import search_space

    space = {"model.adain_levels": {"randint": [1, 4]}, "loss.style": {"loguniform": [1, 100]},
             "train.steps": {"choice": [10, 20.0]}}
    dists = search_space(space)
    rng = np.random.default_rng(0)
    for _ in range(50):
        sample = {k: d.sample(random_state=rng) for k, d in dists.items()}
        cfg = with_overrides(Config(), sample)
        assert cfg.model.adain_levels in (1, 2, 3) and isinstance(cfg.train.steps, int)
    with pytest.raises(ConfigError, match="loguniform samples floats"):
        search_space({"train.steps": {"loguniform": [10, 100]}})


def test_a_retired_key_is_one_line_in_a_config_and_dropped_from_an_old_checkpoint_config():
    from stylegen.config import from_dict, to_dict

    with pytest.raises(ConfigError, match="data.shuffle_buffer' was retired: .*data.shuffle_shards"):
        load_config(None, ["data.shuffle_buffer=100"])
    old = to_dict(load_config(None, []))
    old["data"]["shuffle_buffer"] = 1000  # what checkpoints written before the key was retired hold
    assert from_dict(old).data.shuffle_shards == 4
