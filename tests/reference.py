"""A plain per-token loop implementation of the MoE semantics, to test the layer against.

It reads the layer's weights and recomputes everything with the slowest, most literal code:
ranking assignments choice by choice, filling each expert's capacity one token at a time.

Legend: T tokens, D model dim, E experts, K top-k.
"""
import math

import torch
import torch.nn.functional as F


def expert_ffn(layer, e, x_D):
    ex = layer.experts
    h = x_D @ ex.w1[e]
    if ex.b1 is not None:
        h = h + ex.b1[e]
    if ex.activation == "gelu":
        a = F.gelu(h)
    elif ex.activation == "relu":
        a = F.relu(h)
    else:
        a = F.silu(h) * (x_D @ ex.w3[e])
    y = a @ ex.w2[e]
    if ex.b2 is not None:
        y = y + ex.b2[e]
    return y


def token_experts(c, probs_E):
    """One token's top_k experts, best first: within its topk_groups best groups (a group scored
    by the sum of its two best scores) when routing is group-limited."""
    E, size = c.num_experts, c.num_experts // c.num_groups
    group_score = [sum(sorted(probs_E[g * size:(g + 1) * size].tolist(), reverse=True)[:2])
                   for g in range(c.num_groups)]
    groups = sorted(range(c.num_groups), key=lambda g: -group_score[g])[:c.topk_groups]
    allowed = [e for e in range(E) if e // size in groups]
    return sorted(allowed, key=lambda e: -probs_E[e].item())[:c.top_k]


def reference_forward(layer, x):
    """Returns (y, aux_loss, counts_before_drop, counts_kept) for a layer without noise."""
    c = layer.config
    num_seqs = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
    x_TD = x.reshape(-1, c.d_model)
    T, E = x_TD.shape[0], c.num_experts
    logits_TE = x_TD.float() @ layer.router.weight.t()
    if c.score_func == "sigmoid":  # DeepSeek-V3: independent scores, normalised for the loss
        probs_TE = torch.sigmoid(logits_TE)
        dist_TE = probs_TE / probs_TE.sum(-1, keepdim=True)
    else:
        probs_TE = dist_TE = torch.softmax(logits_TE, -1)
    cf = c.capacity_factor if layer.training else c.eval_capacity_factor
    outputs = [torch.zeros(c.d_model, dtype=x.dtype) for _ in range(T)]
    counts = [0] * E
    kept = [0] * E
    if c.router == "expert_choice":
        cap = min(T, math.ceil(cf * T / E))
        for e in range(E):
            order = sorted(range(T), key=lambda t: -probs_TE[t, e].item())[:cap]
            for t in order:
                outputs[t] = outputs[t] + probs_TE[t, e] * expert_ffn(layer, e, x_TD[t])
                kept[e] += 1
        counts = kept[:]
        balance = torch.zeros(())
    else:
        K = c.top_k
        topi = torch.stack([torch.tensor(token_experts(c, probs_TE[t])) for t in range(T)])
        topv = probs_TE.gather(1, topi)
        w_TK = topv / topv.sum(-1, keepdim=True) if c.normalize_weights else topv
        cap = max(c.min_capacity, math.ceil(cf * K * T / E)) if c.drop_tokens else None
        order = list(range(T))
        if cap is not None and c.drop_policy == "score":
            order = sorted(order, key=lambda t: -probs_TE[t, topi[t, 0]].item())
        seq_len = T // num_seqs
        seq_counts = [[0] * E for _ in range(num_seqs)]
        pairs = [(t, k) for k in range(K) for t in order]  # choice-major
        causal = c.drop_policy == "causal"
        if causal:  # by position, then choice, then sequence
            pairs = [(b * seq_len + s, k) for s in range(seq_len) for k in range(K)
                     for b in range(num_seqs)]

        def budget(t):  # causal: a position fills up to its share of the capacity so far
            return min(cap, -(-cap * (t % seq_len + 1) // seq_len)) if causal else cap

        for t, k in pairs:
            e = int(topi[t, k])
            counts[e] += 1
            seq_counts[t // seq_len][e] += 1
            if cap is not None and kept[e] >= budget(t):
                continue
            kept[e] += 1
            outputs[t] = outputs[t] + w_TK[t, k] * expert_ffn(layer, e, x_TD[t])
        if c.balance_scope == "sequence":
            balance = sum(E * (torch.tensor(seq_counts[i], dtype=torch.float32) / (seq_len * K)
                               * dist_TE[i * seq_len:(i + 1) * seq_len].mean(0)).sum()
                          for i in range(num_seqs)) / num_seqs
        else:
            f = torch.tensor(counts, dtype=torch.float32) / (T * K)
            balance = E * (f * dist_TE.mean(0)).sum()
    z = (torch.logsumexp(logits_TE, -1) ** 2).mean()
    y_TD = torch.stack(outputs)
    if layer.residual is not None:
        coef = torch.softmax(layer.residual_coef(x_TD), -1)
        y_TD = y_TD * coef[:, :1] + layer.residual(x_TD) * coef[:, 1:]
    if layer.shared is not None:
        y_TD = y_TD + layer.shared(x_TD)
    aux = c.aux_loss_coef * balance + c.z_loss_coef * z
    return y_TD.reshape(x.shape), aux, counts, kept
