"""What every vision model here shares: patch + class-token + position embedding in front,
final norm and linear head on the class token (or the mean token) behind, timm's
``forward_features`` / ``forward_head`` / ``reset_classifier`` split, and the
``moe_layers()`` / ``flops_per_image()`` helpers. Subclasses supply the blocks and
``_run_blocks``.

Legend: B batch, C channels, H/W image size, P patches, S sequence (P + 1), D model dim,
F ffn dim, E experts, K top-k.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import keyed
from ..config import _is_int
from ..layer import MoE, moe_layers
from .config import VisionConfig
from .layers import PatchEmbed, init_weights


class VisionModel(nn.Module):
    """Base class: ``logits_BC, aux_loss = model(images_BCHW)`` (``return_stats=True`` adds the
    routing statistics)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.name = type(self).__name__
        D = cfg.d_model
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D, cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        self.pos_drop = keyed.Dropout(cfg.drop_rate, kernels=cfg.kernels)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.head = nn.Linear(D, cfg.num_classes)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> "VisionModel":
        """Recompute each block in the backward instead of keeping its activations (timm's
        switch): only each block's input is kept, for about one more forward of compute.
        Routing, router noise and dropout come out the same in the recomputation."""
        self.grad_checkpointing = bool(enable)
        return self

    def _call_block(self, fn, *args):
        """``fn(*args)``, checkpointed when grad checkpointing is on and autograd records."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False,
                              context_fn=keyed.checkpoint_contexts)
        return fn(*args)

    def reset_parameters(self) -> None:
        """Initialise every weight as the constructor did: e.g. build under
        ``torch.device("meta")``, ``to_empty(device=...)``, then call this (after the same
        ``moe_set_seed``/``manual_seed`` as an eager build, the weights are the eager ones)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self._init_weights()

    def _init_weights(self) -> None:
        """The model's own init after the modules' defaults (subclasses call it last)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_weights(self)
        c = self.config
        if c.zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if c.router_init_std is not None:
            for layer in self.moe_layers():
                nn.init.trunc_normal_(layer.router.weight, std=c.router_init_std)

    def _make_moe(self, num_experts: int, top_k: int, noise_policy, residual: bool) -> MoE:
        c = self.config
        kw = {"hidden_dropout": c.drop_rate, **c.moe_kwargs}  # drop_rate unless set on its own
        return MoE(c.d_model, c.d_ff, num_experts, top_k=top_k, capacity_factor=c.capacity_factor,
                   eval_capacity_factor=c.eval_capacity_factor, noise_policy=noise_policy,
                   residual=residual, dropout=c.drop_rate, **kw)

    def _run_blocks(self, x_BSD: Tensor, aux: Tensor, stats: list) -> tuple[Tensor, Tensor]:
        """Run the blocks, summing MoE aux losses and appending each MoE call's stats."""
        raise NotImplementedError

    def forward_features(self, images_BCHW: Tensor, return_stats: bool = False):
        """The final norm's tokens [B, S, D] (class token first) and the aux loss (timm's
        ``forward_features``), plus the routing statistics with ``return_stats=True``."""
        x_BPD = self.patch_embed(images_BCHW)
        cls_B1D = self.cls_token.expand(x_BPD.shape[0], -1, -1)
        x_BSD = self.pos_drop(torch.cat([cls_B1D, x_BPD], dim=1) + self.pos_embed)
        aux = x_BSD.new_zeros((), dtype=torch.float32)
        stats: list = []
        x_BSD, aux = self._run_blocks(x_BSD, aux, stats)
        x_BSD = self.norm(x_BSD)
        return (x_BSD, aux, stats) if return_stats else (x_BSD, aux)

    def forward_head(self, x_BSD: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool the tokens (``config.pool``) and classify; ``pre_logits=True`` stops before the
        head and returns the pooled [B, D] features."""
        x_BD = x_BSD.mean(dim=1) if self.config.pool == "mean" else x_BSD[:, 0]
        return x_BD if pre_logits else self.head(x_BD)

    def forward(self, images_BCHW: Tensor, return_stats: bool = False):
        """``(logits, aux_loss)``, or ``(logits, aux_loss, stats)`` with ``return_stats=True``:
        one :class:`~moesaic.routing.RoutingStats` per MoE call, in call order."""
        x_BSD, aux, stats = self.forward_features(images_BCHW, return_stats=True)
        logits_BC = self.forward_head(x_BSD)
        return (logits_BC, aux, stats) if return_stats else (logits_BC, aux)

    def get_classifier(self) -> nn.Linear:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new head for ``num_classes`` classes (fine-tuning on another dataset), initialised as
        the constructor does. Refused while a multi-process ``moesaic.parallelize`` (of this
        model or one holding it) averages the old head's gradients: the new one's would not be."""
        from ..parallel.model import grad_synced
        if any(grad_synced(p) for p in self.head.parameters()):
            raise RuntimeError("reset_classifier after moesaic.parallelize: the new head's "
                               "gradients would not be synchronised over the ranks; reset the "
                               "head first, then parallelize")
        if not (_is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        num_classes = int(num_classes)
        w = self.head.weight
        self.head = nn.Linear(self.config.d_model, num_classes, device=w.device, dtype=w.dtype)
        self.config.num_classes = num_classes
        init_weights(self.head)
        if self.config.zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def moe_layers(self) -> list[MoE]:
        """The model's distinct MoE layers, in registration order."""
        return moe_layers(self)

    def block_experts(self) -> list[int]:
        """Experts of the feed-forward each block runs (0 = dense)."""
        raise NotImplementedError

    def flops_per_image(self) -> int:
        """Forward FLOPs (2 per multiply-add) of one image, counting each token's top_k experts
        (no drops; expert choice: capacity_factor experts on average), the router, the
        PR-MoE residual and shared experts; elementwise ops are left out."""
        c = self.config
        S, D, Fd, P = c.num_patches + 1, c.d_model, c.d_ff, c.num_patches
        total = 2 * P * c.in_chans * c.patch_size ** 2 * D + 2 * D * c.num_classes
        attn = 2 * S * D * 3 * D + 4 * S * S * D + 2 * S * D * D
        mlp = 4 * S * D * Fd
        for E, layer in zip(self.block_experts(), self._block_moe_configs()):
            total += attn
            if E == 0:
                total += mlp
            else:
                moe_mlp = mlp * 3 // 2 if layer.activation == "swiglu" else mlp  # three products
                total += 2 * S * D * E + round(layer.experts_per_token() * moe_mlp)
                if layer.residual:
                    total += moe_mlp + 2 * S * D * 2
                total += layer.num_shared_experts * moe_mlp
        return total

    def _block_moe_configs(self):
        """One MoEConfig per block (None for dense blocks), for FLOP counting."""
        raise NotImplementedError
