"""Datasets held in memory as uint8 tensors, and per-rank shards of each epoch.

CIFAR-10 and CIFAR-100 are read from the python pickles their authors distribute (nothing is
downloaded);
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


@dataclass(frozen=True)
class CifarFormat:
    """Where one CIFAR variant's python-pickle files live and what they hold."""

    title: str
    folder: str
    train: tuple
    test: str
    label_key: str
    num_classes: int
    files: str  # the files, for the layout message
    sizes: str  # images per file, for the layout message

    def layout(self) -> str:
        return (f"expected layout (the python version of {self.title} as distributed at "
                "https://www.cs.toronto.edu/~kriz/cifar.html, unpacked):\n"
                f"  $DATA/{self.folder}/{self.files}\n"
                f"  (or $DATA pointing at the {self.folder} folder itself); each file a pickle of "
                "a dict with\n"
                "  b'data' (uint8 [N, 3072], rows of 1024 red, 1024 green, 1024 blue values of a "
                f"32x32 image)\n  and b'{self.label_key}' (N ints in 0..{self.num_classes - 1}); "
                f"N = {self.sizes}")


CIFAR10 = CifarFormat("CIFAR-10", CIFAR_DIR, CIFAR_TRAIN, CIFAR_TEST, "labels", 10,
                      "data_batch_1 .. data_batch_5, test_batch", "10000 in each")
CIFAR100 = CifarFormat("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100,
                       "train, test", "50000 in train, 10000 in test")


def find_cifar_dir(data_dir: Optional[str], fmt: CifarFormat = CIFAR10) -> str:
    """The folder holding ``fmt``'s files, from ``data_dir`` or $DATA."""
    root = data_dir if data_dir is not None else os.environ.get("DATA")
    if not root:
        raise DataError(f"{fmt.title}: no data location: set $DATA (or the config's data_dir)\n"
                        + fmt.layout())
    candidates = [os.path.join(root, fmt.folder), root]
    for d in candidates:
        if os.path.isfile(os.path.join(d, fmt.train[0])):
            return d
    looked = "\n".join(f"  {os.path.abspath(d)}" for d in candidates)
    raise DataError(f"{fmt.title} not found: looked for {fmt.train[0]} in\n{looked}\n"
                    + fmt.layout())


def _read_cifar_batch(path: str, fmt: CifarFormat = CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    name, layout = fmt.title, fmt.layout()
    if not os.path.isfile(path):
        raise DataError(f"{name}: missing file {os.path.abspath(path)}\n" + layout)
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise DataError(f"{name}: cannot read {os.path.abspath(path)} "
                        f"({type(e).__name__}: {e}); the file is damaged\n" + layout) from e
    if not isinstance(d, dict):
        raise DataError(f"{name}: {os.path.abspath(path)} holds a {type(d).__name__}, "
                        "not a dict\n" + layout)
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or fmt.label_key not in d:
        raise DataError(f"{name}: {os.path.abspath(path)} has keys {sorted(d)}, expected "
                        f"'data' and '{fmt.label_key}'\n" + layout)
    data = np.asarray(d["data"])
    labels = np.asarray(d[fmt.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: {os.path.abspath(path)}: 'data' is {data.dtype} "
                        f"{list(data.shape)}, expected uint8 [N, 3072]\n" + layout)
    if labels.shape != (data.shape[0],) or (labels.size and (
            labels.min() < 0 or labels.max() >= fmt.num_classes)):
        raise DataError(f"{name}: {os.path.abspath(path)}: '{fmt.label_key}' must be "
                        f"{data.shape[0]} ints in 0..{fmt.num_classes - 1}\n" + layout)
    return data.reshape(-1, 3, 32, 32), labels


def channel_stats(x_NCHW: np.ndarray, chunk: int = 4096) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images on the 0-1 scale, in float64 over chunks of
    images (no float copy of the whole set)."""
    C = x_NCHW.shape[1]
    s, s2, n = np.zeros(C), np.zeros(C), 0
    for i in range(0, len(x_NCHW), chunk):
        x = x_NCHW[i:i + chunk].astype(np.float64).transpose(1, 0, 2, 3).reshape(C, -1) / 255
        s += x.sum(1)
        s2 += np.square(x).sum(1)
        n += x.shape[1]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean ** 2, 0))
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


def _load_cifar(fmt: CifarFormat, data_dir: Optional[str], mean=None, std=None):
    d = find_cifar_dir(data_dir, fmt)
    parts = [_read_cifar_batch(os.path.join(d, n), fmt) for n in fmt.train]
    x_te, y_te = _read_cifar_batch(os.path.join(d, fmt.test), fmt)
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    if mean is None or std is None:
        own_mean, own_std = channel_stats(x_tr)
        mean, std = mean or own_mean, std or own_std
    mk = lambda x, y: ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                               tuple(mean), tuple(std), fmt.num_classes)
    return mk(x_tr, y_tr), mk(x_te, y_te)


def load_cifar10(data_dir: Optional[str] = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) from the pickle batches under ``data_dir`` or $DATA."""
    return _load_cifar(CIFAR10, data_dir, CIFAR_MEAN, CIFAR_STD)


def load_cifar100(data_dir: Optional[str] = None, mean: Optional[tuple] = None,
                  std: Optional[tuple] = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) of CIFAR-100's 100 fine classes, from the pickles under ``data_dir`` or
    $DATA; normalised by ``mean`` / ``std``, else by the training set's own per-channel
    statistics (about 2 s to compute for the 50,000 images)."""
    return _load_cifar(CIFAR100, data_dir, mean, std)


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


# (image shape [C, H, W], classes) of each dataset, known without reading it
SHAPES = {"digits": ((1, 8, 8), 10), "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100)}


def load_dataset(name: str, data_dir: Optional[str] = None, mean: Optional[tuple] = None,
                 std: Optional[tuple] = None) -> tuple[ImageSet, ImageSet]:
    """(train, test); ``mean`` / ``std`` replace the dataset's per-channel normalisation."""
    if name == "cifar10":
        sets = load_cifar10(data_dir)
    elif name == "cifar100":
        sets = load_cifar100(data_dir, mean, std)
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
