"""Test-set evaluation: the training loop's per-epoch pass, and ``moesaic eval`` on a checkpoint.

Each rank evaluates a contiguous shard in the same number of batches (the all-to-all needs equal
forwards), unpadded: shard sizes differ by at most one image, so no repeated image takes expert
capacity from a real one (the MoE layers exchange their capacities, so the shorter shard's
blocks are smaller).

Legend: b per-rank batch, C channels, H/W image size, L classes.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ..layer import MoE
from ..parallel import moe_set_seed, parallelize
from . import checkpoint
from .augment import normalize
from .data import eval_batches, load_dataset
from .dist import all_reduce_
from .meters import RoutingMeter
from .progress import bar


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(model, test_set, eval_batch_size: int, rank: int, world: int, device,
             amp_dtype: Optional[torch.dtype], meter: Optional[RoutingMeter] = None,
             progress: bool = False):
    """(loss, accuracy) over the whole test set, identical on every rank; ``meter`` (optional)
    sums the MoE layers' routing statistics of this rank's batches; ``progress`` draws a bar
    on a terminal."""
    was_training = model.training
    model.eval()
    sums_3 = torch.zeros(3, device=device, dtype=torch.float64)
    batches = eval_batches(len(test_set), -(-eval_batch_size // world), rank, world)
    with bar(len(batches), "eval", "batch", progress) as shown:
        for idx_b in batches:
            _eval_batch(model, test_set, idx_b, device, amp_dtype, meter, sums_3)
            shown.update()
    all_reduce_(sums_3)
    model.train(was_training)
    return float(sums_3[0] / sums_3[2]), float(sums_3[1] / sums_3[2])


def _eval_batch(model, test_set, idx_b, device, amp_dtype, meter, sums_3) -> None:
    """Add one batch's [loss, correct, images] to ``sums_3`` (and its routing to ``meter``)."""
    idx_b = idx_b.to(device)
    x_bCHW = normalize(test_set.images_NCHW[idx_b].float() / 255, test_set.mean, test_set.std)
    labels_b = test_set.labels_N[idx_b]
    with autocast(device, amp_dtype):
        if meter is None:
            logits_bL, _ = model(x_bCHW)
        else:
            logits_bL, _, stats = model(x_bCHW, return_stats=True)
            meter.step(stats)
    logits_bL = logits_bL.float()
    loss_b = F.cross_entropy(logits_bL, labels_b, reduction="none")
    sums_3 += torch.stack([loss_b.sum(), (logits_bL.argmax(-1) == labels_b).sum(),
                           torch.tensor(labels_b.numel(), device=device)]).double()


def find_checkpoint(path: str, best: bool) -> str:
    """The checkpoint folder ``path`` names, or with ``best`` the one its run's best.json names."""
    ckpt = checkpoint.find(path)
    if not best:
        return ckpt
    root = os.path.dirname(ckpt)
    name = checkpoint.pointer(root, "best.json")
    if name is None:
        raise checkpoint.CheckpointError(f"--best: {root} has no best.json{_why_no_best(root)}")
    return os.path.join(root, name)


def _why_no_best(ckpt_root: str) -> str:
    """Where the run's best epoch went, read from its metrics.jsonl (or nothing)."""
    try:
        with open(os.path.join(os.path.dirname(ckpt_root), "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
        best = max(history, key=lambda r: r["eval_accuracy"])
    except (OSError, ValueError, KeyError):
        return ""
    return (f": the run's best epoch, {best['epoch']} ({100 * best['eval_accuracy']:.2f}%), has "
            "no checkpoint in this run dir (it was trained before this run was resumed from "
            "another run's checkpoint: evaluate that run with --best); without --best the "
            "latest checkpoint is evaluated")


def evaluate_checkpoint(cfg, ckpt: str) -> dict:
    """Build ``cfg``'s model on this process group, load ``ckpt``'s weights and evaluate it:
    ``{"checkpoint", "epoch", "eval_loss", "eval_accuracy", "moe"}``."""
    from .setup import build_model, device_for, precision_for, set_threads, start_processes

    ctx = start_processes(cfg)
    set_threads(cfg)
    device = device_for(cfg, ctx)
    amp_dtype = precision_for(cfg, device)
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_dir, cfg.norm_mean, cfg.norm_std)
    moe_set_seed(cfg.seed)
    model = parallelize(build_model(cfg, train_set.shape, train_set.num_classes).to(device),
                        dedup_tokens=cfg.dedup_tokens)
    state = checkpoint.load(ckpt, model)
    meter = RoutingMeter()
    loss, acc = evaluate(model, test_set.to(device), cfg.eval_batch_size, ctx.rank,
                         ctx.world_size, device, amp_dtype, meter,
                         progress=ctx.is_main and cfg.progress)
    names = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    return {"checkpoint": ckpt, "epoch": int(state["epoch"]), "eval_loss": loss,
            "eval_accuracy": acc, "moe": meter.result(names)}
