"""Batched data augmentation on tensors, on the training device (no PIL, no torchvision).

Every op takes a float batch ``x_BCHW`` in [0, 1] and a per-image magnitude ``v_B``, so one call
transforms a whole batch with per-image parameters. AutoAugment (the CIFAR-10 policy of Cubuk et
al., 2019) and RandAugment (Cubuk et al., 2020) pick an op per image and apply each op once to
the images that chose it. Randomness comes from the generator passed in (seeded per step by the
trainer), so a step's augmentation is reproducible; wrapped in :class:`Draws`, every draw is
made for the whole global batch and sliced, so an image is augmented the same whichever rank
or micro-batch holds it.

Legend: B batch, C channels, H/W height/width, L 256 grey levels.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Draws:
    """Per-image random numbers for images [start, start + B) of a batch of ``total``: each
    call draws ``total`` numbers from ``gen`` and keeps that slice (``total=None``: just B)."""

    def __init__(self, gen: torch.Generator, total: Optional[int] = None, start: int = 0):
        self.gen, self.total, self.start = gen, total, start

    def _slice(self, draw, B: int) -> Tensor:
        if self.total is None:
            return draw(B)
        if self.start + B > self.total:
            raise ValueError(f"images [{self.start}, {self.start + B}) are not inside a batch "
                             f"of {self.total}")
        return draw(self.total)[self.start:self.start + B]

    def rand(self, B: int, device) -> Tensor:
        return self._slice(lambda n: torch.rand(n, generator=self.gen, device=device), B)

    def randint(self, high: int, B: int, device) -> Tensor:
        return self._slice(lambda n: torch.randint(high, (n,), generator=self.gen,
                                                   device=device), B)


def _draws(gen) -> Draws:
    return gen if isinstance(gen, Draws) else Draws(gen)


def _gray(x_BCHW: Tensor) -> Tensor:
    if x_BCHW.shape[1] == 1:
        return x_BCHW
    w_C = x_BCHW.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x_BCHW * w_C).sum(1, keepdim=True)


def _blend(a: Tensor, b: Tensor, f_B: Tensor) -> Tensor:
    """b + f * (a - b), clamped: f = 1 gives a, f = 0 gives b."""
    f = f_B.view(-1, 1, 1, 1)
    return (b + f * (a - b)).clamp_(0, 1)


def _affine(x_BCHW: Tensor, theta_B23: Tensor) -> Tensor:
    grid = F.affine_grid(theta_B23, list(x_BCHW.shape), align_corners=False)
    return F.grid_sample(x_BCHW, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _eye(x: Tensor) -> Tensor:
    return torch.eye(2, 3, dtype=x.dtype, device=x.device).repeat(x.shape[0], 1, 1)


def shear_x(x, v_B):
    t = _eye(x)
    t[:, 0, 1] = v_B
    return _affine(x, t)


def shear_y(x, v_B):
    t = _eye(x)
    t[:, 1, 0] = v_B
    return _affine(x, t)


def translate_x(x, v_B):
    """Shift right by v pixels."""
    t = _eye(x)
    t[:, 0, 2] = -2 * v_B / x.shape[-1]
    return _affine(x, t)


def translate_y(x, v_B):
    t = _eye(x)
    t[:, 1, 2] = -2 * v_B / x.shape[-2]
    return _affine(x, t)


def rotate(x, v_B):
    """Rotate by v degrees about the centre."""
    r = v_B * (math.pi / 180)
    t = _eye(x)
    t[:, 0, 0], t[:, 0, 1] = torch.cos(r), -torch.sin(r)
    t[:, 1, 0], t[:, 1, 1] = torch.sin(r), torch.cos(r)
    return _affine(x, t)


def brightness(x, f_B):
    return _blend(x, torch.zeros_like(x), f_B)


def color(x, f_B):
    return _blend(x, _gray(x).expand_as(x), f_B)


def contrast(x, f_B):
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), f_B)


def sharpness(x, f_B):
    """Blend with a 3x3 smoothed copy (border pixels kept), as PIL's sharpness does."""
    C = x.shape[1]
    k = x.new_tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    smooth = F.conv2d(x, k.expand(C, 1, 3, 3), groups=C)
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = smooth
    return _blend(x, blurred, f_B)


def _levels(x: Tensor) -> Tensor:
    return (x * 255).round_().long()


def posterize(x, bits_B):
    """Keep the top ``bits`` bits of each 8-bit value."""
    step = (2 ** (8 - bits_B.round().long())).view(-1, 1, 1, 1)
    q = _levels(x)
    return (q - q % step).to(x.dtype) / 255


def solarize(x, thr_B):
    """Invert every value at or above the threshold (in [0, 1])."""
    return torch.where(x >= thr_B.view(-1, 1, 1, 1), 1 - x, x)


def autocontrast(x, _v_B=None):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1 / (hi - lo).clamp(min=1e-12), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0, 1)


def equalize(x, _v_B=None):
    """Histogram equalisation per image and channel (PIL's lookup-table rule)."""
    B, C, H, W = x.shape
    q_MP = _levels(x).view(B * C, H * W)
    hist_ML = torch.zeros(B * C, 256, dtype=torch.long, device=x.device)
    hist_ML.scatter_add_(1, q_MP, torch.ones_like(q_MP))
    last_M = torch.where(hist_ML > 0, torch.arange(256, device=x.device), -1).amax(1, keepdim=True)
    step_M = (H * W - hist_ML.gather(1, last_M)) // 255
    cum_ML = torch.cumsum(hist_ML, 1) - hist_ML  # counts strictly below each level
    lut_ML = ((cum_ML + step_M // 2) // step_M.clamp(min=1)).clamp_(max=255)
    out_MP = torch.where(step_M > 0, lut_ML.gather(1, q_MP), q_MP)
    return (out_MP.to(x.dtype) / 255).view(B, C, H, W)


def invert(x, _v_B=None):
    return 1 - x


def identity(x, _v_B=None):
    return x


OPS = {
    "Identity": identity, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x,
    "TranslateY": translate_y, "Rotate": rotate, "Brightness": brightness, "Color": color,
    "Contrast": contrast, "Sharpness": sharpness, "Posterize": posterize, "Solarize": solarize,
    "AutoContrast": autocontrast, "Equalize": equalize, "Invert": invert,
}
SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness"}


def magnitude(name: str, level_B: Tensor, num_levels: int, img_size: int) -> Tensor:
    """Map a level in [0, num_levels - 1] to the op's argument (before the random sign)."""
    frac = level_B / (num_levels - 1)
    if name in ("ShearX", "ShearY"):
        return 0.3 * frac
    if name in ("TranslateX", "TranslateY"):
        return (150 / 331 * img_size) * frac
    if name == "Rotate":
        return 30.0 * frac
    if name in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * frac
    if name == "Posterize":
        return 8 - (4 * frac).round()
    if name == "Solarize":
        return 1.0 - frac
    return torch.zeros_like(frac)


def apply_ops(x_BCHW: Tensor, names: list, op_B: Tensor, level_B: Tensor, num_levels: int,
              gen) -> Tensor:
    """Apply ``names[op_B[i]]`` at ``level_B[i]`` to image i (op -1: leave the image alone)."""
    sign_B = torch.where(_draws(gen).rand(op_B.shape[0], op_B.device) < 0.5, -1.0, 1.0)
    out = x_BCHW.clone()
    for i, name in enumerate(names):
        sel = (op_B == i).nonzero().squeeze(1)
        if sel.numel() == 0 or name == "Identity":
            continue
        v = magnitude(name, level_B[sel].to(x_BCHW.dtype), num_levels, x_BCHW.shape[-1])
        if name in SIGNED:
            v = v * sign_B[sel].to(v.dtype)
            if name in ("Brightness", "Color", "Contrast", "Sharpness"):
                v = 1 + v
        out[sel] = OPS[name](x_BCHW[sel], v)
    return out


# AutoAugment's CIFAR-10 policy: 25 sub-policies of two (op, probability, level in 0..9).
CIFAR10_POLICY = (
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)), (("Equalize", 0.2, 0), ("AutoContrast", 0.6, 0)),
    (("Equalize", 0.2, 8), ("Equalize", 0.6, 4)), (("Color", 0.9, 9), ("Equalize", 0.6, 6)),
    (("AutoContrast", 0.8, 4), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)), (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
)
AA_NAMES = sorted({op for sub in CIFAR10_POLICY for op, _, _ in sub})


def auto_augment_cifar10(x_BCHW: Tensor, gen) -> Tensor:
    """Each image draws one sub-policy and applies its two ops, each with its probability."""
    B, dev, draws = x_BCHW.shape[0], x_BCHW.device, _draws(gen)
    sub_B = draws.randint(len(CIFAR10_POLICY), B, dev)
    for j in range(2):
        op_P = torch.tensor([AA_NAMES.index(s[j][0]) for s in CIFAR10_POLICY], device=dev)
        prob_P = torch.tensor([s[j][1] for s in CIFAR10_POLICY], device=dev)
        level_P = torch.tensor([float(s[j][2]) for s in CIFAR10_POLICY], device=dev)
        apply_B = draws.rand(B, dev) < prob_P[sub_B]
        op_B = torch.where(apply_B, op_P[sub_B], -1)
        x_BCHW = apply_ops(x_BCHW, AA_NAMES, op_B, level_P[sub_B], 10, draws)
    return x_BCHW


RA_NAMES = ["Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
            "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize"]


def rand_augment(x_BCHW: Tensor, num_ops: int, level: int, gen) -> Tensor:
    """``num_ops`` ops drawn uniformly per image, all at ``level`` (of 31 levels, 0..30)."""
    B, dev, draws = x_BCHW.shape[0], x_BCHW.device, _draws(gen)
    level_B = torch.full((B,), float(level), device=dev)
    for _ in range(num_ops):
        op_B = draws.randint(len(RA_NAMES), B, dev)
        x_BCHW = apply_ops(x_BCHW, RA_NAMES, op_B, level_B, 31, draws)
    return x_BCHW


def random_crop(x_BCHW: Tensor, padding: int, gen) -> Tensor:
    """Zero-pad by ``padding`` and crop back to H x W at a random offset per image."""
    B, C, H, W = x_BCHW.shape
    xp = F.pad(x_BCHW, (padding,) * 4)
    draws = _draws(gen)
    dy_B = draws.randint(2 * padding + 1, B, x_BCHW.device)
    dx_B = draws.randint(2 * padding + 1, B, x_BCHW.device)
    rows_BH = dy_B[:, None] + torch.arange(H, device=x_BCHW.device)
    cols_BW = dx_B[:, None] + torch.arange(W, device=x_BCHW.device)
    b = torch.arange(B, device=x_BCHW.device)[:, None, None]
    out_BHWC = xp.permute(0, 2, 3, 1)[b, rows_BH[:, :, None], cols_BW[:, None, :]]
    return out_BHWC.permute(0, 3, 1, 2).contiguous()


def random_hflip(x_BCHW: Tensor, gen) -> Tensor:
    flip_B = _draws(gen).rand(x_BCHW.shape[0], x_BCHW.device) < 0.5
    return torch.where(flip_B.view(-1, 1, 1, 1), x_BCHW.flip(-1), x_BCHW)


def partners(B: int, start: int, device) -> Tensor:
    """Mixing partner of each image: images 2j and 2j + 1 of the global batch pair up (``start``
    is the global index of image 0 here); an image whose partner is not in this slice (an odd
    slice, or the odd last image) is its own partner."""
    global_B = torch.arange(start, start + B, device=device)
    local_B = (global_B ^ 1) - start
    return torch.where((local_B >= 0) & (local_B < B), local_B, global_B - start)


def mix(x_BCHW: Tensor, y_B: Tensor, mixup_alpha: float, cutmix_alpha: float, prob: float,
        switch_prob: float, rng: np.random.Generator, start: int = 0):
    """Mixup or cutmix, pairing images 2j and 2j + 1 of the global batch (:func:`partners`; this
    slice starts at image ``start``). Returns (x, y_a, y_b, lam): the loss is
    ``lam * loss(y_a) + (1 - lam) * loss(y_b)``. ``rng`` draws the batch's lam and box, so ranks
    and micro-batches seeded alike mix alike."""
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or rng.random() >= prob:
        return x_BCHW, y_B, y_B, 1.0
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    partner_B = partners(x_BCHW.shape[0], start, x_BCHW.device)
    x2, y2 = x_BCHW[partner_B], y_B[partner_B]
    if not use_cutmix:
        return x_BCHW * lam + x2 * (1 - lam), y_B, y2, lam
    H, W = x_BCHW.shape[-2:]
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    cy, cx = int(rng.integers(H)), int(rng.integers(W))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    out = x_BCHW.clone()
    out[..., y0:y1, x0:x1] = x2[..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    return out, y_B, y2, lam


def normalize(x_BCHW: Tensor, mean: tuple, std: tuple) -> Tensor:
    m = x_BCHW.new_tensor(mean).view(1, -1, 1, 1)
    s = x_BCHW.new_tensor(std).view(1, -1, 1, 1)
    return (x_BCHW - m) / s


class Augmenter:
    """The training-time pipeline a config asks for: crop, flip, AutoAugment or RandAugment,
    normalisation, then mixup/cutmix."""

    def __init__(self, cfg, mean: tuple, std: tuple):
        self.cfg, self.mean, self.std = cfg, mean, std

    def __call__(self, images_BCHW_u8: Tensor, y_B: Tensor, gen,
                 rng: Optional[np.random.Generator] = None, start: int = 0):
        """``gen``: a generator or :class:`Draws`; ``start``: the global index of image 0 (mixing
        partners)."""
        c = self.cfg
        x = images_BCHW_u8.float() / 255
        if c.crop_padding > 0:
            x = random_crop(x, c.crop_padding, gen)
        if c.hflip:
            x = random_hflip(x, gen)
        if c.auto_augment == "cifar10":
            x = auto_augment_cifar10(x, gen)
        if c.randaug_ops > 0:
            x = rand_augment(x, c.randaug_ops, c.randaug_magnitude, gen)
        x = normalize(x, self.mean, self.std)
        if rng is None:
            return x, y_B, y_B, 1.0
        return mix(x, y_B, c.mixup_alpha, c.cutmix_alpha, c.mix_prob, c.mix_switch_prob, rng,
                   start)
