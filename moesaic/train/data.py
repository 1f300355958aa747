"""Datasets held in memory as uint8 tensors, and per-rank shards of each epoch.

CIFAR-10 is read from the python-pickle batches its authors distribute (nothing is downloaded);
the digits set is the 1,797 8x8 images scikit-learn ships. Images stay uint8 [N, C, H, W] on the
training device; batches are gathered by index and augmented there.

Legend: N images, C channels, H/W height/width, B global batch, b per-rank batch.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


class DataError(RuntimeError):
    """Missing or damaged data files; the message says where we looked and what we expect."""


@dataclass
class ImageSet:
    """Images (uint8 [N, C, H, W]) with labels (int64 [N]) and the normalisation to apply."""

    images_NCHW: Tensor
    labels_N: Tensor
    mean: tuple
    std: tuple
    num_classes: int

    def __len__(self) -> int:
        return self.labels_N.shape[0]

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images_NCHW.to(device), self.labels_N.to(device), self.mean,
                        self.std, self.num_classes)

    @property
    def shape(self) -> tuple:
        return tuple(self.images_NCHW.shape[1:])


CIFAR_LAYOUT = (
    "expected layout (the python version of CIFAR-10 as distributed at "
    "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked):\n"
    f"  $DATA/{CIFAR_DIR}/data_batch_1 .. data_batch_5, test_batch\n"
    f"  (or $DATA pointing at the {CIFAR_DIR} folder itself); each file a pickle of a dict with\n"
    "  b'data' (uint8 [10000, 3072], rows of 1024 red, 1024 green, 1024 blue values of a 32x32\n"
    "  image) and b'labels' (10000 ints in 0..9)"
)


def find_cifar_dir(data_dir: Optional[str]) -> str:
    """The folder holding the CIFAR-10 batches, from ``data_dir`` or $DATA."""
    root = data_dir if data_dir is not None else os.environ.get("DATA")
    if not root:
        raise DataError("CIFAR-10: no data location: set $DATA (or the config's data_dir)\n"
                        + CIFAR_LAYOUT)
    candidates = [os.path.join(root, CIFAR_DIR), root]
    for d in candidates:
        if os.path.isfile(os.path.join(d, CIFAR_TRAIN[0])):
            return d
    looked = "\n".join(f"  {os.path.abspath(d)}" for d in candidates)
    raise DataError(f"CIFAR-10 not found: looked for {CIFAR_TRAIN[0]} in\n{looked}\n" + CIFAR_LAYOUT)


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10: missing file {os.path.abspath(path)}\n" + CIFAR_LAYOUT)
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"CIFAR-10: cannot read {os.path.abspath(path)} "
                        f"({type(e).__name__}: {e}); the file is damaged\n" + CIFAR_LAYOUT) from e
    if not isinstance(d, dict):
        raise DataError(f"CIFAR-10: {os.path.abspath(path)} holds a {type(d).__name__}, "
                        "not a dict\n" + CIFAR_LAYOUT)
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"CIFAR-10: {os.path.abspath(path)} has keys {sorted(d)}, expected "
                        "'data' and 'labels'\n" + CIFAR_LAYOUT)
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10: {os.path.abspath(path)}: 'data' is {data.dtype} "
                        f"{list(data.shape)}, expected uint8 [N, 3072]\n" + CIFAR_LAYOUT)
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"CIFAR-10: {os.path.abspath(path)}: 'labels' must be {data.shape[0]} "
                        f"ints in 0..9\n" + CIFAR_LAYOUT)
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: Optional[str] = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the pickle batches under ``data_dir`` or $DATA."""
    d = find_cifar_dir(data_dir)
    parts = [_read_cifar_batch(os.path.join(d, n)) for n in CIFAR_TRAIN]
    x_te, y_te = _read_cifar_batch(os.path.join(d, CIFAR_TEST))
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    mk = lambda x, y: ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                               CIFAR_MEAN, CIFAR_STD, 10)
    return mk(x_tr, y_tr), mk(x_te, y_te)


def load_digits() -> tuple[ImageSet, ImageSet]:
    """scikit-learn's handwritten digits (8x8, 17 grey levels), split with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    n_test = int(round(len(y) * DIGITS_TEST_FRACTION))
    te, tr = perm[:n_test], perm[n_test:]
    xf = x.astype(np.float64) / 255.0
    mean, std = (float(xf[tr].mean()),), (float(xf[tr].std()),)
    mk = lambda i: ImageSet(torch.from_numpy(x[i].copy()), torch.from_numpy(y[i]), mean, std, 10)
    return mk(tr), mk(te)


def load_dataset(name: str, data_dir: Optional[str] = None, mean: Optional[tuple] = None,
                 std: Optional[tuple] = None) -> tuple[ImageSet, ImageSet]:
    """(train, test); ``mean`` / ``std`` replace the dataset's per-channel normalisation."""
    if name == "cifar10":
        sets = load_cifar10(data_dir)
    elif name == "digits":
        sets = load_digits()
    else:
        raise DataError(f"unknown dataset {name!r}")
    for s in sets:
        s.mean = tuple(mean) if mean is not None else s.mean
        s.std = tuple(std) if std is not None else s.std
    return sets


def steps_per_epoch(num_images: int, global_batch: int, cap: Optional[int] = None) -> int:
    """Full global batches per epoch (the last partial one is dropped), at most ``cap``."""
    n = num_images // global_batch
    if n == 0:
        raise DataError(f"the training set ({num_images} images) is smaller than one global "
                        f"batch ({global_batch})")
    return n if cap is None else min(n, cap)


def epoch_order(num_images: int, epoch: int, seed: int) -> Tensor:
    """The epoch's shuffled order: different each epoch, identical for a given seed."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % 2**63)  # any seed in [0, 2**63)
    return torch.randperm(num_images, generator=g)


def rank_batch(order_N: Tensor, step: int, global_batch: int, rank: int, world: int) -> Tensor:
    """Indices of this rank's slice of global batch ``step``: ranks split each batch evenly, so
    one step over all ranks sees the same images as one process with the global batch."""
    b = global_batch // world
    start = step * global_batch + rank * b
    return order_N[start:start + b]



def eval_batches(num_images: int, batch_per_rank: int, rank: int, world: int) -> list[Tensor]:
    """This rank's evaluation batches: the test set split into ``world`` contiguous shards whose
    sizes differ by at most one, each shard split into the same number of batches (the
    all-to-all needs every rank to run the same number of forwards) of at most
    ``batch_per_rank`` images. Nothing is padded, so no repeated image takes expert capacity."""
    if num_images < world:
        raise DataError(f"the test set ({num_images} images) is smaller than the number of "
                        f"processes ({world})")
    n_batches = -(-(-(-num_images // world)) // batch_per_rank)
    shard = torch.tensor_split(torch.arange(num_images), world)[rank]
    return list(torch.tensor_split(shard, n_batches))
