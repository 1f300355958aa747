"""AdamW with optional no-decay groups, and a warmup + cosine schedule stepped per step."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

NO_DECAY_LEAVES = ("bias", "b1", "b2", "cls_token", "pos_embed")


def is_no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights, biases (the experts' stacked b1/b2 too) and embeddings."""
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim <= 1 or leaf in NO_DECAY_LEAVES or "norm" in name.lower() or "embed" in leaf


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW over the model's parameters; with ``wd_exclude_norm_bias_embed`` two groups.

    The fused implementation (one kernel over all parameters) where the device has it, CPU and
    CUDA included: on the 2-core CPU a step of the embedded default's AdamW was about 5x faster
    than the default ``foreach`` one (see docs/training.md). Otherwise the default."""
    named = named_trainable(model)
    if cfg.wd_exclude_norm_bias_embed:
        decay = [p for n, p in named if not is_no_decay(n, p)]
        no_decay = [p for n, p in named if is_no_decay(n, p)]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    kw = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except RuntimeError:  # parameters on a device without the fused kernel
        return torch.optim.AdamW(groups, **kw)


class WarmupCosine:
    """lr(step) = peak * (step + 1) / warmup during warmup, then a cosine (or flat line) from the
    peak to ``min_lr`` at ``total_steps``. ``step()`` advances one optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int, schedule: str = "cosine"):
        self.optimizer = optimizer
        self.peak, self.min_lr = peak_lr, min_lr
        self.warmup, self.total = warmup_steps, max(total_steps, 1)
        self.schedule = schedule
        self.last_step = 0
        self._set(self.lr_at(0))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.peak
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + 0.5 * (self.peak - self.min_lr) * (1 + math.cos(math.pi * t))

    def _set(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self) -> None:
        self.last_step += 1
        self._set(self.lr_at(self.last_step))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._set(self.lr_at(self.last_step))
