"""End-to-end runs in this process: tiny CIFAR-format runs, the embedded default, exact resume,
a non-finite loss, missing data."""
import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch

import moesaic
from moesaic.__main__ import main
from moesaic.train import checkpoint, loop, setup
from moesaic.train.config import load_file
from test_train_data import write_cifar

TINY_MODEL = {"depth": 2, "d_model": 32, "num_heads": 2, "patch_size": 8, "num_experts": 4}
# every random layer and augmentation on (layout- and micro-batch-independence tests)
RANDOM_LAYERS = {"noise_policy": "gaussian", "drop_rate": 0.1, "attn_drop": 0.1,
                 "drop_path": 0.2, "hidden_dropout": 0.1}
RANDOM_AUGMENT = dict(CROP_PADDING=4, HFLIP=True, RANDAUG_OPS=1, MIXUP_ALPHA=0.8,
                      CUTMIX_ALPHA=1.0, MIX_PROB=1.0)


def tiny_config(path, data_dir, **extra):
    """A CIFAR config file for a tiny ViT-MoE: 2 steps per epoch of 40 images."""
    values = dict(NAME="tiny", MODEL="vit_moe_tiny", MODEL_ARGS=TINY_MODEL, DATASET="cifar10",
                  DATA_DIR=str(data_dir), BATCH_SIZE=40, EVAL_BATCH_SIZE=40, EPOCHS=2,
                  STEPS_PER_EPOCH=2, LR=1e-3, WARMUP_EPOCHS=1, CHECKPOINT_EVERY=1,
                  KEEP_CHECKPOINTS=5, PROGRESS=False, PLOTS=False, THREADS=1)
    values.update(extra)
    with open(path, "w") as f:
        f.writelines(f"{k} = {v!r}\n" for k, v in values.items())
    return str(path)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_tiny_cifar_run_writes_the_run_dir(tmp_path):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, PLOTS=True, CROP_PADDING=4, HFLIP=True,
                      AUTO_AUGMENT="cifar10", RANDAUG_OPS=1, MIXUP_ALPHA=0.8, CUTMIX_ALPHA=1.0,
                      WD_EXCLUDE_NORM_BIAS_EMBED=True, LABEL_SMOOTHING=0.1)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    for f in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "expert_load.png",
              "checkpoints/latest.json", "checkpoints/best.json"):
        assert os.path.exists(os.path.join(run, f)), f
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert sorted(summary) == sorted(["best_eval_accuracy", "final_eval_accuracy", "epochs",
                                      "train_images_per_second", "params_total",
                                      "params_active_per_token", "world_size", "device",
                                      "ep_size", "throughput_from_epoch"])
    assert summary["world_size"] == 1 and summary["device"] == "cpu"
    assert summary["throughput_from_epoch"] == 1
    assert summary["epochs"] == 2 and summary["params_total"] > summary["params_active_per_token"]
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    moe = recs[-1]["moe"]
    assert len(moe) == 1 and len(moe[0]["token_share"]) == 4
    assert abs(sum(moe[0]["token_share"]) - 1) < 1e-6 and 0 <= moe[0]["dropped_fraction"] < 1
    for k in ("train_loss", "eval_loss", "train_accuracy", "eval_accuracy", "lr",
              "images_per_second", "dropped_fraction"):
        assert k in recs[-1]
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["auto_augment"] == "cifar10"


def test_eval_command_reproduces_the_recorded_accuracy(tmp_path, capsys):
    """`moesaic eval` rebuilds the checkpoint's model and gets the accuracy the run recorded."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    recs = read_metrics(run)
    capsys.readouterr()
    assert main(["eval", run, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epoch"] == 2 and out["eval_accuracy"] == recs[-1]["eval_accuracy"]
    assert out["eval_loss"] == pytest.approx(recs[-1]["eval_loss"], rel=1e-6)
    assert [m["name"] for m in out["moe"]] == ["blocks.1.ffn"]
    best = max(recs, key=lambda r: r["eval_accuracy"])
    assert main(["eval", run, "--best"]) == 0
    text = capsys.readouterr().out
    assert f"(epoch {best['epoch']}): eval loss" in text and "token shares" in text
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    assert "no checkpoint at" in capsys.readouterr().err
    with warnings.catch_warnings():  # the schedule's warnings concern training only
        warnings.simplefilter("error")
        assert main(["eval", run, "--set", "warmup_epochs=5", "--set", "min_lr=1e-5",
                     "--set", "schedule='constant'"]) == 0
    assert main(["eval", run, "--set", "lr=-1"]) == 2
    assert main(["eval", run, "--set", "max_ep_size=2"]) == 2
    assert "max_ep_size (2) does not divide the world size (1)" in capsys.readouterr().err


def test_missing_data_fails_clearly(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "c.py", tmp_path / "nowhere")
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "CIFAR-10 not found" in err and "nowhere" in err and "data_batch_1" in err


def test_embedded_default_runs_a_few_steps(tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", "--set", "max_steps=3", "--set", "progress=False", "--run-dir", run]) == 0
    recs = read_metrics(run)
    assert len(recs) == 1 and recs[0]["step"] == 3 and recs[0]["train_images"] == 3 * 64
    assert 0 <= recs[0]["eval_accuracy"] <= 1


def test_bf16_autocast_trains_on_cpu(tmp_path, capsys):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1, PRECISION="bf16")
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    (rec,) = read_metrics(run)
    assert rec["step"] == 2 and 0 < rec["train_loss"] < 10 and 0 < rec["eval_loss"] < 10
    assert "device cpu, precision bf16," in capsys.readouterr().out


def test_grad_checkpointing_trains_exactly_like_stored_activations(tmp_path):
    """Recomputed blocks (router noise, dropout and capacity drops on) give the same run."""
    write_cifar(str(tmp_path))
    args = {**TINY_MODEL, "noise_policy": "gaussian", "drop_rate": 0.1, "capacity_factor": 0.8}
    runs = []
    for on in (False, True):
        cfg = tiny_config(tmp_path / f"c{on}.py", tmp_path, MODEL_ARGS=args, GRAD_CHECKPOINTING=on)
        runs.append(str(tmp_path / f"run{on}"))
        assert main(["train", "--config", cfg, "--run-dir", runs[-1]]) == 0
    a, b = read_metrics(runs[0]), read_metrics(runs[1])
    keys = ("train_loss", "train_aux", "eval_loss", "eval_accuracy", "moe")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]


def test_grad_checkpointing_needs_a_model_that_supports_it(monkeypatch):
    monkeypatch.setattr(setup.models, "create", lambda name, **kw: torch.nn.Linear(2, 2))
    cfg = moesaic.train.config.TrainConfig(grad_checkpointing=True)
    try:
        setup.build_model(cfg, (1, 8, 8), 10)
    except loop.ConfigError as e:
        assert "grad_checkpointing=True" in str(e) and "Linear" in str(e)
    else:
        raise AssertionError("a model without set_grad_checkpointing was accepted")


def test_resume_equals_uninterrupted(tmp_path):
    """Noise, dropout and mixup all draw random numbers, and auxiliary-loss-free balancing
    keeps selection biases: resuming from epoch 1 must replay epochs 2 and 3 bit for bit."""
    write_cifar(str(tmp_path))
    extra = dict(EPOCHS=3, MIXUP_ALPHA=0.5, CROP_PADDING=2,
                 MODEL_ARGS={**TINY_MODEL, "noise_policy": "jitter", "drop_rate": 0.1,
                             "bias_update_rate": 0.01})
    cfg = tiny_config(tmp_path / "c.py", tmp_path, **extra)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", "--config", cfg, "--run-dir", full]) == 0
    ckpt = os.path.join(full, "checkpoints", "epoch_0001")
    assert main(["train", "--resume", ckpt, "--run-dir", part]) == 0  # config from checkpoint
    a, b = read_metrics(full), read_metrics(part)
    assert len(a) == len(b) == 3
    keys = ("step", "lr", "train_loss", "train_aux", "train_accuracy", "eval_loss",
            "eval_accuracy", "moe")
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    wa = checkpoint._load_tensors(os.path.join(full, "checkpoints/epoch_0003/model.safetensors"))
    wb = checkpoint._load_tensors(os.path.join(part, "checkpoints/epoch_0003/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert wa["blocks.1.ffn.router.expert_bias"].abs().sum() > 0  # the trainer updated them
    assert main(["train", "--resume", part, "--set", "epochs=4"]) == 0  # longer, same run dir
    c = read_metrics(part)
    assert [r["epoch"] for r in c] == [1, 2, 3, 4] and c[:3] == b


def test_resume_with_another_batch_size_keeps_the_lr_schedule_by_epoch(tmp_path, capsys):
    """Steps per epoch change with the batch size: the resumed schedule goes on from the end of
    the checkpoint's epoch (in the new steps) down to min_lr at the last epoch, and says so."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2, WARMUP_EPOCHS=0, MIN_LR=1e-5)
    first, same, other = (str(tmp_path / n) for n in ("first", "same", "other"))
    assert main(["train", "--config", cfg, "--run-dir", first]) == 0
    assert main(["train", "--resume", first, "--run-dir", same, "--set", "epochs=4"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", first, "--run-dir", other, "--set", "epochs=4",
                 "--set", "batch_size=8", "--set", "steps_per_epoch=None"]) == 0
    out = capsys.readouterr().out
    assert "steps per epoch changed" in out
    assert ("resumed with other settings from here on: batch_size 40 -> 8, epochs 2 -> 4, "
            "steps_per_epoch 2 -> None") in out
    lrs = [r["lr"] for r in read_metrics(other)]
    assert lrs == pytest.approx([r["lr"] for r in read_metrics(same)], rel=1e-9)
    steps = [r["step"] for r in read_metrics(other)]
    assert steps[:2] == [2, 4] and steps[3] - steps[2] == steps[2] - 4 > 2  # more per epoch


def test_max_steps_inside_an_epoch_then_resume_equals_uninterrupted(tmp_path, capsys):
    """A stop inside epoch 2 records the partial epoch but checkpoints nothing for it, so the
    resumed run redoes epoch 2 and ends bit-equal to the uninterrupted run."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3,
                      MODEL_ARGS={**TINY_MODEL, "noise_policy": "jitter"})
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert main(["train", "--config", cfg, "--run-dir", full]) == 0
    assert main(["train", "--config", cfg, "--run-dir", part, "--set", "max_steps=3"]) == 0
    assert "after 1 of 2 steps of epoch 2" in capsys.readouterr().out
    recs = read_metrics(part)
    assert [(r["epoch"], r["step"], r.get("partial_steps")) for r in recs] == [(1, 2, None), (2, 3, 1)]
    with open(os.path.join(part, "summary.json")) as f:
        assert json.load(f)["epochs"] == 1  # completed epochs: the partial one does not count
    assert sorted(os.listdir(os.path.join(part, "checkpoints"))) == ["best.json", "epoch_0001",
                                                                     "latest.json"]
    assert main(["train", "--resume", part, "--set", "max_steps=None"]) == 0
    a, b = read_metrics(full), read_metrics(part)
    keys = ("epoch", "step", "lr", "train_loss", "eval_loss", "eval_accuracy", "moe")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    wa = checkpoint._load_tensors(os.path.join(full, "checkpoints/epoch_0003/model.safetensors"))
    wb = checkpoint._load_tensors(os.path.join(part, "checkpoints/epoch_0003/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_dir_holding_a_run_is_refused_and_resume_keeps_latest(tmp_path, capsys):
    """A new run into a used --run-dir fails before touching it; resuming from an early
    checkpoint into the same dir never prunes the checkpoint it has just written."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=4, KEEP_CHECKPOINTS=3)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    before = read_metrics(run)
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--run-dir", run, "--set", "epochs=1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert read_metrics(run) == before
    other = str(tmp_path / "other")  # stopped before its first checkpoint: reusable
    assert main(["train", "--config", cfg, "--run-dir", other, "--set", "max_steps=1"]) == 0
    assert main(["train", "--config", cfg, "--run-dir", other, "--set", "epochs=1"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", other, "--run-dir", run]) == 2  # another run's dir
    assert "already holds a run" in capsys.readouterr().err
    blocked = os.path.join(run, "metrics.jsonl", "sub")  # a file in the way
    assert main(["train", "--config", cfg, "--run-dir", blocked]) == 2
    assert "cannot create the run dir" in capsys.readouterr().err
    assert read_metrics(run) == before
    early = os.path.join(run, "checkpoints", "epoch_0002")
    assert main(["train", "--resume", early, "--set", "epochs=3", "--set", "keep_checkpoints=1"]) == 0
    assert checkpoint.find(run) == os.path.join(run, "checkpoints", "epoch_0003.1")
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3]


def test_damaged_checkpoints_give_clear_errors(tmp_path, capsys):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    capsys.readouterr()
    ck = os.path.join(run, "checkpoints")
    assert main(["train", "--resume", run, "--set", "model_args.d_model=16"]) == 1
    err = capsys.readouterr().err
    assert "does not fit this model" in err
    assert "this run's model differs from the checkpoint's: model_args.d_model: 32 -> 16" in err
    assert main(["train", "--resume", run, "--set", "model_args.num_experts=8"]) == 1
    err = capsys.readouterr().err
    assert "the state dict holds 4 experts (shape (4, " in err and "the model 8" in err
    assert "model_args.num_experts: 4 -> 8" in err
    with open(os.path.join(ck, "epoch_0002", "model.safetensors"), "r+b") as f:
        f.truncate(100)
    assert main(["train", "--resume", run, "--set", "epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "epoch_0002 is damaged" in err and os.path.join(ck, "epoch_0001") in err
    with open(os.path.join(ck, "epoch_0002", "state.pt"), "r+b") as f:
        f.truncate(100)
    assert main(["train", "--resume", run]) == 1  # state.pt is read first, for the config
    assert "epoch_0002 is damaged" in capsys.readouterr().err
    with open(os.path.join(ck, "latest.json"), "w") as f:
        f.write('{"na')
    assert main(["train", "--resume", run]) == 1
    assert "latest.json is unreadable" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume(tmp_path, monkeypatch, capsys):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    step = loop.Trainer.train_step

    def interrupt_in_epoch_2(self, idx_b, i):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self, idx_b, i)

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_in_epoch_2)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 130
    err = capsys.readouterr().err
    assert f"interrupted at step 3 (epoch 2); continue with: moesaic train --resume {run}" in err


def test_resume_hint_names_the_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/moesaic", "train"])
    assert setup.launcher() == "moesaic train"
    monkeypatch.setattr(sys, "argv", ["/venv/lib/pytest/__main__.py"])  # python3 -m pytest
    assert setup.launcher() == "moesaic train"
    main_py = os.path.join(os.path.dirname(moesaic.__file__), "__main__.py")
    monkeypatch.setattr(sys, "argv", [main_py, "train"])  # python3 -m moesaic
    assert setup.launcher() == "python3 -m moesaic train"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert setup.launcher() == "torchrun --nproc_per_node=2 -m moesaic train"
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert setup.launcher() == "torchrun --nproc_per_node=2 --nnodes=4 ... -m moesaic train"


def test_sigterm_stops_like_ctrl_c(tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM (preemption) stops with the resume hint, not a silent death."""
    import signal
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    step = loop.Trainer.train_step

    def terminated_in_epoch_2(self, idx_b, i):
        if self.step == 3:  # never a real SIGTERM to pytest unless our handler is there
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None, before)
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, idx_b, i)

    monkeypatch.setattr(loop.Trainer, "train_step", terminated_in_epoch_2)
    before = signal.getsignal(signal.SIGTERM)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 130
    assert "interrupted at step 3 (epoch 2); continue with" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before
    assert checkpoint.find(run).endswith("epoch_0001")


def test_resume_of_an_earlier_checkpoint_points_latest_at_it(tmp_path, capsys):
    """After resuming epoch 1 of a 3-epoch run into its own dir, `--resume RUN_DIR` (the hint
    an interrupt prints) continues from epoch 1's line of work, not the abandoned epoch 3."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    early = os.path.join(run, "checkpoints", "epoch_0001")
    assert main(["train", "--resume", early, "--set", "max_steps=3"]) == 0  # stops in epoch 2
    assert checkpoint.find(run) == early
    assert main(["train", "--resume", run, "--set", "epochs=2"]) == 0
    assert "resumed from " + early in capsys.readouterr().out
    capsys.readouterr()
    assert main(["train", "--resume", run, "--set", "epochs=1"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["epochs"] == 2  # a resume that trains nothing rewrites nothing


def test_a_max_steps_stop_at_an_epoch_end_says_so(tmp_path, capsys):
    """max_steps reached at the end of an epoch, and a resume with it still set, say why they
    stop and how to go on."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run, "--set", "max_steps=2"]) == 0
    assert "stopped by max_steps=2 at the end of epoch 1 of 3" in capsys.readouterr().out
    assert main(["train", "--resume", run, "--set", "lr=0.5"]) == 0
    assert ("max_steps=2 already reached at step 2: nothing to train (--set max_steps=None"
            in capsys.readouterr().out)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["lr"] != 0.5  # a resume that trains nothing rewrites nothing


def test_max_ep_size_that_does_not_divide_the_world(tmp_path, monkeypatch, capsys):
    import argparse
    from moesaic import __main__ as cli
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    assert main(["train", "--config", cfg, "--set", "max_ep_size=2"]) == 2
    assert "config: max_ep_size (2) does not divide the world size (1)" in capsys.readouterr().err
    saved = {"config": {**moesaic.train.config.TrainConfig(max_ep_size=2).to_dict()}}
    monkeypatch.setattr(checkpoint, "find", lambda path: path)
    monkeypatch.setattr(checkpoint, "read_state", lambda path: saved)
    args = argparse.Namespace(config=None, resume="ck", overrides=[])
    with pytest.warns(UserWarning, match="max_ep_size=2 from the checkpoint's config does not"):
        assert cli._resolve_config(args).max_ep_size is None  # also what `moesaic eval` uses
    args.overrides = ["MAX_EP_SIZE=1"]
    assert cli._resolve_config(args).max_ep_size == 1


def test_resume_with_another_model_warns(tmp_path):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    with pytest.warns(UserWarning, match=r"another model \(model_args\.num_heads: 2 -> 4\)"):
        assert main(["train", "--resume", run, "--set", "epochs=2",
                     "--set", "model_args.num_heads=4"]) == 0


def test_init_from_starts_a_new_run_from_the_weights(tmp_path, capsys):
    """init_from: the new run's model starts with the checkpoint's weights (any layout), at
    epoch 0 with a fresh optimizer, and trains; resuming that run ignores init_from. Other
    statistics warn; the same ones spelt out (None resolved to them there) do not."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    first = str(tmp_path / "first")
    assert main(["train", "--config", cfg, "--run-dir", first]) == 0
    ckpt = checkpoint.find(first)
    saved = checkpoint._load_tensors(os.path.join(ckpt, "model.safetensors"))
    from moesaic.train.config import apply_overrides, load_file
    bad = apply_overrides(load_file(cfg), [f"init_from={str(tmp_path / 'nowhere')!r}"])
    with pytest.raises(checkpoint.CheckpointError, match="init_from: no checkpoint at"):
        loop.Trainer(bad, str(tmp_path / "never"))
    with pytest.raises(checkpoint.CheckpointError, match=r"it holds runs: name one, e.g. .*first "
                                                         r"\(the newest of 1\)"):
        checkpoint.find(str(tmp_path))
    assert not os.path.exists(tmp_path / "never")  # found out before anything was written
    inputs = checkpoint.read_state(ckpt)["inputs"]  # the statistics None resolved to
    same = apply_overrides(load_file(cfg), [f"init_from={first!r}",
                                            f"norm_mean={tuple(inputs['norm_mean'])!r}",
                                            f"norm_std={tuple(inputs['norm_std'])!r}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spelt out, the same statistics do not warn
        loop.Trainer(same, str(tmp_path / "same"))
    moesaic.destroy()
    tuned = apply_overrides(load_file(cfg), ["seed=7", f"init_from={first!r}",
                                             "norm_std=(0.25, 0.25, 0.25)"])
    with pytest.warns(UserWarning, match=r"trained on other inputs \(norm_std: \[0\.\d+, "):
        trainer = loop.Trainer(tuned, str(tmp_path / "tuned"))
    assert trainer.cfg.init_from == os.path.abspath(first)
    assert trainer.epoch == 0 and not trainer.opt.state
    full = moesaic.full_state_dict(trainer.model)
    assert full.keys() == saved.keys()
    for k in saved:
        torch.testing.assert_close(full[k], saved[k], rtol=0, atol=0, msg=k)
    assert "initialised from the weights of" in capsys.readouterr().out
    trainer.run()
    moesaic.destroy()  # as the train command does at its end
    assert main(["train", "--resume", str(tmp_path / "tuned"), "--set", "epochs=2"]) == 0
    assert "initialised from" not in capsys.readouterr().out


def test_eval_at_start_leaves_training_unchanged(tmp_path, capsys):
    """eval_at_start evaluates before the first step without drawing random numbers: the run's
    metrics equal a run without it (timings aside); summary.json and the end table show it,
    and a resumed run keeps it."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, CROP_PADDING=2,
                      MODEL_ARGS={**TINY_MODEL, "noise_policy": "jitter", "drop_rate": 0.1})
    plain, first = str(tmp_path / "plain"), str(tmp_path / "first")
    assert main(["train", "--config", cfg, "--run-dir", plain]) == 0
    assert main(["train", "--config", cfg, "--run-dir", first, "--set", "eval_at_start=True"]) == 0
    out = capsys.readouterr().out
    assert "before training: eval loss" in out and "eval accuracy before training" in out
    timing = ("images_per_second", "train_time_s", "eval_time_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in timing} for r in recs]
    assert strip(read_metrics(plain)) == strip(read_metrics(first))
    with open(os.path.join(first, "summary.json")) as f:
        initial = json.load(f)["initial_eval_accuracy"]
    assert 0 <= initial <= 1
    assert main(["train", "--resume", first, "--set", "epochs=3"]) == 0
    assert "before training: eval loss" not in capsys.readouterr().out  # not evaluated again
    with open(os.path.join(first, "summary.json")) as f:
        assert json.load(f)["initial_eval_accuracy"] == initial


def test_restart_resumes_its_own_checkpoint_without_reading_init_from(tmp_path, monkeypatch,
                                                                      capsys):
    """A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) into a run dir with a checkpoint
    resumes that checkpoint: init_from is not read (here it is damaged) and not logged."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    first = str(tmp_path / "first")
    assert main(["train", "--config", cfg, "--run-dir", first]) == 0
    tuned = str(tmp_path / "tuned")
    assert main(["train", "--config", cfg, "--run-dir", tuned, "--set",
                 f"init_from={first!r}"]) == 0
    with open(os.path.join(checkpoint.find(first), "model.safetensors"), "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main(["train", "--config", cfg, "--run-dir", tuned, "--set", f"init_from={first!r}",
                 "--set", "epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "initialised from" not in out
    assert [r["epoch"] for r in read_metrics(tuned)] == [1, 2]


def test_a_fresh_launch_with_a_repeated_elastic_key_starts_a_new_run(tmp_path, monkeypatch):
    """torchrun's default run id is "none": a later job in the same container has the same
    key, and must start a run of its own unless it is a restart."""
    from moesaic.train import rundir
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    first, again = rundir.choose(str(tmp_path), "x", None)
    assert not again and rundir.holds_run(first) is False
    os.makedirs(os.path.join(first, "checkpoints"), exist_ok=True)
    open(os.path.join(first, "checkpoints", "latest.json"), "w").close()
    second, again = rundir.choose(str(tmp_path), "x", None)
    assert second != first and not again
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert rundir.choose(str(tmp_path), "x", None) == (second, True)


def test_fine_tune_a_cifar10_run_on_cifar100(tmp_path, capsys):
    """init_from across label sets: every weight but the classifier comes from the CIFAR-10
    run; the 100-class head starts anew (the log says so) and trains."""
    from test_train_data import write_cifar100
    write_cifar(str(tmp_path))
    write_cifar100(str(tmp_path), n_train=80)
    first = str(tmp_path / "c10")
    assert main(["train", "--config", tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1),
                 "--run-dir", first]) == 0
    saved = checkpoint._load_tensors(os.path.join(checkpoint.find(first), "model.safetensors"))
    cfg = tiny_config(tmp_path / "c100.py", tmp_path, EPOCHS=1, DATASET="cifar100",
                      INIT_FROM=first)
    run = str(tmp_path / "c100")
    with pytest.warns(UserWarning, match="trained on other inputs .dataset: 'cifar10' there"):
        assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    assert "head.weight and head.bias initialised anew for 100 classes" in capsys.readouterr().out
    tuned = checkpoint._load_tensors(os.path.join(checkpoint.find(run), "model.safetensors"))
    assert tuned["head.weight"].shape == (100, TINY_MODEL["d_model"])
    assert tuned.keys() == saved.keys()
    assert read_metrics(run)[0]["epoch"] == 1


def test_upcycle_a_dense_run_into_an_moe_run(tmp_path, capsys):
    """init_from a dense run (num_experts=0) with upcycle=True: each expert starts as the
    dense MLP at its place, the rest is the dense run's, and it trains; without upcycle the
    error says to set it; an MoE checkpoint, or upcycle without init_from, is refused."""
    from moesaic.train.config import ConfigError
    write_cifar(str(tmp_path))
    dense_run = str(tmp_path / "dense")
    cfg = tiny_config(tmp_path / "d.py", tmp_path, EPOCHS=1,
                      MODEL_ARGS={**TINY_MODEL, "num_experts": 0})
    assert main(["train", "--config", cfg, "--run-dir", dense_run]) == 0
    dense = checkpoint._load_tensors(os.path.join(checkpoint.find(dense_run), "model.safetensors"))
    moe_cfg = tiny_config(tmp_path / "m.py", tmp_path, EPOCHS=1, INIT_FROM=dense_run,
                          MODEL_ARGS={**TINY_MODEL, "top_k": 2})
    capsys.readouterr()
    assert main(["train", "--config", moe_cfg, "--run-dir", str(tmp_path / "no")]) == 1
    assert ("dense MLPs where this model has MoE layers (blocks.1.ffn): set upcycle=True"
            in capsys.readouterr().err)
    assert not os.path.exists(tmp_path / "no")  # found out before anything was written
    from moesaic.train.config import apply_overrides, load_file
    trainer = loop.Trainer(apply_overrides(load_file(moe_cfg), ["upcycle=True",
                                                                "eval_at_start=True"]),
                           str(tmp_path / "up"))
    assert "upcycled (each dense MLP copied into every expert) from" in capsys.readouterr().out
    layer = trainer.model.blocks[1].ffn
    for e in range(4):
        torch.testing.assert_close(layer.experts.w1[e], dense["blocks.1.ffn.fc1.weight"].t(),
                                   rtol=0, atol=0)
    torch.testing.assert_close(trainer.model.patch_embed.proj.weight,
                               dense["patch_embed.proj.weight"], rtol=0, atol=0)
    summary = trainer.run()
    moesaic.destroy()
    moe_run = str(tmp_path / "up")
    assert read_metrics(moe_run)[0]["epoch"] == 1
    # top-2 normalised weights, eval capacity for every token: it starts where the dense run ended
    assert summary["initial_eval_accuracy"] == read_metrics(dense_run)[-1]["eval_accuracy"]
    assert "before training: eval loss" in capsys.readouterr().out
    capsys.readouterr()
    assert main(["train", "--config", moe_cfg, "--run-dir", str(tmp_path / "no"),
                 "--set", f"init_from={moe_run!r}", "--set", "upcycle=True"]) == 1
    assert "already holds experts (at blocks.1.ffn" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "no")
    with pytest.raises(ConfigError, match="upcycle=True needs init_from"):
        loop.Trainer(apply_overrides(load_file(cfg), ["upcycle=True"]), str(tmp_path / "no"))


def test_missing_matplotlib_trains_without_plots(tmp_path, monkeypatch):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    find_spec = loop.importlib.util.find_spec
    monkeypatch.setattr(loop.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "r2"),
                     "--set", "plots=True"]) == 0
    assert not os.path.exists(tmp_path / "r2" / "curves.png")


def test_crop_padding_of_an_image_side_or_more_warns(tmp_path):
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, CROP_PADDING=32)
    with pytest.warns(UserWarning, match=r"crop_padding \(32\) is not below the image side "
                                         r"\(32\): some random crops hold no pixel"):
        loop.Trainer(load_file(cfg), str(tmp_path / "r"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    write_cifar(str(tmp_path))
    build = loop.build_model

    def poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        forward, calls = model.forward, [0]

        def nan_after_three(x, **kw):
            logits, *rest = forward(x, **kw)
            if model.training:
                calls[0] += 1
                if calls[0] >= 4:
                    logits = logits * float("nan")
            return (logits, *rest)

        model.forward = nan_after_three
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "at step 4 (epoch 2, batch 2 of 2)" in err
    assert "epoch_0001" in err
    ck = checkpoint.find(run)
    assert ck.endswith("epoch_0001") and checkpoint.read_state(ck)["step"] == 2
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == [
        "best.json", "epoch_0001", "latest.json"]


def test_routing_meter_reports_expert_choice_untaken_tokens():
    """The epoch's dropped fraction is the layers' own: for expert choice, tokens no expert
    took (kept and routed counts are equal there, so they cannot show it)."""
    from moesaic.train.meters import RoutingMeter
    torch.manual_seed(0)
    layer = moesaic.MoE(8, 16, 4, router="expert_choice", capacity_factor=0.5)
    meter = RoutingMeter()
    for _ in range(3):
        meter.step([layer(torch.randn(32, 8), return_stats=True)[2]])
    (rec,) = meter.result(["moe"])
    assert rec["dropped_fraction"] >= 0.5 - 1e-9  # cf 0.5: at most half the tokens are taken
    assert abs(sum(rec["token_share"]) - 1) < 1e-9


def test_summary_says_when_the_best_epoch_is_a_partial_one():
    from moesaic.train.report import end_table
    hist = [{"epoch": 1, "eval_accuracy": 0.5, "dropped_fraction": 0.0},
            {"epoch": 2, "eval_accuracy": 0.7, "dropped_fraction": 0.0, "partial_steps": 1}]
    s = {"best_eval_accuracy": 0.7, "final_eval_accuracy": 0.7, "epochs": 2,
         "train_images_per_second": 1.0, "params_total": 10, "params_active_per_token": 5}
    text = end_table(s, hist, "run")
    assert "70.00% (epoch 2, partial: not checkpointed)" in text
    assert "| 1 " in text.split("train images/s")[1].splitlines()[0]  # no set-up recorded
    for world, says in ((1, "1 (1 process, cpu)"), (2, "1 (2 processes, cpu)")):
        assert says in end_table({**s, "world_size": world, "device": "cpu"}, hist, "run")
    resumed = {**s, "world_size": 2, "device": "cpu", "ep_size": [2], "throughput_from_epoch": 2}
    assert "1 (2 processes, cpu, ep 2; epochs 2-2)" in end_table(resumed, hist, "run")


def test_throughput_counts_the_last_layout_only():
    """A run resumed on another layout: images/s of the epochs on the last one."""
    from moesaic.train.report import summary
    rec = lambda epoch, world, ep, imgs, secs: {
        "epoch": epoch, "eval_accuracy": 0.5, "world_size": world, "ep_size": ep,
        "train_images": imgs, "train_time_s": secs}
    hist = [rec(1, 1, [1], 4000, 1.0), rec(2, 1, [1], 4000, 1.0), rec(3, 2, [2], 1000, 1.0),
            rec(4, 2, [2], 3000, 1.0)]
    s = summary(hist, 10, 5)
    assert s["train_images_per_second"] == 2000.0 and s["throughput_from_epoch"] == 3
    s = summary(hist[:3] + [rec(4, 2, [1], 3000, 1.0)], 10, 5)  # experts replicated now
    assert s["train_images_per_second"] == 3000.0 and s["throughput_from_epoch"] == 4
    old = [{k: v for k, v in r.items() if k not in ("world_size", "ep_size")} for r in hist]
    assert summary(old, 10, 5)["train_images_per_second"] == 3000.0  # unrecorded: one layout


def test_progress_bar_shows_finite_running_loss(tmp_path, monkeypatch):
    """The bar's loss is the mean since its last update (on a CPU run it once read 0/0)."""
    import tqdm
    shown = []

    class Bar(tqdm.tqdm):
        def set_postfix(self, **kw):
            shown.append(kw)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(loop, "BAR_EVERY", 1)
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, PROGRESS=True, STEPS_PER_EPOCH=3, EPOCHS=1)
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "a")]) == 0
    assert shown == []  # stderr is no terminal here: no bar (a log file gets no bar fragments)
    monkeypatch.setattr(loop.sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "run")]) == 0
    assert len(shown) == 3 and all(math.isfinite(float(kw["loss"])) for kw in shown), shown


def test_accumulated_micro_batches_train_like_the_whole_batch(tmp_path):
    """accum_steps 2 runs each batch as two forward/backward passes and one optimizer step:
    every random number is keyed by image (augmentation, mixup/cutmix partners, dropout,
    stochastic depth, attention dropout, router noise, hidden dropout), so with nothing else
    that depends on the micro-batch (dropless, no balance loss) the run equals the whole-batch
    run to float32 rounding."""
    write_cifar(str(tmp_path))
    args = {**TINY_MODEL, "drop_tokens": False, "top_k": 2, **RANDOM_LAYERS}
    runs = []
    for accum in (1, 2):
        cfg = tiny_config(tmp_path / f"a{accum}.py", tmp_path, MODEL_ARGS=args,
                          AUX_LOSS_WEIGHT=0.0, ACCUM_STEPS=accum, **RANDOM_AUGMENT,
                          GRAD_CHECKPOINTING=accum == 2)  # recomputation replays the keys
        runs.append(str(tmp_path / f"accum{accum}"))
        assert main(["train", "--config", cfg, "--run-dir", runs[-1]]) == 0
    a, b = read_metrics(runs[0]), read_metrics(runs[1])
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("train_loss", "eval_loss"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key
        assert rb["train_images"] == ra["train_images"] == 80
        assert rb["moe"][0]["token_share"] == pytest.approx(ra["moe"][0]["token_share"])
    from moesaic.train.config import load_file

    # the gradients the optimizer sees (AdamW would hide a constant factor such as a missing 1/n)
    grads = []
    for accum in (1, 2):
        cfg = tiny_config(tmp_path / f"g{accum}.py", tmp_path, MODEL_ARGS=args,
                          AUX_LOSS_WEIGHT=0.0, ACCUM_STEPS=accum, CLIP_GRAD=None,
                          **RANDOM_AUGMENT)
        tr = loop.Trainer(load_file(cfg), str(tmp_path / f"grads{accum}"))
        seen = {}
        step = tr.scaler.step

        def spy(opt, tr=tr, seen=seen, step=step):
            seen.update({n: p.grad.clone() for n, p in tr.model.named_parameters()
                         if p.grad is not None})
            return step(opt)

        tr.scaler.step = spy
        tr.train_step(torch.arange(40), 0)
        grads.append(seen)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6,
                                   msg=name)

    odd = tiny_config(tmp_path / "odd.py", tmp_path, ACCUM_STEPS=8, MIXUP_ALPHA=0.8)
    with pytest.warns(UserWarning, match=r"each micro-batch holds an odd number of images \(5\)"):
        loop.Trainer(load_file(odd), str(tmp_path / "odd"))

    bad = tiny_config(tmp_path / "bad.py", tmp_path, ACCUM_STEPS=3)
    with pytest.raises(moesaic.train.config.ConfigError,
                       match=r"accum_steps \(3\) must divide each rank's share of the batch "
                             r"\(40 / 1 processes = 40\)"):
        loop.Trainer(load_file(bad), str(tmp_path / "never"))


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_progress_bar_draws_on_a_terminal_that_reports_no_size(tmp_path):
    """A pty opened without a size (0 x 0, as `script` or some CI runners give) still gets a
    bar, 80 columns wide (tqdm took such a terminal's rows as -1 and drew nothing)."""
    import pty
    import subprocess
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, PROGRESS=True, STEPS_PER_EPOCH=3, EPOCHS=1)
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "moesaic", "train", "--config", cfg,
                             "--run-dir", str(tmp_path / "run")], stderr=slave,
                            stdout=subprocess.DEVNULL, cwd=tmp_path)
    os.close(slave)
    shown = b""
    while True:  # read until the child closes the terminal (EIO on Linux)
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    assert b"epoch 1/1:" in shown and b"0/3" in shown, shown[-500:]
    assert b"eval:" in shown, shown[-500:]  # the evaluation has its bar too


def test_a_model_the_config_file_registers_evaluates_and_resumes_from_its_run(
        tmp_path, monkeypatch, capsys):
    """A model registered by a module the config file imports: the run records that module's
    file (model_module), so eval and a bare --resume rebuild it in a process that never read
    the config file; a moved file is named in the error."""
    from moesaic.models import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SUMMARY", dict(registry._SUMMARY))
    write_cifar(str(tmp_path))
    own = tmp_path / "own"
    own.mkdir()
    (own / "my_models.py").write_text(
        "import moesaic.models as M\n\n\n@M.register('my_tiny_vit')\n"
        "def my_tiny_vit(**kw):\n    return M.create('vit_moe_tiny', **kw)\n")
    cfg = tiny_config(own / "c.py", tmp_path, MODEL="my_tiny_vit", EPOCHS=1)
    with open(cfg, "a") as f:
        f.write("import my_models  # noqa: F401 - registers my_tiny_vit\n")
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 0
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["model_module"] == str(own / "my_models.py")
    for argv in (["eval", run], ["train", "--resume", run, "--set", "epochs=2"]):
        registry._REGISTRY.pop("my_tiny_vit")  # a new process: only the run dir to go on
        registry._SUMMARY.pop("my_tiny_vit")
        monkeypatch.delitem(sys.modules, "my_models", raising=False)
        assert main(argv) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    registry._REGISTRY.pop("my_tiny_vit")
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    os.rename(own / "my_models.py", own / "moved.py")
    assert main(["eval", run]) == 2
    assert (f"model_module {str(own / 'my_models.py')!r} does not exist (it registers model "
            "'my_tiny_vit'" in capsys.readouterr().err)


def test_model_module_from_a_relative_config_that_registers_the_model_itself(
        tmp_path, monkeypatch, capsys):
    """A config file named by a relative path (and not a module name: exp.v2.py) that registers
    its model: the run records the file's absolute path, and eval from another directory
    imports it under a name of its own. A package module named in MODEL_MODULE is found
    beside the config; a model registered by the script being run is not recorded (warned)."""
    from moesaic.models import registry
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SUMMARY", dict(registry._SUMMARY))
    write_cifar(str(tmp_path))
    (tmp_path / "exps").mkdir()
    cfg = tiny_config(tmp_path / "exps" / "exp.v2.py", tmp_path, MODEL="self_tiny", EPOCHS=1)
    with open(cfg, "a") as f:
        f.write("import moesaic.models as M\n\n\n@M.register('self_tiny')\n"
                "def self_tiny(**kw):\n    return M.create('vit_moe_tiny', **kw)\n")
    monkeypatch.chdir(tmp_path / "exps")
    assert main(["train", "--config", "exp.v2.py", "--run-dir", "../run"]) == 0
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["model_module"] == str(tmp_path / "exps" / "exp.v2.py")
    registry._REGISTRY.pop("self_tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "run"]) == 0, capsys.readouterr().err

    pkg = tmp_path / "exps" / "zoo2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import moesaic.models as M\n\n\n@M.register('pkg_tiny')\n"
                                 "def pkg_tiny(**kw):\n    return M.create('vit_moe_tiny', **kw)\n")
    cfg = tiny_config(tmp_path / "exps" / "p.py", tmp_path, MODEL="pkg_tiny",
                      MODEL_MODULE="zoo2.nets", EPOCHS=1)
    assert load_file(cfg).model_module == str(pkg / "nets.py")
    assert main(["train", "--config", cfg, "--run-dir", "prun"]) == 0  # imported: registered
    assert "zoo2.nets" in sys.modules and sys.modules["zoo2.nets"].__package__ == "zoo2"
    monkeypatch.delitem(sys.modules, "zoo2.nets")
    monkeypatch.delitem(sys.modules, "zoo2")

    def main_tiny(**kw):
        return moesaic.models.create("vit_moe_tiny", **kw)
    main_tiny.__module__ = "__main__"
    moesaic.models.register("main_tiny")(main_tiny)
    cfg = tiny_config(tmp_path / "m.py", tmp_path, MODEL="main_tiny", EPOCHS=1)
    with pytest.warns(UserWarning, match="'main_tiny' is registered by the script being run"):
        assert main(["train", "--config", cfg, "--run-dir", "mrun"]) == 0
    with open(tmp_path / "mrun" / "config.json") as f:
        assert json.load(f)["model_module"] is None


def test_triton_kernels_on_cpu_refused_before_the_run_dir(tmp_path, monkeypatch, capsys):
    """model_args.kernels='triton' on a CPU without TRITON_INTERPRET=1: a config error naming
    the layer, exit 2, nothing written."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1)
    run = tmp_path / "run"
    assert main(["train", "--config", cfg, "--run-dir", str(run),
                 "--set", "model_args.kernels='triton'"]) == 2
    err = capsys.readouterr().err
    assert "error: config: blocks." in err and "kernels='triton'" in err
    assert not run.exists()


def test_closed_stdout_does_not_stop_training(tmp_path):
    """`moesaic train | head -1`: the reader goes away after one line; the run trains to its
    end (exit 0, every epoch recorded) and says once, on stderr, that stdout was closed."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "moesaic", "train", "--config", cfg,
                             "--run-dir", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(tmp_path))
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert err.count("stdout was closed") == 1, err
    assert [r["epoch"] for r in read_metrics(str(run))] == [1, 2, 3]
    proc = subprocess.Popen([sys.executable, "-m", "moesaic", "train", "--config", cfg,
                             "--run-dir", str(run) + "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=str(tmp_path))  # `2>&1 | head -1`
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0
    assert [r["epoch"] for r in read_metrics(str(run) + "2")] == [1, 2, 3]


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    """Atomic writes (metrics, summary, plots, checkpoint json) remove their temporary file
    when interrupted, and leave the old file as it was."""
    from moesaic.train import report
    path = tmp_path / "summary.json"
    path.write_text("old")

    def interrupted(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        report.replace_atomically(str(path), interrupted, ".png")
    assert os.listdir(tmp_path) == ["summary.json"] and path.read_text() == "old"


def test_heavy_token_dropping_is_pointed_out_once(tmp_path, capsys):
    """An epoch dropping more than half the assignments (capacity_factor 0.01) gets one note,
    naming the two fixes; the next epochs' lines do not repeat it."""
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2,
                      MODEL_ARGS={**TINY_MODEL, "capacity_factor": 0.01, "min_capacity": 1})
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert out.count("note: the MoE layers dropped") == 1
    assert "raise model_args.capacity_factor, or set model_args.drop_tokens=False" in out
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=1, MODEL_ARGS={
        **TINY_MODEL, "router": "expert_choice", "capacity_factor": 0.05})
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "ec")]) == 0
    out = capsys.readouterr().out  # expert choice cannot go dropless: not suggested
    assert "raise model_args.capacity_factor\n" in out and "drop_tokens" not in out


def test_a_signal_during_evaluation_stops_after_the_epochs_checkpoint(tmp_path, monkeypatch,
                                                                       capsys):
    """SIGTERM while epoch 1 is evaluated is noted; the epoch still finishes (metrics,
    checkpoint) and the run stops there with the resume hint, exit 130."""
    import signal
    write_cifar(str(tmp_path))
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=3)
    evaluate = loop.Trainer.evaluate

    def signalled(self):
        if self.step == 2:  # epoch 1's evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self)

    monkeypatch.setattr(loop.Trainer, "evaluate", signalled)
    run = str(tmp_path / "run")
    assert main(["train", "--config", cfg, "--run-dir", run]) == 130
    assert "interrupted at step 2 (epoch 2); continue with" in capsys.readouterr().err
    assert checkpoint.find(run).endswith("epoch_0001")
    assert [r["epoch"] for r in read_metrics(run)] == [1]


def test_a_second_signal_stops_at_once():
    import signal

    from moesaic.train.stops import StopRequests
    stops, before = StopRequests(), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with stops.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            assert stops.requested
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    assert signal.getsignal(signal.SIGINT) is before


def test_signals_around_evaluations(tmp_path, monkeypatch, capfd):
    """SIGTERM during eval_at_start lets it finish, then stops before the first step; during
    the last epoch's evaluation the run is complete and ends as usual (exit 0)."""
    import signal
    write_cifar(str(tmp_path))
    evaluate = loop.Trainer.evaluate
    at = {"step": 0}

    def signalled(self):
        if self.step == at["step"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self)

    monkeypatch.setattr(loop.Trainer, "evaluate", signalled)
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2, EVAL_AT_START=True)
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "a")]) == 130
    out, err = capfd.readouterr()
    assert "before training: eval loss" in out
    assert "SIGTERM: stopping after this step" in err and "interrupted at step 0 (epoch 1)" in err
    at["step"] = 4  # the last epoch's evaluation
    cfg = tiny_config(tmp_path / "c.py", tmp_path, EPOCHS=2)
    assert main(["train", "--config", cfg, "--run-dir", str(tmp_path / "b")]) == 0
    assert [r["epoch"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2]
