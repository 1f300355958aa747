"""Training under torchrun with 2 processes (gloo): expert parallelism (max_ep_size 2), a
checkpoint that loads in one process, and a rank killed mid-epoch under --max-restarts=1."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from moesaic.train import checkpoint
from moesaic.train.config import apply_overrides, load_file
from moesaic.train.loop import Trainer
from moesaic.train.setup import FAULT_RANK_ENV, FAULT_STEP_ENV
from test_train_data import write_cifar
from test_train_run import RANDOM_AUGMENT, RANDOM_LAYERS, TINY_MODEL, read_metrics, tiny_config

TIMING = ("images_per_second", "train_time_s", "eval_time_s")


def torchrun(args, extra_env=None, restarts=0, timeout=240):
    """``torchrun --standalone --nproc_per_node=2`` (it picks a free port) with a time limit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", "-m", "moesaic", "train", *args]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout + p.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """CIFAR-format data (41 test images: the ranks' eval shards differ by one, so capacity
    blocks differ), a tiny expert-parallel config (4 experts over 2 ranks, eval with room for
    every token) and one uninterrupted 2-process run of it."""
    root = tmp_path_factory.mktemp("dist")
    write_cifar(str(root), n_test=41)
    cfg = tiny_config(root / "c.py", root, MAX_EP_SIZE=2, PLOTS=True,
                      MODEL_ARGS={**TINY_MODEL, "eval_capacity_factor": 4.0})
    run = str(root / "uninterrupted")
    out = torchrun(["--config", cfg, "--run-dir", run])
    return root, cfg, run, out


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_two_process_training(setup):
    root, cfg, run, out = setup
    assert "2 process(es)" in out and "ep_size [2]" in out
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2] and recs[-1]["step"] == 4
    assert recs[-1]["train_images"] == 2 * 40  # the global batch, summed over ranks
    with open(os.path.join(run, "summary.json")) as f:
        assert json.load(f)["epochs"] == 2
    assert os.path.exists(os.path.join(run, "curves.png"))


def test_checkpoint_from_two_ranks_loads_in_one_process(setup, tmp_path):
    root, cfg_path, run, _ = setup
    ck = checkpoint.find(run)
    cfg = apply_overrides(load_file(cfg_path), ["max_ep_size=1", "epochs=3"])
    tr = Trainer(cfg, run_dir=str(tmp_path / "one"), resume=ck)
    assert tr.world == 1 and all(m.layout.ep_size == 1 for m in tr.model.moe_layers())
    assert tr.opt.defaults["fused"]  # fused AdamW on CPU, its step counts restored too
    saved = checkpoint._load_tensors(os.path.join(ck, "model.safetensors"))
    mine = tr.model.state_dict()
    assert saved.keys() == mine.keys()
    assert all(torch.equal(saved[k], mine[k]) for k in saved)
    moments = checkpoint._load_tensors(os.path.join(ck, "optimizer.safetensors"))
    for name, p in tr.model.named_parameters():  # AdamW state of all 4 experts, from 2 ranks
        assert torch.equal(tr.opt.state[p]["exp_avg"], moments[f"exp_avg/{name}"]), name
        assert torch.equal(tr.opt.state[p]["exp_avg_sq"], moments[f"exp_avg_sq/{name}"]), name
    assert tr.model.moe_layers()[0].experts.w1.shape[0] == 4
    assert (moments["exp_avg_sq/blocks.1.ffn.experts.w1"][2:] > 0).any()  # rank 1's experts
    _, acc = tr.evaluate()
    assert acc == read_metrics(run)[-1]["eval_accuracy"]
    summary = tr.run()  # one more epoch at max_ep_size 1, from the 2-rank optimizer state
    assert summary["epochs"] == 3


def test_killed_rank_restarts_and_finishes_like_uninterrupted(setup):
    root, cfg, run, _ = setup
    runs_root = str(root / "restarted")
    out = torchrun(["--config", cfg, "--set", f"runs_root={runs_root!r}"],
                   extra_env={FAULT_STEP_ENV: "3", FAULT_RANK_ENV: "1"}, restarts=1)
    assert "resumed from" in out and "epoch_0001" in out
    (again,) = glob.glob(os.path.join(runs_root, "tiny", "*"))
    assert _strip(read_metrics(again)) == _strip(read_metrics(run))
    with open(os.path.join(again, "summary.json")) as f, open(os.path.join(run, "summary.json")) as g:
        a, b = json.load(f), json.load(g)
    for k in ("best_eval_accuracy", "final_eval_accuracy", "epochs", "params_total"):
        assert a[k] == b[k]


def _same_training_at_both_layouts(root, name, model_args, extra=lambda ep: {},
                                   first_in_one_process=False,
                                   keys=("train_loss", "train_aux", "eval_loss")):
    """Runs of the tiny config at max_ep_size 1 and 2 (``extra(ep)``: more config values for
    each) train alike to float32 rounding; returns both runs' metrics. Both run on two
    processes, or the first in this one with ``first_in_one_process``."""
    metrics = []
    for ep in (1, 2):
        cfg = tiny_config(root / f"{name}{ep}.py", root, MAX_EP_SIZE=ep, MODEL_ARGS=model_args,
                          **extra(ep))
        run = str(root / f"{name}{ep}")
        if ep == 1 and first_in_one_process:
            Trainer(load_file(cfg), run_dir=run).run()
        else:
            torchrun(["--config", cfg, "--run-dir", run])
        metrics.append(read_metrics(run))
    a, b = metrics
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in keys:
            assert rb[key] == pytest.approx(ra[key], rel=1e-4), key
    return a, b


def test_training_does_not_depend_on_the_expert_layout(setup):
    """The mission's seeding promise end to end: two processes at max_ep_size 2 (experts split,
    all-to-all) and at max_ep_size 1 (experts replicated, data parallel) train the same model,
    router noise and dropout included, to float32 rounding."""
    args = {**TINY_MODEL, "noise_policy": "jitter", "drop_rate": 0.1}
    a, b = _same_training_at_both_layouts(setup[0], "layout", args)
    for ra, rb in zip(a, b):
        assert abs(rb["eval_accuracy"] - ra["eval_accuracy"]) <= 1 / 41 + 1e-9


@pytest.mark.parametrize("routing", ["dropless", "global_capacity"])
def test_two_processes_train_like_one(setup, routing, capsys):
    """The number of processes changes no random number: with every random layer and
    augmentation on (keyed by image), a 2-process expert-parallel run trains like one process
    on the whole batch, to float32 rounding: dropless without a balance loss, and with
    capacity drops and the balance loss when both are taken over the global batch
    (capacity_scope and balance_scope "global"). So a 2-process run resumed in one process
    continues as it would have on two."""
    root = setup[0]
    if routing == "dropless":
        args = {**TINY_MODEL, "top_k": 2, "drop_tokens": False, **RANDOM_LAYERS}
        extra = dict(AUX_LOSS_WEIGHT=0.0, **RANDOM_AUGMENT)
    else:
        args = {**TINY_MODEL, "top_k": 2, "capacity_factor": 0.5, "capacity_scope": "global",
                "balance_scope": "global", **RANDOM_LAYERS}
        extra = dict(**RANDOM_AUGMENT)
    _, two = _same_training_at_both_layouts(
        root, routing, args, lambda ep: extra,
        first_in_one_process=True, keys=("train_loss", "train_accuracy", "eval_loss"))
    with open(root / f"{routing}2" / "summary.json") as f:
        s = json.load(f)  # compare's "procs x device" column
    assert s["world_size"] == 2 and s["ep_size"] == [2] and s["throughput_from_epoch"] == 1
    assert all(r["world_size"] == 2 and r["ep_size"] == [2] for r in two)
    resumed = str(root / f"{routing}2_resumed_in_one")
    cfg = apply_overrides(load_file(str(root / f"{routing}2.py")), ["max_ep_size=None"])
    capsys.readouterr()
    Trainer(cfg, run_dir=resumed,
            resume=str(root / f"{routing}2" / "checkpoints" / "epoch_0001")).run()
    assert "the checkpoint trained on 2 process(es), this run on 1" in capsys.readouterr().out
    metrics = read_metrics(resumed)
    last = metrics[-1]
    assert last["epoch"] == 2 and [r["world_size"] for r in metrics] == [2, 1]
    for key in ("train_loss", "train_accuracy", "eval_loss"):
        assert last[key] == pytest.approx(two[-1][key], rel=1e-4), key


def test_two_process_run_upcycled_from_a_one_process_dense_run(setup, tmp_path):
    """upcycle=True under torchrun with the experts split over 2 ranks: each rank copies the
    dense MLPs into the experts it holds; the run trains, and its checkpoint holds all 4."""
    root, cfg, _, _ = setup
    dense = str(tmp_path / "dense")
    dense_cfg = apply_overrides(load_file(cfg), ["epochs=1", "max_ep_size=None",
                                                 "model_args.num_experts=0"])
    Trainer(dense_cfg, run_dir=dense).run()
    run = str(tmp_path / "up")
    out = torchrun(["--config", cfg, "--run-dir", run, "--set", "epochs=1", "--set",
                    f"init_from={dense!r}", "--set", "upcycle=True"])
    assert "upcycled (each dense MLP copied into every expert) from" in out and "ep_size [2]" in out
    assert out.count("upcycled (each dense MLP") == 1  # logged by rank 0 only
    saved = checkpoint._load_tensors(os.path.join(checkpoint.find(run), "model.safetensors"))
    assert saved["blocks.1.ffn.experts.w1"].shape[0] == 4


def test_deduplicated_dispatch_trains_like_replicated_experts(setup):
    """``dedup_tokens=True`` end to end: a dropless top-2 model limited to one of two expert
    groups (so each token's experts share a rank) trains at max_ep_size 2 with deduplicated
    all-to-alls, in two micro-batches per step (gradients synchronised once, after the
    second), as it does at max_ep_size 1 (no all-to-all) on whole batches, to float32
    rounding (no balance loss, which is taken per micro-batch), with every random layer and
    augmentation on (hidden dropout's keys travel with the deduplicated rows)."""
    args = {**TINY_MODEL, "top_k": 2, "drop_tokens": False, "num_groups": 2, "topk_groups": 1,
            **RANDOM_LAYERS}
    _same_training_at_both_layouts(setup[0], "dedup", args, lambda ep: dict(
        DEDUP_TOKENS=True, ACCUM_STEPS=ep, AUX_LOSS_WEIGHT=0.0, **RANDOM_AUGMENT))


def test_sigterm_to_one_rank_stops_both_at_the_same_step(setup, tmp_path):
    """SIGTERM reaching rank 1 only, at the end of step 3: both ranks stop together at the next
    step's all-reduce, each with the resume hint and exit code 130; no rank is left in a
    collective (no CommError), and the checkpoint of epoch 1 is the latest."""
    root, cfg, _, _ = setup
    run = str(tmp_path / "signalled")
    env = {**os.environ, "OMP_NUM_THREADS": "1", FAULT_STEP_ENV: "3", FAULT_RANK_ENV: "1",
           "MOESAIC_FAULT_SIGNAL": "TERM"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "moesaic", "train", "--config", cfg, "--run-dir", run]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert out.count("interrupted at step 3 (epoch 2); continue with") == 2, out[-4000:]
    assert "CommError" not in out and "Exception ignored" not in out, out[-4000:]
    assert checkpoint.find(run).endswith("epoch_0001")
