"""Typed, validated configuration shared by the vision models (ViT-MoE and WideNet).

Errors name the field and the numbers, e.g. ``img_size (30) is not divisible by patch_size (4)``.
``moe_kwargs`` are passed through to :class:`moesaic.MoE` unchanged (the layer validates them).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional, Union

from ..config import _is_int, _is_number, _plain, _require
from .registry import closest

# Keyword arguments that go straight to moesaic.MoE.
MOE_PASSTHROUGH = ("aux_loss_coef", "z_loss_coef", "drop_tokens", "drop_policy", "router",
                   "min_capacity", "normalize_weights", "kernels", "activation",
                   "bias_update_rate", "hidden_dropout", "dropout_branches",
                   "num_shared_experts", "score_func", "routed_scale", "num_groups",
                   "topk_groups", "balance_scope", "capacity_scope")


@dataclass
class VisionConfig:
    """Hyper-parameters of a patch-embedding transformer classifier with optional MoE blocks."""

    depth: int
    d_model: int
    num_heads: int
    mlp_ratio: float
    num_experts: Union[int, list] = 0
    img_size: int = 32
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    moe_every: int = 2
    top_k: int = 1
    residual: bool = False
    capacity_factor: float = 1.25
    eval_capacity_factor: Optional[float] = None
    noise_policy: Optional[str] = None
    drop_rate: float = 0.0
    attn_drop: float = 0.0
    drop_path: float = 0.0
    qkv_bias: bool = False
    patch_bias: bool = False
    pool: str = "cls"  # "cls": the class token; "mean": mean of all tokens after the final norm
    zero_head: bool = False  # zero-initialised classifier (as Titans' ViT-MoE)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    router_init_std: Optional[float] = None  # truncated-normal router init (None: the layer's)
    moe_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "moe_kwargs":
                setattr(self, f.name, _plain(getattr(self, f.name)))
        if isinstance(self.num_experts, (list, tuple)):
            self.num_experts = [_plain(e) for e in self.num_experts]
        for name in ("depth", "d_model", "num_heads", "img_size", "patch_size", "in_chans",
                     "num_classes", "moe_every"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, f"{name} must be a positive int, got {v!r}")
        _require(self.img_size % self.patch_size == 0,
                 f"img_size ({self.img_size}) is not divisible by patch_size ({self.patch_size})")
        _require(self.d_model % self.num_heads == 0,
                 f"d_model ({self.d_model}) is not divisible by num_heads ({self.num_heads})")
        _require(_is_number(self.mlp_ratio) and self.mlp_ratio > 0,
                 f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        for name in ("drop_rate", "attn_drop", "drop_path"):
            v = getattr(self, name)
            _require(_is_number(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        _require(self.pool in ("cls", "mean"), f"pool must be 'cls' or 'mean', got {self.pool!r}")
        _require(_is_number(self.norm_eps) and self.norm_eps > 0,
                 f"norm_eps must be > 0, got {self.norm_eps!r}")
        _require(self.router_init_std is None or (_is_number(self.router_init_std)
                                                  and self.router_init_std > 0),
                 f"router_init_std must be None or > 0, got {self.router_init_std!r}")
        n_moe = self.num_moe_blocks_at(self.depth, self.moe_every)
        if isinstance(self.num_experts, (list, tuple)):
            self.num_experts = list(self.num_experts)
            _require(len(self.num_experts) == n_moe,
                     f"num_experts has {len(self.num_experts)} entries but the model has {n_moe} "
                     f"MoE blocks (depth {self.depth}, moe_every {self.moe_every})")
            _require(all(_is_int(e) and e >= 1 for e in self.num_experts),
                     f"num_experts entries must be positive ints, got {self.num_experts}")
        else:
            _require(_is_int(self.num_experts) and self.num_experts >= 0,
                     f"num_experts must be an int >= 0 or a list, got {self.num_experts!r}")
        unknown = [k for k in self.moe_kwargs if k not in MOE_PASSTHROUGH]
        _require(not unknown, f"unknown MoE option {unknown[0]!r}" if unknown else "")
        _require(_is_int(self.top_k) and self.top_k >= 1,
                 f"top_k must be a positive int, got {self.top_k!r}")
        few = [(i, e) for i, e in enumerate(self.experts_per_block()) if 0 < e < self.top_k]
        _require(not few, f"top_k ({self.top_k}) exceeds the {few[0][1]} experts of block "
                          f"{few[0][0]} (num_experts {self.num_experts})" if few else "")

    @staticmethod
    def num_moe_blocks_at(depth: int, moe_every: int) -> int:
        return sum(1 for i in range(depth) if (i + 1) % moe_every == 0)

    @property
    def d_ff(self) -> int:
        return round(self.d_model * self.mlp_ratio)

    @property
    def kernels(self) -> str:
        """The MoE layers' ``kernels`` choice, also used by the model's dropouts."""
        return self.moe_kwargs.get("kernels", "auto")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def experts_per_block(self) -> list[int]:
        """Experts of each block (0 = dense feed-forward)."""
        if self.num_experts == 0:
            return [0] * self.depth
        per_moe = (self.num_experts if isinstance(self.num_experts, list)
                   else [self.num_experts] * self.num_moe_blocks_at(self.depth, self.moe_every))
        it = iter(per_moe)
        return [next(it) if (i + 1) % self.moe_every == 0 else 0 for i in range(self.depth)]

    @classmethod
    def from_kwargs(cls, **kwargs) -> "VisionConfig":
        """Split MoE pass-through options from model fields; unknown keys name close ones."""
        names = {f.name for f in fields(cls)} - {"moe_kwargs"}
        moe = {k: kwargs.pop(k) for k in list(kwargs) if k in MOE_PASSTHROUGH}
        for k in kwargs:
            if k not in names:
                near = closest(k, sorted(names | set(MOE_PASSTHROUGH)))
                hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
                raise ValueError(f"unknown model option {k!r}{hint}")
        return cls(**kwargs, moe_kwargs=moe)
