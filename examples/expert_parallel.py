"""Expert parallelism end to end, runnable: the flow of docs/parallelism.md on a toy task.

Each rank holds 1 / world size of every MoE layer's experts (max_ep_size = world size: with 4
experts, 1, 2 or 4 processes), trains on its own
slice of each batch, and the gradients are synchronised by ``moesaic.parallelize``. The task:
regress a fixed random two-layer network, so the loss falls within a few dozen steps. Router
noise and dropout are keyed by sequence (``moesaic.sample_keys``) and the balance loss counts
the loads over all ranks (``balance_scope="global"``), so one process and two train alike:
the printed losses agree to float rounding.

    torchrun --nproc_per_node=2 examples/expert_parallel.py          # 2 processes, gloo on CPU
    python3 examples/expert_parallel.py                              # also runs in one process
    torchrun --nproc_per_node=2 examples/expert_parallel.py --topk-groups 1 --dedup

``--topk-groups M`` limits each token to the experts of M of ``--groups`` expert groups
(DeepSeek-V3's group limit; 2 groups: on 2 processes one group per rank, so a token's experts
sit on M ranks); ``--dedup`` sends a token to each rank holding its experts once
(``parallelize(..., dedup_tokens=True)``): compare the all-to-all bytes printed at the end. The
group count is fixed, not the world size, so one process routes as two do.

Rank 0 prints the loss, the all-to-all traffic and where the full checkpoint went.

Legend: B sequences per step (all ranks), b per rank, S sequence length, D model dim.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

import moesaic
from moesaic.models import MoEStack
from moesaic.parallel import comm_stats


def global_mean(x: torch.Tensor, world_size: int) -> float:
    """The mean over ranks of a rank's scalar (the whole batch's loss)."""
    if world_size > 1:
        torch.distributed.all_reduce(x)
    return x.item() / world_size


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch", type=int, default=16,
                   help="sequences per step over all ranks (B; each rank takes B / world size)")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
    p.add_argument("--topk-groups", type=int, default=None,
                   help="each token's experts within this many of --groups expert groups")
    p.add_argument("--groups", type=int, default=2,
                   help="expert groups for --topk-groups (2: on 2 processes, one per rank)")
    p.add_argument("--dedup", action="store_true",
                   help="send a token to a rank once, however many of its experts it holds")
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "moesaic_ep_example.pt"),
                   help="where rank 0 writes the full state dict")
    a = p.parse_args(argv)
    ctx = moesaic.init_distributed(timeout_s=120)  # reads torchrun's environment, if any
    moesaic.moe_set_seed(0)  # same shared weights everywhere, experts seeded by global id
    D, S = 32, 16
    groups = {}
    if a.topk_groups is not None:  # the same groups at every world size
        groups = dict(num_groups=a.groups, topk_groups=a.topk_groups)
    try:
        model = moesaic.parallelize(MoEStack(D, 64, [a.experts, a.experts], top_k=2,
                                             drop_tokens=False, balance_scope="global",
                                             noise_policy="gaussian", hidden_dropout=0.1,
                                             dropout=0.1, **groups), dedup_tokens=a.dedup)
    except ValueError as e:  # experts, groups and world size that do not fit together
        p.error(f"--experts {a.experts}, top-k 2"
                + (f", --groups {a.groups}, --topk-groups {a.topk_groups}" if groups else "")
                + f" on {ctx.world_size} process(es): {e}")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if a.batch % ctx.world_size:
        p.error(f"--batch ({a.batch}) must be divisible by the world size ({ctx.world_size})")
    b = a.batch // ctx.world_size
    mine = slice(ctx.rank * b, (ctx.rank + 1) * b)  # this rank's sequences of each batch
    target = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh(), torch.nn.Linear(D, D))
    torch.manual_seed(0)
    for q in target.parameters():  # the same target function on every rank
        torch.nn.init.normal_(q, std=0.3)
    first = last = None
    for step in range(1, a.steps + 1):
        g = torch.Generator().manual_seed(step)  # the step's global batch, the same everywhere
        x_bSD = torch.randn(a.batch, S, D, generator=g)[mine]
        keys_b = moesaic.keyed.draw_sample_keys(a.batch, g)[mine]  # one key per sequence
        with torch.no_grad():
            y_bSD = target(x_bSD)
        with moesaic.sample_keys(keys_b), moesaic.equal_batches(model):  # b * S tokens each
            out_bSD, aux = model(x_bSD)
            loss = torch.nn.functional.mse_loss(out_bSD, y_bSD)
            (loss + aux).backward()
        moesaic.clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = global_mean(loss.detach(), ctx.world_size)
        first = last if first is None else first
        if ctx.is_main and (step == 1 or step % 20 == 0):
            print(f"step {step:3d}  loss {last:.6f}", flush=True)
    state = moesaic.full_state_dict(model)  # collective: every rank calls it
    if ctx.is_main:
        torch.save(state, a.out)
        layer = model.moes[0]
        print(f"{ctx.world_size} process(es), experts per rank {layer.experts.num_local_experts} "
              f"of {layer.config.num_experts}; {comm_stats(model)}; loss {first:.6f} -> "
              f"{last:.6f}; full state dict ({len(state)} tensors) written to {a.out}",
              flush=True)
    moesaic.destroy()
    return last


if __name__ == "__main__":
    main()
