"""All-to-all volume of an MoE layer and a simple time model (for docs and planning).

One exchange (dispatch, or combine) moves, from each rank, the rows routed to experts on the
other ep - 1 ranks of its group:

    dropless:  bytes = k * T * D * b * (ep - 1) / ep          (balanced routing)
    capacity:  bytes = E * C * D * b * (ep - 1) / ep,  C = min(T, max(min_capacity, ceil(cf * k * T / E)))

with T tokens per rank, D model dim, k top-k, b bytes per element. A training step runs four
exchanges per layer (dispatch and combine forward, their reverses backward); inference runs two.
Time of one exchange: latency + max(on-node bytes / intra-node bandwidth, off-node bytes /
inter-node bandwidth), peers spread evenly over ep - 1 ranks, ``gpus_per_node`` per node.

Legend: T tokens per rank, D model dim, E experts, K top-k, C capacity, ep expert-parallel size.
"""
from __future__ import annotations

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


if __name__ == "__main__":
    print(table())
