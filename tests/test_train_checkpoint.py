"""Checkpoint files: an epoch saved again never leaves latest.json pointing at a missing or
half-written folder."""
import json
import os
import shutil

import torch

from moesaic.train import checkpoint


def _save(root, epoch, model, opt, is_best=False):
    return checkpoint.save(root, epoch, model, opt, {"epoch": epoch, "step": 10 * epoch},
                           is_main=True, is_best=is_best, keep=5)


def test_saving_an_epoch_again_keeps_latest_readable_at_every_moment(tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    os.makedirs(root)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    _save(root, 1, model, opt, is_best=True)
    _save(root, 2, model, opt)
    assert checkpoint.find(root).endswith("epoch_0002")

    def readable():
        ck = checkpoint.find(root)  # latest.json names a complete folder
        assert checkpoint.read_state(ck)["epoch"] == 2
        checkpoint._load_tensors(os.path.join(ck, "model.safetensors"))

    replace, rmtree = os.replace, shutil.rmtree
    seen = []

    def checked_replace(src, dst):
        readable()
        replace(src, dst)
        readable()
        seen.append(os.path.basename(dst))

    def checked_rmtree(path, *args, **kwargs):
        readable()
        rmtree(path, *args, **kwargs)
        readable()
        seen.append(f"rm {os.path.basename(path)}")

    monkeypatch.setattr(os, "replace", checked_replace)
    monkeypatch.setattr(shutil, "rmtree", checked_rmtree)
    with torch.no_grad():
        model.weight.add_(1.0)  # the resumed run's epoch 2 differs from the first one
    path = _save(root, 2, model, opt)
    assert os.path.basename(path) == "epoch_0002.1" and "rm epoch_0002" in seen
    assert checkpoint.find(root) == path
    saved = checkpoint._load_tensors(os.path.join(path, "model.safetensors"))
    assert torch.equal(saved["weight"], model.weight)
    assert sorted(os.listdir(root)) == ["best.json", "epoch_0001", "epoch_0002.1", "latest.json"]
    path = _save(root, 2, model, opt, is_best=True)  # a third time: the plain name is free again
    assert os.path.basename(path) == "epoch_0002"
    assert sorted(os.listdir(root)) == ["best.json", "epoch_0001", "epoch_0002", "latest.json"]


def test_saving_again_keeps_a_superseded_folder_that_best_names(tmp_path):
    root = str(tmp_path)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    _save(root, 1, model, opt, is_best=True)
    _save(root, 1, model, opt)
    assert sorted(os.listdir(root)) == ["best.json", "epoch_0001", "epoch_0001.1", "latest.json"]
    assert checkpoint.find(root).endswith("epoch_0001.1")


def test_resuming_an_earlier_checkpoint_repoints_best(tmp_path):
    """best.json naming a folder of the abandoned later epochs moves to the best kept one: the
    resumed checkpoint, the best epoch's folder of the same history (also a re-saved
    ``epoch_NNNN.N``), or nowhere when that folder is gone."""
    root = tmp_path / "checkpoints"

    def folder(name, accs):
        os.makedirs(root / name)
        torch.save({"history": [{"eval_accuracy": a} for a in accs]},
                   root / name / checkpoint.STATE_FILE)

    folder("epoch_0001", [0.5])
    folder("epoch_0002", [0.5, 0.3])
    folder("epoch_0003", [0.5, 0.3, 0.9])

    def best_after(ckpt, epoch, accs):
        checkpoint._write_json(str(root / "best.json"), {"name": "epoch_0003", "epoch": 3})
        checkpoint.point_best(str(root / ckpt), epoch, [{"eval_accuracy": a} for a in accs])
        return checkpoint.pointer(str(root), "best.json")

    assert best_after("epoch_0001", 1, [0.5, 0.3, 0.9]) == "epoch_0001"
    assert best_after("epoch_0002", 2, [0.5, 0.3, 0.9]) == "epoch_0001"
    assert best_after("epoch_0002", 2, [0.3, 0.5]) == "epoch_0002"
    folder("epoch_0001.1", [0.6])  # epoch 1 written again by a run resumed from scratch
    folder("epoch_0002.1", [0.6, 0.4])
    assert best_after("epoch_0002.1", 2, [0.6, 0.4]) == "epoch_0001.1"
    assert best_after("epoch_0002", 2, [0.5, 0.3]) == "epoch_0001"  # not the other lineage's
    shutil.rmtree(root / "epoch_0001")
    assert best_after("epoch_0002", 2, [0.5, 0.3]) is None
    checkpoint._write_json(str(root / "best.json"), {"name": "epoch_0001.1", "epoch": 1})
    checkpoint.point_best(str(root / "epoch_0002"), 2, [{"eval_accuracy": 0.5}] * 2)
    assert checkpoint.pointer(str(root), "best.json") == "epoch_0001.1"  # not later: kept


def test_prune_never_deletes_the_latest(tmp_path):
    """After resuming from epoch 2 into a dir that still has epoch 4 from the abandoned run,
    pruning to one checkpoint keeps the one just written (and the best)."""
    root = str(tmp_path)
    for name in ("epoch_0001", "epoch_0002", "epoch_0003.1", "epoch_0004"):
        os.makedirs(os.path.join(root, name))
    checkpoint._write_json(os.path.join(root, "latest.json"), {"name": "epoch_0003.1", "epoch": 3})
    checkpoint._write_json(os.path.join(root, "best.json"), {"name": "epoch_0001", "epoch": 1})
    checkpoint._prune(root, keep=1)
    assert sorted(n for n in os.listdir(root) if n.startswith("epoch_")) == ["epoch_0001",
                                                                              "epoch_0003.1"]
    os.makedirs(os.path.join(root, "epoch_0002"))
    checkpoint._prune(root, keep=2)
    assert sorted(n for n in os.listdir(root) if n.startswith("epoch_")) == [
        "epoch_0001", "epoch_0002", "epoch_0003.1"]


def _save_on_each_rank(rank, world, root):
    import moesaic
    ctx = moesaic.init_distributed(timeout_s=60)
    try:
        moesaic.moe_set_seed(0)
        model = moesaic.parallelize(moesaic.MoE(8, 16, 4))
        opt = torch.optim.AdamW(model.parameters())
        if ctx.is_main:
            os.makedirs(root)
        return checkpoint.save(root, 1, model, opt, {"epoch": 1, "step": 10}, is_main=ctx.is_main,
                               is_best=False, keep=2)
    finally:
        moesaic.destroy()


def test_every_rank_learns_the_checkpoint_path(tmp_path):
    """save() returns the path on every rank (rank 0 chose the name), which the other ranks'
    Ctrl-C and non-finite-loss messages then name."""
    from _dist_harness import run_ranks
    root = str(tmp_path / "checkpoints")
    paths = run_ranks(_save_on_each_rank, 2, root, timeout=90)
    assert paths[0] == paths[1] == os.path.join(root, "epoch_0001")


def test_latest_json_naming_a_missing_folder_lists_the_others(tmp_path):
    root = str(tmp_path / "checkpoints")
    os.makedirs(root)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    _save(root, 1, model, opt)
    _save(root, 2, model, opt)
    shutil.rmtree(os.path.join(root, "epoch_0002"))
    try:
        checkpoint.find(str(tmp_path))
    except checkpoint.CheckpointError as e:
        assert "names epoch_0002, which holds no" in str(e) and "epoch_0001" in str(e), e
    else:
        raise AssertionError("a latest.json naming a deleted folder was accepted")


def test_load_weights_keeps_a_head_of_another_size_fresh(tmp_path):
    """Fine-tuning: every weight comes from the checkpoint except a classifier for another
    number of classes; any other mismatch is a clear error."""
    import pytest

    import moesaic
    import moesaic.models as M
    kw = dict(img_size=16, depth=2, d_model=32, num_heads=2, num_experts=4)
    torch.manual_seed(0)
    source = M.create("vit_moe_tiny", num_classes=10, **kw)
    ckpt = str(tmp_path / "epoch_0001")
    os.makedirs(ckpt)
    checkpoint._save_tensors(moesaic.full_state_dict(source), os.path.join(ckpt, "model.safetensors"))
    torch.manual_seed(1)
    target = M.create("vit_moe_tiny", num_classes=5, **kw)
    head = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    assert checkpoint.load_weights(ckpt, target) == ["head.weight", "head.bias"]
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, head[k] if k in head else source.state_dict()[k], msg=k)
    assert checkpoint.load_weights(ckpt, source) == []  # same head: loaded too
    balanced = M.create("vit_moe_tiny", num_classes=10, bias_update_rate=0.01, **kw)
    assert checkpoint.load_weights(ckpt, balanced) == []  # no biases saved: they load as zero
    assert not balanced.moe_layers()[0].router.expert_bias.any()
    ckpt2 = str(tmp_path / "epoch_0002")
    os.makedirs(ckpt2)
    balanced.moe_layers()[0].router.expert_bias.fill_(0.5)
    checkpoint._save_tensors(moesaic.full_state_dict(balanced),
                             os.path.join(ckpt2, "model.safetensors"))
    with pytest.warns(UserWarning, match="selection biases .*not used: this model has no "
                                         "bias_update_rate"):
        assert checkpoint.load_weights(ckpt2, source) == []
    wider = M.create("vit_moe_tiny", num_classes=10, **{**kw, "d_model": 48})
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        checkpoint.load_weights(ckpt, wider)


def test_eval_best_without_best_json_says_where_the_best_epoch_went(tmp_path):
    """A run resumed into a new run dir from another run's checkpoint holds no checkpoint of
    the best epoch when that one came before the resume: --best says so."""
    from moesaic.train.evaluate import _why_no_best

    run = tmp_path / "fork"
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "eval_accuracy": a}) + "\n" for e, a in ((6, 0.9248), (7, 0.91))))
    why = _why_no_best(str(run / "checkpoints"))
    assert "best epoch, 6 (92.48%), has no checkpoint in this run dir" in why
    assert "evaluate that run with --best" in why
    assert _why_no_best(str(tmp_path / "none" / "checkpoints")) == ""


def test_damage_that_reads_as_numbers_is_caught_and_a_lost_latest_json_lists_the_rest(tmp_path):
    """Overwritten tensor bytes that still parse (inf / NaN) are damage, named with the other
    checkpoints, not a non-finite loss later; a run dir that lost latest.json lists its
    intact checkpoint folders."""
    from safetensors.torch import save_file

    root = tmp_path / "run" / "checkpoints"
    for name in ("epoch_0001", "epoch_0002"):
        (root / name).mkdir(parents=True)
        torch.save({"epoch": 1}, root / name / checkpoint.STATE_FILE)
        save_file({"w": torch.tensor([1.0, float("nan")])}, str(root / name / "model.safetensors"))
    net = torch.nn.Linear(2, 1)
    net.w = torch.nn.Parameter(torch.zeros(2))
    try:
        checkpoint._read_weights(str(root / "epoch_0002"), net)
    except checkpoint.CheckpointError as e:
        assert "model.safetensors holds non-finite values in w" in str(e)
        assert "epoch_0001" in str(e)
    else:
        raise AssertionError("non-finite weights were read")
    masked = torch.nn.Module()
    masked.register_buffer("w", torch.zeros(2))  # a buffer may hold inf or NaN on purpose
    assert checkpoint._read_weights(str(root / "epoch_0002"), masked)["w"].isnan().any()
    try:
        checkpoint.find(str(tmp_path / "run"))
    except checkpoint.CheckpointError as e:
        assert "has no latest.json, but other checkpoints to use (--resume, or moesaic eval)" in str(e)
        assert "epoch_0002" in str(e)
    else:
        raise AssertionError("found a checkpoint without latest.json")
