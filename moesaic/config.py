"""Typed configuration of one MoE layer, validated when it is made.

Every error names the field and the offending value, so a bad argument fails at construction
time, not deep inside a forward pass.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

ROUTERS = ("token_choice", "expert_choice")
SCORE_FUNCS = ("softmax", "sigmoid")
BALANCE_SCOPES = ("batch", "sequence", "global")
CAPACITY_SCOPES = ("batch", "global")
DROP_POLICIES = ("position", "score", "causal")
NOISE_POLICIES = (None, "jitter", "logit_jitter", "gaussian")
ACTIVATIONS = ("gelu", "relu", "swiglu")
KERNELS = ("auto", "torch", "triton")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _plain(v):
    """A numpy (or other registered) scalar as the Python int or float it stands for, so the
    config compares, prints and pickles like one written with literals."""
    if type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_"):
        return bool(v)
    if _is_int(v):
        return int(v)
    if isinstance(v, float):
        return float(v)
    if _is_number(v):
        try:
            return float(str(v))  # np.float32(1.1) is 1.1, not 1.100000023841858
        except ValueError:  # e.g. Fraction(5, 4) prints as 5/4
            return float(v)
    return v


@dataclass
class MoEConfig:
    """Hyper-parameters of :class:`moesaic.MoE` (see the layer's docstring for their meaning)."""

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: Optional[float] = None
    min_capacity: int = 4
    drop_tokens: bool = True
    drop_policy: str = "position"
    router: str = "token_choice"
    score_func: str = "softmax"
    noise_policy: Optional[str] = None
    normalize_weights: Optional[bool] = None
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    activation: str = "gelu"
    bias: bool = True
    residual: bool = False
    num_shared_experts: int = 0
    routed_scale: float = 1.0
    dropout: float = 0.0
    hidden_dropout: float = 0.0
    dropout_branches: bool = False
    kernels: str = "auto"
    num_groups: int = 1  # added after kernels, so positional arguments keep their meaning
    topk_groups: Optional[int] = None
    balance_scope: str = "batch"
    capacity_scope: str = "batch"

    def __post_init__(self) -> None:
        for f in fields(self):
            setattr(self, f.name, _plain(getattr(self, f.name)))
        for name in ("d_model", "d_ff", "num_experts"):
            v = getattr(self, name)
            _require(_is_int(v) and v >= 1, f"{name} must be a positive int, got {v!r}")
        _require(_is_int(self.top_k) and 1 <= self.top_k <= self.num_experts,
                 f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        _require(self.router in ROUTERS, f"router must be one of {ROUTERS}, got {self.router!r}")
        _require(self.score_func in SCORE_FUNCS,
                 f"score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        _require(_is_int(self.num_groups) and self.num_groups >= 1,
                 f"num_groups must be a positive int, got {self.num_groups!r}")
        _require(self.num_experts % self.num_groups == 0,
                 f"num_experts ({self.num_experts}) is not divisible by num_groups "
                 f"({self.num_groups}): expert groups are equal, contiguous blocks of experts")
        _require(self.topk_groups is None or (_is_int(self.topk_groups)
                                               and 1 <= self.topk_groups <= self.num_groups),
                 f"topk_groups must be None or an int in [1, num_groups={self.num_groups}], "
                 f"got {self.topk_groups!r}")
        groups = self.topk_groups or self.num_groups
        group_size = self.num_experts // self.num_groups
        _require(self.top_k <= groups * group_size,
                 f"top_k ({self.top_k}) exceeds the experts a token may use: topk_groups "
                 f"({groups}) groups of {group_size} = {groups * group_size}")
        _require(self.balance_scope in BALANCE_SCOPES,
                 f"balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        _require(self.capacity_scope in CAPACITY_SCOPES,
                 f"capacity_scope must be one of {CAPACITY_SCOPES}, got {self.capacity_scope!r}")
        _require(self.capacity_scope == "batch" or self.drop_tokens,
                 "capacity_scope='global' takes no drop_tokens=False: it ranks assignments "
                 "over every rank's tokens against one capacity, and dropless has none")
        if self.eval_capacity_factor is None:
            self.eval_capacity_factor = (2.0 if self.router == "token_choice"
                                         else self.capacity_factor)
        for name in ("capacity_factor", "eval_capacity_factor", "routed_scale"):
            v = getattr(self, name)
            _require(_is_number(v) and v > 0 and math.isfinite(v),
                     f"{name} must be a finite number > 0, got {v!r}")
        _require(_is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
                 f"num_shared_experts must be an int >= 0, got {self.num_shared_experts!r}")
        _require(_is_int(self.min_capacity) and self.min_capacity >= 0,
                 f"min_capacity must be an int >= 0, got {self.min_capacity!r}")
        _require(self.drop_policy in DROP_POLICIES,
                 f"drop_policy must be one of {DROP_POLICIES}, got {self.drop_policy!r}")
        _require(self.noise_policy in NOISE_POLICIES,
                 f"noise_policy must be one of {NOISE_POLICIES}, got {self.noise_policy!r}")
        _require(self.activation in ACTIVATIONS,
                 f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        _require(self.kernels in KERNELS, f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            v = getattr(self, name)
            _require(_is_number(v) and v >= 0 and math.isfinite(v),
                     f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("dropout", "hidden_dropout"):
            v = getattr(self, name)
            _require(_is_number(v) and 0 <= v < 1, f"{name} must be in [0, 1), got {v!r}")
        for name in ("drop_tokens", "bias", "residual", "dropout_branches"):
            v = getattr(self, name)
            _require(isinstance(v, bool), f"{name} must be True or False, got {v!r}")
        _require(self.normalize_weights is None or isinstance(self.normalize_weights, bool),
                 f"normalize_weights must be None, True or False, got {self.normalize_weights!r}")
        if self.router == "expert_choice":
            bad = [f"{n}={v!r}" for n, v, ok in (
                ("top_k", self.top_k, self.top_k == 1),
                ("drop_tokens", self.drop_tokens, self.drop_tokens),
                ("drop_policy", self.drop_policy, self.drop_policy == "position"),
                ("bias_update_rate", self.bias_update_rate, self.bias_update_rate == 0),
                ("topk_groups", self.topk_groups, self.group_limit() is None),
                ("balance_scope", self.balance_scope, self.balance_scope == "batch")) if not ok]
            _require(not bad, f"router='expert_choice' takes no {', '.join(bad)}: each expert "
                     "takes its ceil(capacity_factor * T / E) best tokens, so capacity_factor "
                     "is the mean number of experts per token (top_k must stay 1)")
        _require(not (self.residual and self.num_shared_experts),
                 f"residual=True and num_shared_experts={self.num_shared_experts} are two forms of "
                 "an always-on MLP (mixed by a learned coefficient, or added): choose one")
        _require(self.residual or not self.dropout_branches,
                 "dropout_branches=True needs residual=True: it drops the PR-MoE branches' "
                 "outputs (experts, residual MLP) separately instead of the layer's output")
        if self.normalize_weights is None:
            self.normalize_weights = self.top_k >= 2

    def group_limit(self) -> Optional[tuple[int, int]]:
        """(num_groups, topk_groups) when routing is limited to some groups, else None."""
        if self.topk_groups is None or self.topk_groups >= self.num_groups:
            return None
        return self.num_groups, self.topk_groups

    def experts_per_token(self) -> float:
        """Experts a token uses on average with no drops: top_k, or for expert choice the
        training capacity factor (at most E)."""
        if self.router == "expert_choice":
            return min(float(self.capacity_factor), float(self.num_experts))
        return float(self.top_k)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
