"""MoE layers in a model written without them, runnable: train a plain PyTorch ViT, upcycle it.

The model below knows nothing of moesaic: its blocks call a timm-style ``Mlp`` (fc1, act,
fc2). It trains dense on scikit-learn's 8x8 digits; ``moesaic.moeify_`` then swaps every MLP
for a top-2 MoE layer whose experts start as that MLP (sparse upcycling), so the accuracy right
after the swap is the dense model's; training goes on with the MoE aux losses collected by
``moesaic.collect_aux_loss`` once per step.

    python3 examples/upcycle_any_model.py            # about 20-25 s on 2 CPU cores

Legend: B batch, C channels, P patches, D model dim.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import moesaic
from moesaic.models import count_parameters


class Mlp(nn.Module):
    """timm's Mlp in shape: fc1, act, fc2."""

    def __init__(self, d: int, f: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = Mlp(d, 2 * d)

    def forward(self, x_BPD):
        h = self.norm1(x_BPD)
        x_BPD = x_BPD + self.attn(h, h, h, need_weights=False)[0]
        return x_BPD + self.mlp(self.norm2(x_BPD))


class TinyViT(nn.Module):
    """Patches of 2x2 pixels, a learned position embedding, mean pooling, a linear head."""

    def __init__(self, d: int = 64, depth: int = 4, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(1, d, 2, stride=2)
        self.pos = nn.Parameter(torch.zeros(1, 16, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x_BCHW):
        x_BPD = self.embed(x_BCHW).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x_BPD = blk(x_BPD)
        return self.head(self.norm(x_BPD).mean(1))


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1400], perm[1400:]
    x = (x - x[train_idx].mean()) / x[train_idx].std()  # the training set's statistics
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


@torch.no_grad()
def accuracy(model, test) -> float:
    model.eval()
    out = (model(test[0]).argmax(-1) == test[1]).float().mean().item()
    model.train()
    return out


def train(model, data, steps: int, lr: float, batch: int, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data[1]), (batch,), generator=g)
        loss = F.cross_entropy(model(data[0][idx]), data[1][idx])
        loss = loss + moesaic.collect_aux_loss(model)  # zero while the model is dense
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense-steps", type=int, default=300, help="steps of dense training")
    p.add_argument("--moe-steps", type=int, default=150, help="steps after upcycling")
    p.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    moesaic.moe_set_seed(0)
    data, test = digits()
    model = TinyViT()
    train(model, data, args.dense_steps, 2e-3, args.batch, seed=1)
    dense_acc = accuracy(model, test)
    names = moesaic.moeify_(model, args.experts, top_k=2, drop_tokens=False)
    upcycled_acc = accuracy(model, test)
    train(model, data, args.moe_steps, 5e-4, args.batch, seed=2)
    moe_acc = accuracy(model, test)
    loads = []
    with torch.no_grad():
        model.eval()
        model(test[0])
        for name in names:
            counts = model.get_submodule(name).last_stats.tokens_per_expert.float()
            loads.append((counts / counts.sum()).tolist())
    total, active = count_parameters(model)
    print(f"dense: {dense_acc:.2%} test accuracy after {args.dense_steps} steps")
    print(f"moeified {len(names)} MLPs ({args.experts} experts, top-2): {upcycled_acc:.2%} "
          f"right after upcycling, {moe_acc:.2%} after {args.moe_steps} more steps")
    print(f"parameters: {total:,} total, {active:,} active per token")
    for name, load in zip(names, loads):
        print(f"  {name}: token shares {' '.join(f'{s:.2f}' for s in load)}")
    return {"dense_accuracy": dense_acc, "upcycled_accuracy": upcycled_acc,
            "moe_accuracy": moe_acc, "expert_load": loads}


if __name__ == "__main__":
    main()
