"""The embedded default run: a small ViT-MoE on scikit-learn's 8x8 digits (``moesaic train``).

Kept in the package so ``moesaic train`` works with no files at all; ``configs/digits_vit_moe.py``
holds the same values.
"""
from __future__ import annotations

from .config import TrainConfig, validate


def digits_default() -> TrainConfig:
    return validate(TrainConfig(
        name="digits_vit_moe",
        model="vit_moe_tiny",
        model_args={},  # vit_moe_tiny as registered: depth 4, d_model 64, 4 experts, top-1
        dataset="digits",
        batch_size=64,
        eval_batch_size=360,
        epochs=30,
        lr=2e-3,
        weight_decay=0.05,
        wd_exclude_norm_bias_embed=True,
        warmup_epochs=1,
        label_smoothing=0.1,
        aux_loss_weight=0.01,
        clip_grad=1.0,
        checkpoint_every=10,
        threads=1,
    ))
