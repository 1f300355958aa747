"""Config files, overrides, validation errors, and the command line's help."""
import os
import warnings

import pytest

from moesaic.__main__ import main
from moesaic.train import digits_default
from moesaic.train.config import ConfigError, TrainConfig, apply_overrides, load_file, validate


def _write(tmp_path, text, name="cfg.py"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_upper_case_file_and_overrides(tmp_path):
    cfg = load_file(_write(tmp_path, "BATCH_SIZE = 32\nEPOCHS = 3\nLR = 1e-3\n"
                                     "MODEL_ARGS = {'depth': 2}\nimport os\n_PRIVATE = 1\n"))
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.model_args) == (32, 3, 1e-3, {"depth": 2})
    cfg = apply_overrides(cfg, ["epochs=5", "betas=(0.9, 0.99)", "clip_grad=None",
                                "model_args.num_experts=8", "name=run1", "MIN_LR=1e-5"])
    assert cfg.epochs == 5 and cfg.betas == (0.9, 0.99) and cfg.clip_grad is None
    assert cfg.model_args == {"depth": 2, "num_experts": 8} and cfg.name == "run1"
    assert cfg.min_lr == 1e-5


def test_function_style_file(tmp_path):
    p = _write(tmp_path, "from moesaic.train import TrainConfig\n"
                         "def config():\n    return TrainConfig(epochs=7, hflip=True)\n")
    cfg = load_file(p)
    assert isinstance(cfg, TrainConfig) and cfg.epochs == 7 and cfg.hflip


def test_lower_case_key_is_an_error_and_failing_config_function_is_a_config_error(tmp_path):
    """A known field (or a name other tools use for it) in lower case would silently train
    with the default: refused. Beside its UPPER_CASE twin it is a helper, or an override that
    a file importing a base config forgot to capitalise: warned when the values differ."""
    with pytest.raises(ConfigError, match="batch_size would be ignored .*write BATCH_SIZE"):
        load_file(_write(tmp_path, "batch_size = 32\nlr = 1e-3\nLR = 2 * lr\n"))
    with pytest.raises(ConfigError, match="learning_rate would be ignored .*write LR"):
        load_file(_write(tmp_path, "learning_rate = 3e-4\n"))
    with pytest.warns(UserWarning, match=r"sets lr = 0.001 and LR = 0.002: the run uses LR"):
        assert load_file(_write(tmp_path, "BATCH_SIZE = 32\nlr = 1e-3\nLR = 2 * lr\n")).lr == 2e-3
    _write(tmp_path, "EPOCHS = 2\n", "base.py")
    with pytest.warns(UserWarning, match=r"sets epochs = 50 and EPOCHS = 2: the run uses EPOCHS"):
        assert load_file(_write(tmp_path, "from base import *\nepochs = 50\n")).epochs == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_file(_write(tmp_path, "EPOCHS = 3\nepochs = EPOCHS\n")).epochs == 3
    p = _write(tmp_path, "from moesaic.train import TrainConfig\n"
                         "def config():\n    return TrainConfig(batch_siz=32)\n", "f.py")
    with pytest.raises(ConfigError,
                       match="config\\(\\) in .* failed \\(line \\d+\\): TypeError.*batch_siz"):
        load_file(p)
    p = _write(tmp_path, "from moesaic.train import TrainConfig\nepochs = 5\n"
                         "def config():\n    return TrainConfig(epochs=epochs)\n", "g.py")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_file(p).epochs == 5


def test_shipped_configs_load():
    import glob

    files = sorted(glob.glob("configs/*.py"))
    assert len(files) >= 6
    for f in files:
        load_file(f)
    prmoe = load_file("configs/cifar10_vit_moe_lite6_prmoe.py")
    assert (prmoe.batch_size, prmoe.lr, prmoe.weight_decay, prmoe.epochs, prmoe.warmup_epochs,
            prmoe.label_smoothing, prmoe.aux_loss_weight, prmoe.clip_grad, prmoe.crop_padding,
            prmoe.auto_augment, prmoe.max_ep_size) == (512, 2e-3, 3e-2, 200, 40, 0.1, 0.01, 1.0,
                                                       4, "cifar10", 1)
    assert load_file("configs/digits_vit_moe.py") == digits_default()
    up = load_file("configs/cifar10_vit_moe_lite6_prmoe_upcycled.py")
    dense = load_file("configs/cifar10_vit_lite6.py")
    assert up.upcycle and up.init_from is None  # given on the command line
    import moesaic
    import moesaic.models as M
    names = moesaic.upcycle_(M.create(up.model, **up.model_args),
                             M.create(dense.model, **dense.model_args).state_dict())
    assert names == ["blocks.1.ffn", "blocks.3.ffn", "blocks.5.ffn"]


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'BATCH_SIZ'.*did you mean: BATCH_SIZE"):
        load_file(_write(tmp_path, "BATCH_SIZ = 3\n"))
    with pytest.raises(ConfigError, match=r"'warmup_epoch'.*warmup_epochs"):
        apply_overrides(TrainConfig(), ["warmup_epoch=3"])


def test_names_from_other_tools_and_small_conveniences(tmp_path):
    with pytest.raises(ConfigError, match=r"'learning_rate'.*did you mean: lr"):
        apply_overrides(TrainConfig(), ["learning_rate=3e-4"])
    with pytest.raises(ConfigError, match=r"'GRADIENT_CHECKPOINTING'.*GRAD_CHECKPOINTING"):
        load_file(_write(tmp_path, "GRADIENT_CHECKPOINTING = True\n"))
    assert apply_overrides(TrainConfig(), ["name=123"]).name == "123"
    with pytest.raises(ConfigError, match=r"name must be .*got '\.\.'"):
        apply_overrides(TrainConfig(), ["name=.."])
    with pytest.warns(UserWarning, match=r"min_lr \(1e-05\) has no effect"):
        apply_overrides(TrainConfig(), ["schedule=constant", "min_lr=1e-5"])
    _write(tmp_path, "EPOCHS = 7\nLR = 0.5\n", name="base_recipe.py")
    cfg = load_file(_write(tmp_path, "from base_recipe import *\nLR = 0.25\n"))
    assert (cfg.epochs, cfg.lr) == (7, 0.25)
    _write(tmp_path, "EPOCHS = 9\n", name="base_recipe.py")  # an edited base is read again
    assert load_file(str(tmp_path / "cfg.py")).epochs == 9


def test_every_problem_is_reported_at_once(tmp_path):
    """Unknown keys all at once; then every wrong type; then (types right) every bad range, an
    unknown dataset not also failing the per-channel statistics."""
    with pytest.raises(ConfigError) as e:
        load_file(_write(tmp_path, "BATCH_SIZ = 2\nLERNING_RATE = 1\nEPOCHS = 3\n"))
    msg = str(e.value)
    assert msg.startswith("the config has 2 problems:\n")
    assert "'BATCH_SIZ'" in msg and "did you mean: BATCH_SIZE" in msg and "LR" in msg
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["epochs=x", "seed=y", "lr=-1"])
    msg = str(e.value)
    assert "2 problems" in msg and "epochs: expected int" in msg and "seed: expected int" in msg
    with pytest.raises(ConfigError) as e:
        apply_overrides(TrainConfig(), ["lr=-1", "batch_size=0", "dataset=mnist",
                                        "norm_mean=[0.5]", "norm_std=[]"])
    lines = str(e.value).splitlines()
    assert lines[0] == "the config has 4 problems:", lines
    assert any("batch_size must be >= 1, got 0" in x for x in lines)
    assert not any("norm_" in x for x in lines)
    with pytest.raises(ConfigError, match=r"the config has 2 problems:\n  - norm_mean must be "
                       r"None or 1 finite number .*\n  - norm_std must be None or 1"):
        apply_overrides(TrainConfig(), ["norm_mean=[0.5, 0.5]", "norm_std=[]"])


def test_bad_values_name_field_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size: expected int.*'many'"):
        load_file(_write(tmp_path, "BATCH_SIZE = 'many'\n"))
    with pytest.raises(ConfigError, match=r"lr must be > 0, got -1"):
        apply_overrides(TrainConfig(), ["lr=-1"])
    with pytest.raises(ConfigError, match=r"dataset must be one of .*'mnist'"):
        apply_overrides(TrainConfig(), ["dataset=mnist"])
    with pytest.raises(ConfigError, match=r"hflip: expected bool"):
        apply_overrides(TrainConfig(), ["hflip=1"])
    with pytest.raises(ConfigError, match=r"--set expects key=value"):
        apply_overrides(TrainConfig(), ["epochs"])
    with pytest.raises(ConfigError, match="both config"):
        load_file(_write(tmp_path, "EPOCHS = 2\ndef config():\n    return {}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(str(tmp_path / "nope.py"))
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_file(str(tmp_path))
    with pytest.raises(ConfigError, match=r"norm_std must be None or 3 finite numbers > 0 \(one "
                       r"per channel of cifar10\), got \(0.2, 0.2\)"):
        apply_overrides(TrainConfig(), ["dataset=cifar10", "norm_std=(0.2, 0.2)"])
    with pytest.raises(ConfigError, match=r"norm_mean must be None or 1 finite number \("):
        apply_overrides(TrainConfig(), ["norm_mean=[0.1, 0.2]"])
    with pytest.warns(UserWarning, match="norm_mean above 1: pixels are scaled to"):
        apply_overrides(TrainConfig(), ["dataset=cifar10", "norm_mean=(125.3, 123.0, 113.9)"])
    import numpy as np
    numpy_std = validate(TrainConfig(dataset="cifar10", norm_std=(np.float32(0.5), np.int64(1), 0.25)))
    assert numpy_std.norm_std == (0.5, 1.0, 0.25) and type(numpy_std.norm_std[0]) is float
    cfg = apply_overrides(TrainConfig(), ["dataset=cifar10", "norm_std=[0.2023, 0.1994, 0.2010]"])
    assert cfg.norm_std == (0.2023, 0.1994, 0.2010) and cfg.to_dict()["norm_std"] == [
        0.2023, 0.1994, 0.2010]


def test_infinite_values_are_refused_and_names_keep_their_text():
    for item, shown in (("lr=1e999", "inf"), ("warmup_epochs=1e999", "inf"),
                        ("timeout_s=-1e999", "-inf"), ("norm_mean=(1e999,)", r"\(inf,\)")):
        with pytest.raises(ConfigError, match=rf"{item.split('=')[0]} must be finite, got {shown}"):
            apply_overrides(TrainConfig(), [item])
    with pytest.warns(UserWarning, match="data_dir .'0x10'. is unused"):  # digits
        cfg = apply_overrides(TrainConfig(), ["name=1e3", "data_dir=0x10", "model=1.50",
                                              "init_from=None"])
    assert (cfg.name, cfg.data_dir, cfg.model, cfg.init_from) == ("1e3", "0x10", "1.50", None)


def test_json_config_files_give_config_errors(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    for name, said in (("nope.json", "cannot read the config file"),
                       ("bad.json", "is not valid JSON"), ("list.json", "holds a list, not an "
                                                                        "object of config keys")):
        assert main(["train", "--config", str(tmp_path / name)]) == 2
        assert said in capsys.readouterr().err


def test_a_shipped_config_named_from_elsewhere_says_where_it_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"does not exist here .*; the shipped one is .*"
                                          r"configs/digits_vit_moe.py"):
        load_file("configs/digits_vit_moe.py")


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["train", "--set", "batchsize=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'batchsize'" in err and "batch_size" in err
    for command in (["train"], ["eval", "runs/x"]):  # a space for '=': said before anything runs
        with pytest.raises(SystemExit) as e:
            main([*command, "--set", "epochs", "2"])
        assert e.value.code == 2
        assert ("argument --set: expected KEY=VALUE in one word, got 'epochs' (write --set "
                "epochs=VALUE)") in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--config", "--set", "--resume", "--run-dir", "torchrun"):
        assert opt in out
    from dataclasses import fields

    from moesaic.train.config import field_help

    docs = field_help()
    for f in fields(TrainConfig):
        assert f"  {f.name} = " in out and docs.get(f.name), f.name


def test_models_lists_registry(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "vit_moe_lite6_prmoe" in names and "vit_lite6" in names
    zoo = [line for line in lines if line.startswith(("vit_", "widenet_"))]
    assert len(zoo) == 8 and all(len(line.split()) > 1 for line in zoo)  # one-line summaries


def test_print_config(capsys):
    """--print-config prints the resolved config after the checks training makes first, the
    model built on the meta device included (the dataset's shape known without reading it)."""
    assert main(["train", "--set", "epochs=3", "--print-config"]) == 0
    assert '"epochs": 3' in capsys.readouterr().out
    assert main(["train", "--set", "model_args.num_experts=3", "--set", "model_args.top_k=4",
                 "--print-config"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "top_k (4) exceeds the 3 experts" in err
    from moesaic.train.data import SHAPES, load_digits
    train_set, _ = load_digits()
    assert SHAPES["digits"] == (tuple(train_set.shape), train_set.num_classes)


def test_aux_loss_weight_is_the_balance_weight_and_z_loss_is_not_rescaled():
    from moesaic.layer import moe_layers
    from moesaic.train.setup import build_model
    cfg = apply_overrides(digits_default(), ["aux_loss_weight=0.5",
                                             "model_args.z_loss_coef=0.001"])
    model = build_model(cfg, (1, 8, 8), 10)
    coefs = {(m.config.aux_loss_coef, m.config.z_loss_coef) for m in moe_layers(model)}
    assert coefs == {(0.5, 0.001)}
    with pytest.raises(ConfigError, match=r"model_args.aux_loss_coef \(0.1\).*aux_loss_weight"):
        apply_overrides(digits_default(), ["model_args={'aux_loss_coef': 0.1}"])


def test_switching_model_warns_when_model_args_stay(tmp_path):
    cfg = apply_overrides(digits_default(), ["model=vit_lite6"])   # the default has no model_args
    assert cfg.model == "vit_lite6" and cfg.model_args == {}
    base = load_file(_write(tmp_path, "MODEL = 'vit_moe_tiny'\nMODEL_ARGS = {'depth': 2}\n"))
    with pytest.warns(UserWarning, match=r"model_args \{'depth': 2\} still apply.*model_args=\{\}"):
        apply_overrides(base, ["model=vit_lite6"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_overrides(base, ["model=vit_lite6", "model_args={}"]).model_args == {}


def test_seed_dataset_keys_and_warmup_are_checked():
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        apply_overrides(digits_default(), ["seed=-1"])
    with pytest.raises(ConfigError, match=r"model_args \['img_size'\] are set from the dataset"):
        apply_overrides(digits_default(), ["model_args.img_size=16"])
    with pytest.warns(UserWarning, match=r"warmup_epochs \(5.0\) exceeds epochs \(2\)"):
        apply_overrides(digits_default(), ["epochs=2", "warmup_epochs=5"])
    with pytest.warns(UserWarning, match=r"data_dir \('/nowhere'\) is unused: the digits"):
        apply_overrides(digits_default(), ["data_dir='/nowhere'"])


def test_cli_warnings_are_one_readable_line(monkeypatch):
    """moesaic's warnings print as `warning: ...` (ranked under torchrun), others as Python's."""
    from moesaic.__main__ import _format_warning
    path = os.path.join(os.sep, "x", "moesaic", "train", "config.py")
    assert _format_warning("lr is odd", UserWarning, path, 3) == "warning: lr is odd\n"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _format_warning("m", UserWarning, path, 3) == "[rank 1] warning: m\n"
    assert "DeprecationWarning" in _format_warning("m", DeprecationWarning, path, 3)


def test_config_warnings_come_from_rank_0_only(tmp_path, monkeypatch, capsys):
    """Under torchrun every rank reads the same config: only rank 0 warns about it."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _write(tmp_path, "EPOCHS = 3\nepochs = 50\nWARMUP_EPOCHS = 9\n")
    for rank, expected in (("0", {True}), ("1", {False})):
        monkeypatch.setenv("RANK", rank)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["train", "--config", cfg, "--print-config"]) == 0
        said = [str(w.message) for w in caught]
        assert {any("exceeds epochs" in m for m in said),
                any("the run uses EPOCHS" in m for m in said)} == expected, (rank, said)
    capsys.readouterr()


def test_a_relative_model_module_is_found_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "mine.py").write_text("")
    (tmp_path / "cfgs" / "c.py").write_text("MODEL_MODULE = 'mine.py'\n")
    monkeypatch.chdir(tmp_path)
    assert load_file("cfgs/c.py").model_module == str(tmp_path / "cfgs" / "mine.py")
    (tmp_path / "cfgs" / "d.py").write_text("MODEL_MODULE = 'my_pkg.models'\n")  # a module name
    assert load_file("cfgs/d.py").model_module == "my_pkg.models"


def test_a_config_file_that_raises_names_its_line(tmp_path):
    (tmp_path / "bad.py").write_text("EPOCHS = 2\nLR = 1 / 0\n")
    with pytest.raises(ConfigError, match=r"failed to run \(line 2\): ZeroDivisionError"):
        load_file(str(tmp_path / "bad.py"))
    (tmp_path / "fn.py").write_text("def config():\n    return {'epochs': [][1]}\n")
    with pytest.raises(ConfigError, match=r"config\(\) in .* failed \(line 2\): IndexError"):
        load_file(str(tmp_path / "fn.py"))


def test_no_command_prints_usage_and_fails(capsys):
    """`python3 -m moesaic` alone: the usage on stderr, exit status 2 (argparse's usage error)."""
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage:" in err and "train" in err


def test_numpy_scalars_count_as_plain_values():
    """A config computed with numpy (np.int64 epochs, np.float32 lr, np.bool_ flags, numpy
    betas) validates to the Python values it stands for, so config.json writes them plainly."""
    import json

    import numpy as np
    cfg = TrainConfig()
    cfg.epochs, cfg.lr, cfg.grad_checkpointing = np.int64(3), np.float32(0.25), np.True_
    cfg.betas = (np.float32(0.5), np.float64(0.75))
    validate(cfg)
    assert (cfg.epochs, cfg.lr, cfg.grad_checkpointing, cfg.betas) == (3, 0.25, True, (0.5, 0.75))
    assert type(cfg.epochs) is int and type(cfg.lr) is float and cfg.grad_checkpointing is True
    json.dumps(cfg.to_dict())


def test_yaml_habits_are_refused(tmp_path):
    """`EPOCHS: 2` sets nothing in Python (an annotation): refused with the line and the fix,
    where it would train with the default; a .yaml/.toml file is refused as not Python."""
    with pytest.raises(ConfigError, match=r"\(line 2\): `LR: \.\.\.` annotates LR without "
                       r"setting it; write `LR = \.\.\.` \(also EPOCHS\)"):
        load_file(_write(tmp_path, "BATCH_SIZE = 8\nLR: 3e-3\nEPOCHS: 2\n"))
    assert load_file(_write(tmp_path, "EPOCHS: int = 2\n")).epochs == 2
    assert load_file(_write(tmp_path, "EPOCHS: int\nif True:\n    EPOCHS = 3\n")).epochs == 3
    assert load_file(_write(tmp_path, "EPOCHS = 4\n", name="c.cfg")).epochs == 4  # Python
    for name in ("c.yaml", "c.toml"):
        path = tmp_path / name
        path.write_text("EPOCHS = 2\n")
        with pytest.raises(ConfigError, match=r"config files are Python .* not (YAML|TOML)"):
            load_file(str(path))


def test_unknown_arguments_get_the_commands_usage_and_a_hint(capsys):
    """argparse alone answers a subcommand's unknown option with the top-level usage: the
    command's own usage instead, the closest options, and where a stray path belongs."""
    with pytest.raises(SystemExit) as e:
        main(["eval", "runs/x", "--bset"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: moesaic eval" in err
    assert "--bset (did you mean --best or --set?)" in err or \
        "--bset (did you mean --set or --best?)" in err
    with pytest.raises(SystemExit):
        main(["train", "runs/x"])
    err = capsys.readouterr().err
    assert "usage: moesaic train" in err and "runs/x (train takes no positional argument: " \
        "--config FILE" in err
    with pytest.raises(SystemExit):
        main(["train", "--confg", "a.py"])
    err = capsys.readouterr().err
    assert "--confg (did you mean --config" in err and "a.py (train takes" not in err
    with pytest.raises(SystemExit):
        main(["train", "--set", "lr=1", "epochs=2"])
    assert "epochs=2 (each KEY=VALUE needs its own --set: --set epochs=2)" in \
        capsys.readouterr().err


def test_set_nan_and_other_tools_names():
    """--set lr=nan is a number that must be finite (not a string of the wrong type); grad_accum
    (other tools' name) points at accum_steps first."""
    with pytest.raises(ConfigError, match=r"^lr must be finite, got nan$"):
        apply_overrides(TrainConfig(), ["lr=nan"])
    with pytest.raises(ConfigError, match=r"^warmup_epochs must be finite, got -inf$"):
        apply_overrides(TrainConfig(), ["warmup_epochs=-inf"])
    assert apply_overrides(TrainConfig(), ["name=inf"]).name == "inf"
    with pytest.raises(ConfigError, match=r"lr: expected float, got '\+-inf'"):
        apply_overrides(TrainConfig(), ["lr=+-inf"])
    with pytest.raises(ConfigError, match=r"'grad_accum' \(from --set\); did you mean: "
                       r"accum_steps"):
        apply_overrides(TrainConfig(), ["grad_accum=2"])
