"""All-to-all volume of an MoE layer and a simple time model (for docs and planning).

One exchange (dispatch, or combine) moves, from each rank, the rows routed to experts on the
other ep - 1 ranks of its group:

    dropless:  bytes = k * T * D * b * (ep - 1) / ep          (balanced routing)
    capacity:  bytes = E * C * D * b * (ep - 1) / ep,  C = min(T, max(min_capacity, ceil(cf * k * T / E)))

with T tokens per rank, D model dim, k top-k, b bytes per element. A training step runs four
exchanges per layer (dispatch and combine forward, their reverses backward); inference runs two.
Time of one exchange: latency + max(on-node bytes / intra-node bandwidth, off-node bytes /
inter-node bandwidth), peers spread evenly over ep - 1 ranks, ``gpus_per_node`` per node.

With ``dedup_tokens`` a token sends one row to each rank holding any of its experts
(:func:`ranks_per_token` of them, expected, under balanced routing) instead of k.

Legend: T tokens per rank, D model dim, E experts, K top-k, C capacity, ep expert-parallel size.
"""
from __future__ import annotations

from math import comb
from typing import Optional

from ..routing import token_choice_capacity


def alltoall_bytes_per_rank(tokens: int, d_model: int, top_k: int, ep_size: int,
                            bytes_per_elem: int = 2, num_experts: Optional[int] = None,
                            capacity_factor: Optional[float] = None,
                            min_capacity: int = 0) -> float:
    """Bytes one rank sends to other ranks in ONE exchange (dispatch or combine) of one layer;
    capacity mode when ``capacity_factor`` is given (then ``num_experts`` is needed), with C
    as the layer computes it."""
    if capacity_factor is None:
        rows = top_k * tokens
    else:
        if num_experts is None:
            raise ValueError("num_experts is needed with capacity_factor")
        rows = num_experts * token_choice_capacity(tokens, num_experts, top_k, capacity_factor,
                                                   min_capacity)
    return rows * d_model * bytes_per_elem * (ep_size - 1) / ep_size


def ranks_per_token(num_experts: int, ep_size: int, top_k: int, topk_groups: Optional[int] = None
                    ) -> float:
    """Expected number of distinct ranks among a token's top_k experts when the experts are
    uniformly random (balanced routing): what ``dedup_tokens`` sends per token instead of
    top_k rows. ``topk_groups`` = m: group-limited routing with one group per rank
    (``num_groups`` = ep_size), the k experts uniform within m uniform groups."""
    m = ep_size if topk_groups is None else topk_groups
    per_rank = num_experts // ep_size
    pool = m * per_rank  # experts a token may choose from
    if num_experts % ep_size or not 1 <= m <= ep_size or not 1 <= top_k <= pool:
        raise ValueError(f"no such routing: num_experts ({num_experts}) over ep_size ({ep_size}) "
                         f"ranks, top_k ({top_k}) within topk_groups ({m}) ranks' experts "
                         f"({pool})")
    return m * (1 - comb(pool - per_rank, top_k) / comb(pool, top_k))


def dedup_bytes_per_rank(tokens: int, d_model: int, top_k: int, ep_size: int, num_experts: int,
                         bytes_per_elem: int = 2, topk_groups: Optional[int] = None) -> float:
    """Bytes one rank sends to other ranks in one deduplicated dropless exchange, averaged over
    a training step's four: a row per remote (rank, token) pair, plus half of the 8-byte
    [pair index, weight] column per remote assignment (it travels with the dispatch and its
    backward, not with the combine)."""
    rows = ranks_per_token(num_experts, ep_size, top_k, topk_groups) * tokens
    remote = (ep_size - 1) / ep_size
    return rows * remote * d_model * bytes_per_elem + top_k * tokens * remote * 4


def predicted_alltoall_seconds(bytes_per_rank: float, ep_size: int, gpus_per_node: int = 8,
                               intra_gbps: float = 150.0, inter_gbps: float = 25.0,
                               latency_s: float = 30e-6) -> float:
    """Seconds for one exchange of ``bytes_per_rank`` off-rank bytes per rank (bandwidths in
    GB/s per GPU: defaults NVLink-class 150 GB/s inside a node, 200 Gb/s = 25 GB/s per GPU
    between nodes)."""
    if ep_size <= 1:
        return 0.0
    peers = ep_size - 1
    on_node = min(gpus_per_node, ep_size) - 1
    on_b = bytes_per_rank * on_node / peers
    off_b = bytes_per_rank - on_b
    return latency_s + max(on_b / (intra_gbps * 1e9), off_b / (inter_gbps * 1e9))


def table(gpus=(8, 64, 512), tokens: int = 8192, d_model: int = 4096, top_k: int = 2,
          capacity_factor: float = 1.25, bytes_per_elem: int = 2) -> str:
    """The predicted-time table of docs/parallelism.md (one expert per GPU, E = ep = GPUs)."""
    lines = ["| GPUs (= ep = E) | MB per rank per exchange, cf 1.25 / dropless | one exchange "
             "(ms), cf 1.25 / dropless | per layer per training step, 4 exchanges (ms), "
             "cf 1.25 / dropless |", "|---|---|---|---|"]
    for n in gpus:
        b_cap = alltoall_bytes_per_rank(tokens, d_model, top_k, n, bytes_per_elem, n,
                                        capacity_factor)
        b_free = alltoall_bytes_per_rank(tokens, d_model, top_k, n, bytes_per_elem)
        t_cap, t_free = (predicted_alltoall_seconds(b, n) for b in (b_cap, b_free))
        lines.append(f"| {n} | {b_cap / 1e6:.1f} / {b_free / 1e6:.1f} | {t_cap * 1e3:.2f} / "
                     f"{t_free * 1e3:.2f} | {4 * t_cap * 1e3:.1f} / {4 * t_free * 1e3:.1f} |")
    return "\n".join(lines)


def dedup_table(ep_size: int = 8, num_experts: int = 64, tokens: int = 8192, d_model: int = 4096,
                top_ks=(2, 4, 8), bytes_per_elem: int = 2) -> str:
    """MB per rank per exchange, plain against ``dedup_tokens`` (unlimited, and with one expert
    group per rank and topk_groups m), balanced routing."""
    lines = [f"| top_k | plain | dedup, unlimited | dedup, 2 of {ep_size} groups | "
             f"dedup, 1 of {ep_size} groups |", "|---|---|---|---|---|"]
    for k in top_ks:
        plain = alltoall_bytes_per_rank(tokens, d_model, k, ep_size, bytes_per_elem)
        cells = [dedup_bytes_per_rank(tokens, d_model, k, ep_size, num_experts, bytes_per_elem, m)
                 for m in (None, 2, 1)]
        lines.append(f"| {k} | {plain / 1e6:.1f} | "
                     + " | ".join(f"{c / 1e6:.1f} ({c / plain:.2f})" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    """``python -m moesaic.parallel.volume``: the docs' tables, or one layer's numbers for the
    sizes given (planning a run: bytes and predicted time per exchange, plain and deduplicated)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m moesaic.parallel.volume",
                                description="All-to-all bytes and predicted time of one MoE "
                                            "layer's exchange (balanced routing). Without "
                                            "--tokens: the tables of docs/parallelism.md.")
    p.add_argument("--tokens", type=int, help="tokens per rank (per GPU) in one forward")
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, default=8, help="expert-parallel size (ranks)")
    p.add_argument("--topk-groups", type=int, default=None,
                   help="group limit with one group per rank (num_groups = --ep)")
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="capacity mode (default: dropless)")
    p.add_argument("--bytes", type=int, default=2, help="bytes per element (2: bf16)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=150.0, help="GB/s per GPU in a node")
    p.add_argument("--inter-gbps", type=float, default=25.0, help="GB/s per GPU between nodes")
    a = p.parse_args(argv)
    if a.tokens is None:
        print(table())
        print()
        print(dedup_table())
        return
    if a.experts % a.ep:
        p.error(f"--experts ({a.experts}) is not divisible by --ep ({a.ep})")
    groups = a.ep if a.topk_groups is None else a.topk_groups
    if not 1 <= groups <= a.ep or not 1 <= a.top_k <= groups * a.experts // a.ep:
        p.error(f"--top-k ({a.top_k}) must be at most the experts of --topk-groups ({groups}) "
                f"of --ep ({a.ep}) ranks: {groups * a.experts // a.ep}")
    cap = {} if a.capacity_factor is None else dict(num_experts=a.experts,
                                                   capacity_factor=a.capacity_factor)
    rows = [("plain", alltoall_bytes_per_rank(a.tokens, a.d_model, a.top_k, a.ep, a.bytes,
                                              **cap))]
    if a.capacity_factor is None and a.top_k > 1:
        rows.append(("dedup_tokens", dedup_bytes_per_rank(a.tokens, a.d_model, a.top_k, a.ep,
                                                          a.experts, a.bytes, a.topk_groups)))
    print(f"T={a.tokens} per rank, D={a.d_model}, E={a.experts}, top_k={a.top_k}, ep={a.ep}"
          + (f", {a.topk_groups} of {a.ep} groups" if a.topk_groups else "")
          + (f", capacity factor {a.capacity_factor}" if a.capacity_factor else ", dropless")
          + f", {a.bytes} bytes/element; {a.gpus_per_node} GPUs/node, {a.intra_gbps:g} / "
          f"{a.inter_gbps:g} GB/s per GPU inside / between nodes")
    for name, b in rows:
        t = predicted_alltoall_seconds(b, a.ep, a.gpus_per_node, a.intra_gbps, a.inter_gbps)
        print(f"{name:>13}: {b / 1e6:9.2f} MB per rank per exchange, {t * 1e3:7.3f} ms; "
              f"per training step (4 exchanges) {4 * t * 1e3:8.3f} ms")


if __name__ == "__main__":
    main()
