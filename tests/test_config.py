import pytest

from cliptrain.base.config import ConfigError, RunConfig, load_config, parse_overrides, save_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["--optim.lr", "1e-3", "--train.precision=fp32", "--augment.scale", "[0.5, 1]",
                             "--model.arch.vision.layers", "2"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.precision == "fp32"
    assert cfg.augment.scale == (0.5, 1.0)
    assert cfg.model.arch == {"vision": {"layers": 2}}


def test_yaml_then_cli_and_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  batch_size: 64\n  steps: 10\noptim:\n  lr: 0.002\n")
    cfg = load_config(path, ["--optim.lr", "0.003"])
    assert (cfg.train.batch_size, cfg.train.steps, cfg.optim.lr) == (64, 10, 0.003)
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config() == RunConfig()


def test_yaml_booleans_become_the_option_meant(tmp_path):
    # YAML 1.1 reads an unquoted off as false: a choice that offers 'off' takes it as 'off'.
    assert load_config(None, ["--train.wandb", "off"]).train.wandb == "off"
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  wandb: off\n")
    assert load_config(path).train.wandb == "off"
    with pytest.raises(ConfigError, match="train.precision: True is not allowed"):  # no option means "on"
        load_config(None, ["--train.precision", "on"])


@pytest.mark.parametrize("args, message", [
    (["--optim.lrr", "1"], "unknown key 'optim.lrr' (did you mean 'lr'?); allowed keys in 'optim': name, lr, "
                           "weight_decay, betas, eps, momentum, image, text, head, no_decay, schedule, warmup_steps, "
                           "cooldown_steps, min_lr, grad_clip"),
    (["--trian.steps", "1"], "unknown key 'trian' (did you mean 'train'?)"),
    (["--train.precision", "fp8"], "train.precision: 'fp8' is not allowed; choose one of 'auto', 'fp32', 'bf16', 'fp16'"),
    (["--train.batch_size", "x"], "train.batch_size: expected an integer, got 'x'"),
    (["--train.batch_size", "10", "--train.accum_steps", "3"],
     "train.batch_size (10) must be divisible by train.accum_steps (3)"),
    (["--optim.lr", "-1"], "optim.lr must be > 0, got -1.0"),
    (["--augment.scale", "[0.5, 2]"], "augment.scale must satisfy 0 < min <= max <= 1, got (0.5, 2.0)"),
    (["--train.tensorboard", "maybe"], "train.tensorboard: expected true or false, got 'maybe'"),
    (["--data.source", "table"], "data.train_path is required when data.source is 'table'"),
    (["train.lr", "1"], "expected an option like --train.lr 1e-3, got 'train.lr'"),
    (["--optim.lr"], "option --optim.lr needs a value"),
])
def test_errors_name_the_key(args, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, args)
    assert message in str(info.value)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(bad)


def test_parse_overrides_nesting():
    assert parse_overrides(["--a.b.c", "1", "--a.b.d=x", "--e", "[1, 2]"]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": [1, 2]}


def test_const_cooldown_needs_cooldown_steps():
    with pytest.raises(ConfigError, match="optim.schedule const-cooldown needs optim.cooldown_steps > 0"):
        load_config(None, ["--optim.schedule", "const-cooldown"])


def test_sharded_checkpoints_need_fsdp():
    with pytest.raises(ConfigError, match="dist.checkpoint sharded needs dist.strategy fsdp"):
        load_config(None, ["--dist.checkpoint", "sharded"])
    assert load_config(None, ["--dist.checkpoint", "sharded", "--dist.strategy", "fsdp"]).dist.checkpoint == "sharded"


def test_a_shipped_recipe_is_a_config_by_name(tmp_path, monkeypatch):
    import yaml

    from cliptrain.base.config import RECIPES, recipe_names
    assert "small-data-cpu" in recipe_names()
    for name in recipe_names():
        cfg = load_config(name)
        assert to_dict_of(cfg) == to_dict_of(load_config(None, yaml.safe_load((RECIPES / f"{name}.yaml").read_text())))
    # a file of the same name in the working directory wins over the recipe; an unknown name lists the recipes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small-data-cpu").write_text("optim: {lr: 0.5}\n")
    assert load_config("small-data-cpu").optim.lr == 0.5
    with pytest.raises(ConfigError, match=r"config file not found: nope \(the shipped recipes are: .*small-data-cpu"):
        load_config("nope")


def to_dict_of(cfg):
    from cliptrain.base.config import to_dict
    return to_dict(cfg)
