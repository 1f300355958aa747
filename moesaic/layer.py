"""The MoE layer: router + dispatcher + experts (+ the PR-MoE dense residual).

No collectives here: the dispatcher object (local by default, all-to-all after
``moesaic.parallelize``) moves rows between ranks, and the "global" scopes count over ranks
through the ``count_sum`` object parallelize installs, so ep_size 1 and ep_size N share this code.

Legend: T tokens, D model dim, F ffn dim, E experts, K top-k, N rows of the expert-major buffer,
S positions in a sequence; for capacity_scope="global": W ranks, M rows per rank padded to the
longest, J gathered columns.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import keyed, routing
from .autograd import in_backward
from .config import MoEConfig
from .dispatch import LocalDispatcher
from .experts import Experts
from .grouped import _act
from .hidden_dropout import draw_keys
from .ops import select_ops
from .parallel.layout import expert_layout, next_layer_seed


class DenseMLP(nn.Module):
    """D -> F -> D feed-forward with the experts' activation and hidden dropout (the PR-MoE
    residual branch)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 hidden_dropout: float = 0.0, kernels: str = "auto"):
        super().__init__()
        self.activation = activation
        self.drop = keyed.Dropout(hidden_dropout, kernels=kernels)
        gated = activation == "swiglu"
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias and not gated)
        self.fc3 = nn.Linear(d_model, d_ff, bias=False) if gated else None
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias and not gated)

    def forward(self, x: Tensor) -> Tensor:
        u = self.fc3(x) if self.fc3 is not None else None
        return self.fc2(self.drop(_act(self.activation, self.fc1(x), u)))


def _dense_input(x_TD: Tensor, mlp: DenseMLP, autocast_on: bool) -> Tensor:
    """The layer's input for a dense branch: as it is under autocast, else in the branch's
    weight dtype (a float32 layer takes bf16 inputs)."""
    return x_TD if autocast_on else x_TD.to(mlp.fc1.weight.dtype)


def _clear_load_counts(layer: "MoE", incompatible_keys) -> None:
    """Zero counts on the router's device after any state dict load that reaches the layer:
    the counts are not saved, so after ``to_empty`` they would hold whatever memory was there,
    and after a meta build loaded with ``assign=True`` they would stay on the meta device (where
    adding to them does nothing, so the biases would never move)."""
    device = layer.router.weight.device
    if layer.load_counts.device == device:
        layer.load_counts.zero_()
    else:
        layer.load_counts = torch.zeros_like(layer.load_counts, device=device)


class MoE(nn.Module):
    """Mixture-of-Experts feed-forward: ``y, aux_loss = layer(x)`` for x of shape [..., d_model].

    Token choice sends each token to its ``top_k`` most probable experts; each expert keeps at
    most C = min(T, max(min_capacity, ceil(cf * top_k * T / E))) assignments (cf =
    capacity_factor in training, eval_capacity_factor in eval, 2.0 unless given), ranked
    choice-major and then by token position (``drop_policy="position"``) or by the token's
    probability for its first choice (``"score"``), or by position in the sequence, then
    choice, then sequence, each position filling an expert up to its share of the capacity so
    far (``"causal"``, for a batch-first [..., S, D] input: no drop depends on a later position
    of any sequence, as causal language models need);
    ``drop_tokens=False`` keeps every assignment.
    Expert choice lets each expert take its ceil(cf * T / E) highest-probability tokens, cf
    being the mean number of experts per token (so eval_capacity_factor defaults to
    capacity_factor, as in Zhou et al. 2022). Scores are the softmax of the router's logits, or
    with ``score_func="sigmoid"`` one sigmoid per expert (DeepSeek-V3).
    ``aux_loss = aux_loss_coef * balance + z_loss_coef * z``. ``bias_update_rate`` u > 0 turns on
    auxiliary-loss-free balancing (Wang et al. 2024, DeepSeek-V3): experts are chosen by
    probability + ``router.expert_bias`` and weighted by the probability, and
    :func:`moesaic.update_expert_biases` (after each optimizer step) moves each bias by u toward
    balance. ``num_groups`` / ``topk_groups`` limit each token to the experts of its best groups
    (DeepSeek-V3). ``balance_scope="sequence"`` takes the balance loss within each sequence of a
    batch-first [..., S, D] input and averages it (transpose a sequence-first [S, B, D] input);
    ``"global"`` counts the loads over every rank's tokens in training (``count_sum``, set by
    :func:`moesaic.parallelize`). ``capacity_scope="global"`` drops in training as one process
    would on every rank's tokens laid end to end, rank 0's first: C comes from the global token
    count and the slots run over the ranks (one all-gather of [K, E] counts per forward, and
    with ``drop_policy="score"`` one of every token's priority and choices; under expert choice
    instead one of the token counts and one of the ranking scores, and each expert takes its C
    best of every rank's tokens); the kept rows then travel ragged, as dropless ones.
    With ``residual=True`` (PR-MoE)
    the output is ``moe(x) * c0 + mlp(x) * c1`` with ``c = softmax(residual_coef(x))`` per token;
    ``num_shared_experts`` n > 0 (DeepSeekMoE) adds a dense MLP of width n * d_ff that every
    token passes through: ``moe(x) + shared(x)``; ``routed_scale`` multiplies the routed
    experts' output (DeepSeek-V3's ``routed_scaling_factor``).
    ``dropout`` applies to the layer's output (with ``dropout_branches``, to the experts' and
    the residual MLP's outputs separately, before mixing), ``hidden_dropout`` after the
    activation inside every expert (and the residual and shared MLPs), as in a dense
    transformer MLP; its masks do not depend on which rank holds an expert
    (:mod:`moesaic.hidden_dropout`).

    ``layer(x, return_stats=True)`` also returns the call's
    :class:`~moesaic.routing.RoutingStats` (device tensors, no host sync); ``layer.last_stats``
    keeps the last call's as a convenience.
    """

    def __init__(self, d_model: int, d_ff: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float = 1.25, eval_capacity_factor: Optional[float] = None,
                 min_capacity: int = 4, drop_tokens: bool = True, drop_policy: str = "position",
                 router: str = "token_choice", score_func: str = "softmax",
                 noise_policy: Optional[str] = None,
                 normalize_weights: Optional[bool] = None, aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 0.0, bias_update_rate: float = 0.0,
                 activation: str = "gelu", bias: bool = True,
                 residual: bool = False, num_shared_experts: int = 0,
                 routed_scale: float = 1.0, dropout: float = 0.0,
                 hidden_dropout: float = 0.0, dropout_branches: bool = False,
                 kernels: str = "auto", num_groups: int = 1, topk_groups: Optional[int] = None,
                 balance_scope: str = "batch", capacity_scope: str = "batch"):
        super().__init__()
        cfg = MoEConfig(
            d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k,
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity, drop_tokens=drop_tokens, drop_policy=drop_policy,
            router=router, score_func=score_func, num_groups=num_groups,
            topk_groups=topk_groups, noise_policy=noise_policy,
            normalize_weights=normalize_weights, aux_loss_coef=aux_loss_coef,
            balance_scope=balance_scope, capacity_scope=capacity_scope, z_loss_coef=z_loss_coef,
            bias_update_rate=bias_update_rate, activation=activation,
            bias=bias, residual=residual, num_shared_experts=num_shared_experts,
            routed_scale=routed_scale,
            dropout=dropout, hidden_dropout=hidden_dropout,
            dropout_branches=dropout_branches, kernels=kernels)
        self.config = cfg
        self.layout = expert_layout(num_experts)
        self.router = routing.Router(d_model, num_experts, noise_policy,
                                     selection_bias=cfg.bias_update_rate > 0)
        if cfg.bias_update_rate > 0:  # assignments since the last moesaic.update_expert_biases
            self.register_buffer("load_counts", torch.zeros(num_experts, dtype=torch.int64),
                                 persistent=False)
            self.register_load_state_dict_post_hook(_clear_load_counts)
        self.experts = Experts(d_model, d_ff, self.layout.global_ids, activation, bias,
                               layer_seed=next_layer_seed(), hidden_dropout=cfg.hidden_dropout)
        self.experts.triton_epilogue = kernels != "torch"  # "torch": no Triton anywhere
        self.dispatcher = LocalDispatcher()
        self.residual = (DenseMLP(d_model, d_ff, activation, bias, cfg.hidden_dropout, kernels)
                         if residual else None)
        self.residual_coef = nn.Linear(d_model, 2) if residual else None
        self.shared = (DenseMLP(d_model, d_ff * num_shared_experts, activation, bias,
                                cfg.hidden_dropout, kernels) if num_shared_experts else None)
        self.dropout = keyed.Dropout(dropout, kernels=kernels)
        self.last_stats: Optional[routing.RoutingStats] = None
        self.count_sum = None  # the "global" scopes across ranks: set by moesaic.parallelize

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Clears the balancing counts (after ``to_empty``); the submodules reset their own."""
        if hasattr(self, "load_counts"):
            self.load_counts.zero_()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "MoE":
        return cls(**cfg.as_dict())

    def extra_repr(self) -> str:
        c = self.config
        extra = "".join([", residual=True" if c.residual else "",
                         f", num_shared_experts={c.num_shared_experts}" if c.num_shared_experts
                         else "",
                         f", score_func={c.score_func}" if c.score_func != "softmax" else "",
                         f", topk_groups={c.topk_groups} of num_groups={c.num_groups}"
                         if c.group_limit() else "",
                         f", balance_scope={c.balance_scope}" if c.balance_scope != "batch"
                         else "",
                         f", capacity_scope={c.capacity_scope}" if c.capacity_scope != "batch"
                         else ""])
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, num_experts={c.num_experts}, "
                f"top_k={c.top_k}, router={c.router}, drop_tokens={c.drop_tokens}{extra}, "
                f"ep_size={self.layout.ep_size}")

    def _route(self, logits_TE: Tensor, ops, num_seqs: int = 1, seq_len: Optional[int] = None,
               position_T: Optional[Tensor] = None):
        c = self.config
        T, E = logits_TE.shape
        cf = c.capacity_factor if self.training else c.eval_capacity_factor
        across = c.capacity_scope == "global" and self.training and self.count_sum is not None
        if c.router == "expert_choice":
            if across:  # each expert picks among every rank's tokens
                plan, probs_TE = self._expert_choice_globally(logits_TE, cf)
            else:
                capacity = routing.expert_choice_capacity(T, E, cf)
                plan, probs_TE = routing.expert_choice(logits_TE, capacity, c.score_func)
            counts_E = plan.counts_E
            balance = logits_TE.new_zeros(())
            taken_T = torch.zeros(T, dtype=torch.bool, device=logits_TE.device)
            dropped = (T - taken_T.index_fill_(0, plan.row_token_N, True).sum()) / max(T, 1)
        else:
            capacity = None
            if c.drop_tokens and not across:
                capacity = routing.token_choice_capacity(T, E, c.top_k, cf, c.min_capacity)
            bias_E = self.router.expert_bias if c.bias_update_rate > 0 else None
            plan, probs_TE, counts_E = ops.token_choice(
                logits_TE, c.top_k, capacity, c.drop_policy, c.normalize_weights, bias_E,
                c.score_func, c.group_limit(), seq_len, position_T)
            counts_WKE = None
            if across:  # drops as one process would on every rank's tokens
                plan, counts_WKE = self._cap_globally(plan, logits_TE, probs_TE, cf, seq_len,
                                                      position_T)
            if bias_E is not None and self.training and not in_backward():
                self.load_counts += counts_E.detach()
            dist_TE = routing.score_distribution(probs_TE, c.score_func)
            if c.balance_scope == "sequence":
                seq_T = None if position_T is None else routing.sequence_ids(position_T)
                balance = routing.sequence_balance_loss(dist_TE, plan.expert_TK, num_seqs, seq_T)
            elif c.balance_scope == "global" and self.training and self.count_sum is not None:
                total_E = (self.count_sum(counts_E) if counts_WKE is None
                           else counts_WKE.sum((0, 1)))  # the capacity's gather has them
                balance = routing.balance_loss(dist_TE, total_E)
            else:  # "batch"; "global" in one process, or in eval (no collective there)
                balance = routing.balance_loss(dist_TE, counts_E)
            dropped = (counts_E.sum() - plan.counts_E.sum()) / counts_E.sum().clamp(min=1)
        z = routing.z_loss(logits_TE)
        aux_loss = c.aux_loss_coef * balance + c.z_loss_coef * z
        stats = routing.RoutingStats(
            tokens_per_expert=counts_E.detach(), tokens_per_expert_kept=plan.counts_E.detach(),
            dropped_fraction=dropped.detach(),
            router_entropy=routing.router_entropy(logits_TE.detach(), c.score_func),
            balance_loss=balance.detach(), z_loss=z.detach())
        return plan, aux_loss, stats

    def _cap_globally(self, plan: routing.RoutingPlan, logits_TE: Tensor, probs_TE: Tensor,
                      cf: float, seq_len: Optional[int], position_T: Optional[Tensor] = None
                      ) -> tuple[routing.RoutingPlan, Tensor]:
        """A dropless plan capped as one process would cap every rank's tokens, and the
        gathered [W, K, E] counts (``capacity_scope="global"``)."""
        c, count_sum = self.config, self.count_sum
        K, E = c.top_k, c.num_experts
        counts_KE = routing.choice_counts(plan.expert_TK, E)
        causal = c.drop_policy == "causal"
        if causal:  # a row more, a mark: -1 for a [T, D] input without positions
            seq_1E = counts_KE.new_zeros(1, E)
            seq_1E[0, 0] = -1 if seq_len is None else seq_len
            counts_KE = torch.cat([counts_KE, seq_1E])
        counts_WKE = count_sum.gather(counts_KE)
        sizes_W = counts_WKE[:, 0].sum(-1)
        if causal:  # the one host read: every rank's tokens (and whether it has positions)
            sizes, marks = torch.stack([sizes_W, counts_WKE[:, K, 0]]).tolist()
            flat = [r for r, n in enumerate(marks) if n < 0]
            if flat:  # every rank raises here, none waits in the next gather
                mine = (f"[T, D] of {plan.num_tokens} tokens" if seq_len is None
                        else f"S={seq_len}")
                raise ValueError(
                    "drop_policy='causal' with capacity_scope='global' ranks every rank's "
                    "sequences by position: it needs a batch-first [..., S, D] input (or "
                    f"positions=) on every rank, got a [T, D] input on rank(s) {flat} (this "
                    f"rank: {mine})")
        else:
            sizes = sizes_W.tolist()
        counts_WKE = counts_WKE[:, :K]
        ranked, by_position = None, None
        if causal:  # every rank's [position, K experts] rows, O(T * K) per rank
            if position_T is None:
                position_T = torch.arange(plan.num_tokens, device=plan.expert_TK.device) % seq_len
            cols_TJ = torch.cat([position_T[:, None], plan.expert_TK.long()], 1)
            by_position = count_sum.gather_rows(cols_TJ, max(sizes))
        if c.drop_policy == "score":  # every rank's token priorities and choices (float32
            priority_T = routing.first_choice_prob(  # holds both exactly)
                routing.ranking_scores(probs_TE, logits_TE, c.score_func), plan.expert_TK)
            cols_TJ = torch.cat([priority_T.float()[:, None], plan.expert_TK.float()], 1)
            cols_WMJ = count_sum.gather_rows(cols_TJ, max(sizes))
            ranked = (cols_WMJ[..., 0], cols_WMJ[..., 1:].long())
        capped, _ = routing.cap_globally(plan, counts_WKE, count_sum.rank, cf, c.min_capacity,
                                         ranked, sizes, by_position)
        return capped, counts_WKE

    def _expert_choice_globally(self, logits_TE: Tensor, cf: float):
        """Expert choice over every rank's tokens (``capacity_scope="global"``): this rank's
        plan and scores."""
        c, count_sum = self.config, self.count_sum
        probs_TE = routing.router_scores(logits_TE, c.score_func)
        score_TE = routing.ranking_scores(probs_TE, logits_TE, c.score_func).detach().float()
        size_11 = torch.tensor([[score_TE.shape[0]]], dtype=torch.int64, device=score_TE.device)
        sizes = count_sum.gather(size_11).view(-1).tolist()
        score_WME = count_sum.gather_rows(score_TE, max(sizes))
        plan = routing.expert_choice_globally(probs_TE, score_WME, sizes, count_sum.rank, cf)
        return plan, probs_TE

    def forward(self, x: Tensor, return_stats: bool = False, positions: Optional[Tensor] = None):
        """``(y, aux_loss)``, or ``(y, aux_loss, stats)`` with ``return_stats=True``.
        ``positions`` (integers, shape ``x.shape[:-1]``): each token's position in its
        sequence, for packed or masked sequences: ``drop_policy="causal"`` ranks by it, and
        ``balance_scope="sequence"`` starts a sequence wherever it does not increase (other
        options ignore it); without it a [..., S, D] input is sequences of S and a [T, D] one
        is one sequence."""
        c = self.config
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            how = "torch.jit.trace" if torch.jit.is_tracing() else "torch.export"
            raise RuntimeError(
                f"moesaic.MoE does not support {how}: routing takes each batch's per-expert row "
                "counts and kept assignments from the data, which a trace would record as one "
                "batch's constants (torch.export refuses them). Run the layer eagerly or under "
                "torch.compile (docs/architecture.md)")
        if not (isinstance(x, Tensor) and x.is_floating_point()):
            from torch.fx import Proxy
            if isinstance(x, Proxy):
                raise RuntimeError(
                    "moesaic.MoE does not support torch.fx symbolic tracing: routing takes its "
                    "per-expert row counts from the data. Trace with moesaic.MoE and "
                    "moesaic.MoEFeedForward as leaf modules (torch.fx.Tracer.is_leaf_module; "
                    "torchvision's create_feature_extractor: tracer_kwargs={'leaf_modules': "
                    "[moesaic.MoE, moesaic.MoEFeedForward]})")
            what = f"a {x.dtype} tensor" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise TypeError(f"MoE input must be a floating-point torch.Tensor, got {what}")
        if x.dim() == 0 or x.shape[-1] != c.d_model:
            raise ValueError(f"input's last dim must be d_model={c.d_model}, got shape {tuple(x.shape)}")
        ops = select_ops(c.kernels, x.device)
        x_TD = x.reshape(-1, c.d_model)
        num_seqs = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1  # [..., S, D]: S per sequence
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        position_T = None
        if positions is not None:
            position_T = _positions(positions, x)
            if c.drop_policy == "causal" and c.drop_tokens and c.router == "token_choice":
                seq_len = _longest(position_T)  # causal budgets count over S positions
        keys_T = None
        if self.training and keyed.active() and (c.noise_policy or c.hidden_dropout > 0):
            keys_T = keyed.row_keys(x_TD.shape[0], x.device)
        plan, aux_loss, stats = self._route(self.router(x_TD, keys_T), ops, num_seqs, seq_len,
                                            position_T)
        if not in_backward():  # a checkpoint's recomputation leaves the forward's stats
            self.last_stats = stats
        autocast_on = torch.is_autocast_enabled(x.device.type)
        compute_dtype = torch.get_autocast_dtype(x.device.type) if autocast_on else x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc_TD = x_TD.to(compute_dtype)
            x_ND, counts_E, handle = self.dispatcher.dispatch(xc_TD, plan, ops)
            keys_N = None
            if self.training and c.hidden_dropout > 0:  # drawn where the tokens live
                keys_N = self.dispatcher.send_keys(_row_keys(plan, keys_T, x.device), handle)
            y_ND = self.experts(x_ND, counts_E, keys_N)
            y_TD = self.dispatcher.combine(y_ND, plan, handle, ops)
            if c.routed_scale != 1.0:  # DeepSeek-V3's routed_scaling_factor
                y_TD = y_TD * c.routed_scale
        if self.residual is not None:
            xr_TD = _dense_input(x_TD, self.residual, autocast_on)
            coef_T2 = F.softmax(self.residual_coef(xr_TD), dim=-1)
            mlp_TD = self.residual(xr_TD).to(y_TD.dtype)
            if c.dropout_branches:  # each branch drops its own output (ColossalAI Titans')
                y_TD, mlp_TD = self.dropout(y_TD), self.dropout(mlp_TD)
            y_TD = torch.lerp(mlp_TD, y_TD, coef_T2[:, :1].to(y_TD.dtype))
        if self.shared is not None:
            y_TD = y_TD + self.shared(_dense_input(x_TD, self.shared, autocast_on)).to(y_TD.dtype)
        if not c.dropout_branches:
            y_TD = self.dropout(y_TD)
        y = y_TD.to(x.dtype).reshape(x.shape)
        return (y, aux_loss, stats) if return_stats else (y, aux_loss)


MoeModule = MoE


def _positions(positions, x: Tensor) -> Tensor:
    """``forward``'s ``positions``, checked, as [T] int64 on the input's device."""
    if not (isinstance(positions, Tensor) and not positions.is_floating_point()
            and not positions.is_complex() and positions.dtype != torch.bool):
        what = f"a {positions.dtype} tensor" if isinstance(positions, Tensor) else \
            f"a {type(positions).__name__}"
        raise TypeError(f"positions must be an integer torch.Tensor, got {what}")
    if tuple(positions.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"positions must have the input's shape without its last dim, "
                         f"{tuple(x.shape[:-1])}, got {tuple(positions.shape)}")
    return positions.reshape(-1).to(device=x.device, dtype=torch.long)


def _longest(position_T: Tensor) -> int:
    """The largest position + 1 (one host read), refusing a negative position."""
    if position_T.numel() == 0:
        return 1
    low, high = torch.stack([position_T.min(), position_T.max()]).tolist()
    if low < 0:
        raise ValueError(f"positions must be >= 0, got {low}")
    return high + 1


def _row_keys(plan: routing.RoutingPlan, keys_T: Optional[Tensor], device) -> Tensor:
    """Hidden dropout's int32 key of each row of the expert-major buffer: drawn from the
    default generator, or under :func:`moesaic.keyed.sample_keys` the hash of (its token's
    key, its expert), the same whichever rank or micro-batch holds the token."""
    if keys_T is None:
        return draw_keys(plan.row_token_N.numel(), device)
    return keyed.expert_row_keys(keys_T, plan.row_token_N, plan.counts_E)


def moe_layers(module: nn.Module) -> list[MoE]:
    """The distinct MoE layers inside ``module``, in registration order (shared layers once)."""
    return [m for m in module.modules() if isinstance(m, MoE)]
