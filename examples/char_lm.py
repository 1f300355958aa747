"""A character-level causal language model with MoE feed-forward layers, in one file.

Shows the layer outside vision: tokens arrive as [B, S, D], the layer returns its output and
its auxiliary loss, and the loss is added to the model's. Trains on the source of a few modules
of Python's standard library (always on disk), about 15 s on 2 CPU cores (15 s wall on
2026-12-02, 2-core Xeon, with 8 experts; validation loss 1.89; benchmarks/results/examples.txt):

    python3 examples/char_lm.py                 # 300 steps
    python3 examples/char_lm.py --steps 20 --experts 8
    python3 examples/char_lm.py --routing deepseek --experts 8

``--routing deepseek`` swaps Switch-style routing (top-1, softmax, capacity 1.25 with causal
drops, jitter, balance loss 0.01) for DeepSeek-V3's (top-2 here): sigmoid scores, selection
biases moved after every step (``moesaic.update_expert_biases``), a per-sequence balance loss at
1e-4, each token limited to half of the expert groups (pairs of experts), one shared expert,
nothing dropped.

Both keep the model causal: a token's output depends on no later token of its sequence.
``drop_policy="causal"`` fills an expert's capacity position by position (every sequence's
position 0, then every position 1, ...; each position up to its share of the capacity so far),
so no drop depends on a later position, and dropless routing drops nothing. The layer's
default position priority ranks every first choice before any second one and the batch's
sequences one after another, and score priority and expert choice rank by score: there a
later token can take the capacity an earlier one needed (docs/architecture.md).
``--drop-policy`` and ``--capacity-factor`` override the recipe's; benchmarks/drop_policy.py
trains with each policy and compares (docs/benchmarks.md).

Prints the loss as it trains, then each MoE layer's share of tokens per expert.

Legend: B sequences, S sequence length, D model dim, V vocabulary, E experts.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic


def corpus() -> str:
    return "".join(inspect.getsource(m) for m in (json, argparse, inspect))


def _deepseek(num_experts: int) -> dict:
    groups = max(1, num_experts // 2)
    return dict(score_func="sigmoid", bias_update_rate=1e-3, aux_loss_coef=1e-4,
                balance_scope="sequence", num_groups=groups, topk_groups=max(1, groups // 2),
                num_shared_experts=1, drop_tokens=False)


TOP_K = {"switch": 1, "deepseek": 2}  # each recipe's experts per token (--top-k's default)
ROUTING = {  # each routing recipe's moesaic.MoE options, given the expert count
    "switch": lambda num_experts: dict(capacity_factor=1.25, noise_policy="jitter",
                                       drop_policy="causal"),
    "deepseek": _deepseek,
}


class Block(nn.Module):
    """Pre-norm causal self-attention, then a pre-norm MoE feed-forward."""

    def __init__(self, d_model: int, num_heads: int, num_experts: int, top_k: int,
                 routing: str = "switch", **moe_overrides):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.moe = moesaic.MoE(d_model, 4 * d_model, num_experts, top_k=top_k,
                               **{**ROUTING[routing](num_experts), **moe_overrides})

    def forward(self, x_BSD):
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.num_heads, -1).unbind(2)
        a_BHSd = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                v.transpose(1, 2), is_causal=True)
        x_BSD = x_BSD + self.proj(a_BHSd.transpose(1, 2).reshape(B, S, D))
        y_BSD, aux, stats = self.moe(self.norm2(x_BSD), return_stats=True)
        return x_BSD + y_BSD, aux, stats


class CharLM(nn.Module):
    def __init__(self, vocab: int, seq_len: int, d_model: int, depth: int, num_heads: int,
                 num_experts: int, top_k: int, routing: str = "switch", **moe_overrides):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(Block(d_model, num_heads, num_experts, top_k, routing,
                                          **moe_overrides) for _ in range(depth))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx_BS):
        x_BSD = self.tok(idx_BS) + self.pos[: idx_BS.shape[1]]
        aux, stats = x_BSD.new_zeros(()), []
        for block in self.blocks:
            x_BSD, a, s = block(x_BSD)
            aux = aux + a
            stats.append(s)
        return self.head(self.norm(x_BSD)), aux, stats


def _overrides(a: argparse.Namespace) -> dict:
    """The MoE options the command line sets over the routing recipe's."""
    overrides = {} if a.drop_policy is None else {"drop_policy": a.drop_policy}
    if a.capacity_factor is not None:
        overrides["capacity_factor"] = a.capacity_factor
    return overrides


def _check(p: argparse.ArgumentParser, a: argparse.Namespace, top_k_given: bool) -> None:
    """Refuse what the model or the loop cannot take, as argparse refuses a bad choice (the
    usage and the reason on stderr, exit status 2), before anything is built."""
    for name in ("steps", "batch", "seq_len", "d_model", "depth", "heads", "experts",
                 "val_batches", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    if a.d_model % a.heads:
        p.error(f"--d-model ({a.d_model}) is not divisible by --heads ({a.heads})")
    if not 1 <= a.top_k <= a.experts:
        given = "" if top_k_given else f", the {a.routing} routing's default"
        p.error(f"--top-k ({a.top_k}{given}) is not in [1, --experts ({a.experts})]")
    if a.capacity_factor is not None and not (0 < a.capacity_factor < math.inf):
        p.error(f"--capacity-factor must be a finite number > 0, got {a.capacity_factor}")
    if not 0 <= a.lr < math.inf:
        p.error(f"--lr must be a finite number >= 0, got {a.lr}")
    try:
        moesaic.MoEConfig(a.d_model, 4 * a.d_model, a.experts, a.top_k,
                          **{**ROUTING[a.routing](a.experts), **_overrides(a)})
    except ValueError as e:
        p.error(f"--routing {a.routing} with --experts {a.experts} and --top-k {a.top_k}: {e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token (default: the routing's, switch 1, deepseek 2)")
    p.add_argument("--routing", choices=sorted(ROUTING), default="switch",
                   help="switch: softmax, capacity 1.25 (causal drops), jitter, balance loss "
                        "0.01; deepseek: DeepSeek-V3's (see the module docstring)")
    p.add_argument("--drop-policy", choices=("position", "score", "causal"), default=None,
                   help="which assignments a full expert drops (default: the routing's, switch "
                        "causal; position and score let later tokens change earlier outputs)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="training capacity factor (default: the routing's, switch 1.25; "
                        "deepseek drops nothing)")
    p.add_argument("--val-batches", type=int, default=1,
                   help="validation batches of --batch sequences to average the loss over")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: tiny matrices gain little from more, and a shared "
                        "machine's cores stall them)")
    a = p.parse_args(argv)
    top_k_given = a.top_k is not None
    if not top_k_given:
        a.top_k = TOP_K[a.routing]
    _check(p, a, top_k_given)
    torch.set_num_threads(a.threads)

    text = corpus()
    chars = sorted(set(text))
    data_N = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    split = int(0.9 * len(data_N))
    train_N, val_N = data_N[:split], data_N[split:]
    if a.seq_len > len(val_N) - 2:
        p.error(f"--seq-len ({a.seq_len}) is longer than the validation text allows "
                f"({len(val_N) - 2} at most)")
    moesaic.moe_set_seed(a.seed)
    model = CharLM(len(chars), a.seq_len, a.d_model, a.depth, a.heads, a.experts, a.top_k,
                   a.routing, **_overrides(a))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(a.seed)

    def batch(src_N):
        start_B = torch.randint(0, len(src_N) - a.seq_len - 1, (a.batch,), generator=g)
        idx_BS = torch.stack([src_N[s:s + a.seq_len + 1] for s in start_B.tolist()])
        return idx_BS[:, :-1], idx_BS[:, 1:]

    print(f"corpus {len(text):,} chars, vocab {len(chars)}; {a.depth} blocks, D={a.d_model}, "
          f"{a.experts} experts top-{a.top_k}, {a.routing} routing; "
          f"{sum(q.numel() for q in model.parameters()):,} parameters")
    t0, every, dropped = time.perf_counter(), max(1, a.steps // 10), 0.0
    for step in range(1, a.steps + 1):
        lr = a.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / a.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x_BS, y_BS = batch(train_N)
        logits_BSV, aux, step_stats = model(x_BS)
        loss = F.cross_entropy(logits_BSV.flatten(0, 1), y_BS.flatten())
        dropped += sum(float(s.dropped_fraction) for s in step_stats) / len(step_stats)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        moesaic.update_expert_biases(model)  # selection biases (deepseek); a no-op otherwise
        if step % every == 0 or step == a.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  aux {aux.item():.4f}  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    model.eval()
    with torch.no_grad():
        vals = []
        for _ in range(a.val_batches):
            x_BS, y_BS = batch(val_N)
            logits_BSV, _, stats = model(x_BS)
            vals.append(F.cross_entropy(logits_BSV.flatten(0, 1), y_BS.flatten()).item())
        val = sum(vals) / len(vals)
    loads = []
    for i, s in enumerate(stats):
        counts_E = s.tokens_per_expert.float()
        loads.append((counts_E / counts_E.sum()).tolist())
        print(f"block {i} expert load: " + " ".join(f"{s:.2f}" for s in loads[-1]))
    print(f"validation loss {val:.3f} (a uniform guess: {math.log(len(chars)):.3f})")
    return {"train_loss": loss.item(), "val_loss": val, "expert_load": loads,
            "train_dropped_fraction": dropped / a.steps}


if __name__ == "__main__":
    main()
