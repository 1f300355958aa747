"""Data: CIFAR-10 pickles (written here), missing/damaged files, shards, batched augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch

from moesaic.train import augment as A
from moesaic.train.data import (DataError, epoch_order, eval_batches, load_cifar10, load_dataset,
                                load_digits, rank_batch, steps_per_epoch)


def write_cifar(root, n_train=40, n_test=40, seed=0):
    """CIFAR-10-format pickles under root/cifar-10-batches-py (images carry a class-dependent
    brightness, so a tiny model can learn something)."""
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n):
        labels = rng.integers(0, 10, n)
        data = rng.integers(0, 100, (n, 3072)) + labels[:, None] * 15
        return {b"batch_label": b"x", b"labels": labels.tolist(),
                b"data": data.astype(np.uint8), b"filenames": [b"f"] * n}

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch(n_test if name == "test_batch" else n_train), f)
    return d


def write_cifar100(root, n_train=60, n_test=30, seed=0):
    """CIFAR-100-format pickles under root/cifar-100-python: 'train' and 'test', 100 fine
    classes (and the 20 coarse ones the real files also carry)."""
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, 100, n)
        data = (rng.integers(0, 120, (n, 3072)) + fine[:, None]).astype(np.uint8)
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"filenames": [b"f"] * n, b"batch_label": b"x", b"data": data,
                         b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist()},
                        f)
    return d


def test_cifar100_loads_with_its_own_statistics_and_explains_its_layout(tmp_path, monkeypatch):
    d = write_cifar100(str(tmp_path))
    tr, te = load_dataset("cifar100", str(tmp_path))
    assert tr.images_NCHW.shape == (60, 3, 32, 32) and len(te) == 30
    assert tr.num_classes == te.num_classes == 100 and int(tr.labels_N.max()) < 100
    x = tr.images_NCHW.double() / 255
    torch.testing.assert_close(torch.tensor(tr.mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(tr.std, dtype=torch.float64),
                               x.std(dim=(0, 2, 3), unbiased=False))
    assert te.mean == tr.mean  # the test set is normalised with the training statistics
    with open(os.path.join(d, "test"), "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"CIFAR-100: .*test has keys .*expected 'data' and "
                                         r"'fine_labels'"):
        load_dataset("cifar100", d)
    monkeypatch.setenv("DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=r"(?s)CIFAR-100 not found.*cifar-100-python/train, test"):
        load_dataset("cifar100")


def test_cifar_pickles_load_from_data_or_folder(tmp_path, monkeypatch):
    d = write_cifar(str(tmp_path))
    monkeypatch.setenv("DATA", str(tmp_path))
    tr, te = load_cifar10()
    assert tr.images_NCHW.shape == (200, 3, 32, 32) and tr.images_NCHW.dtype == torch.uint8
    assert te.labels_N.shape == (40,) and tr.num_classes == 10
    tr2, _ = load_cifar10(d)  # pointing at the folder itself
    assert torch.equal(tr.images_NCHW, tr2.images_NCHW)
    from moesaic.train.data import SHAPES  # what --print-config builds without reading data
    assert SHAPES["cifar10"] == (tuple(tr.shape), tr.num_classes)
    tr100, _ = load_dataset("cifar100", write_cifar100(str(tmp_path)))
    assert SHAPES["cifar100"] == (tuple(tr100.shape), tr100.num_classes)


def test_normalisation_override_reaches_both_sets(tmp_path):
    """norm_mean / norm_std replace the dataset's statistics for training and evaluation."""
    write_cifar(str(tmp_path))
    std = (0.2023, 0.1994, 0.2010)
    for s in load_dataset("cifar10", str(tmp_path), std=std):
        assert s.std == std and s.mean == (0.4914, 0.4822, 0.4465)
    tr, te = load_dataset("digits", mean=(0.5,), std=(0.25,))
    assert tr.mean == te.mean == (0.5,) and tr.std == te.std == (0.25,)


def test_missing_cifar_says_where_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA", str(tmp_path))
    with pytest.raises(DataError) as e:
        load_cifar10()
    msg = str(e.value)
    assert str(tmp_path) in msg and "data_batch_1" in msg and "test_batch" in msg
    monkeypatch.delenv("DATA")
    with pytest.raises(DataError, match=r"\$DATA"):
        load_cifar10()


def test_damaged_cifar_names_the_file(tmp_path):
    d = write_cifar(str(tmp_path))
    with open(os.path.join(d, "data_batch_3"), "wb") as f:
        f.write(b"\x80\x04not a pickle")
    with pytest.raises(DataError, match="data_batch_3.*damaged"):
        load_cifar10(str(tmp_path))
    write_cifar(str(tmp_path))
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump({b"data": np.zeros((5, 100), np.uint8), b"labels": [0] * 5}, f)
    with pytest.raises(DataError, match=r"test_batch.*uint8 \[N, 3072\]"):
        load_cifar10(str(tmp_path))
    os.remove(os.path.join(d, "data_batch_5"))
    with pytest.raises(DataError, match="missing file .*data_batch_5"):
        load_cifar10(str(tmp_path))


def test_digits_split_is_fixed():
    tr, te = load_digits()
    assert len(tr) + len(te) == 1797 and tr.shape == (1, 8, 8)
    tr2, te2 = load_digits()
    assert torch.equal(te.labels_N, te2.labels_N)


def test_shards_cover_the_global_batch_and_orders_depend_on_epoch_and_seed():
    n, B = 100, 8
    o = epoch_order(n, 0, 1)
    assert torch.equal(o, epoch_order(n, 0, 1))
    assert not torch.equal(o, epoch_order(n, 1, 1)) and not torch.equal(o, epoch_order(n, 0, 2))
    parts = [rank_batch(o, 3, B, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), o[24:32])
    assert steps_per_epoch(100, 8) == 12 and steps_per_epoch(100, 8, 5) == 5


def test_eval_batches_cover_the_test_set_once_without_padding():
    for n, b, world in [(359, 64, 1), (359, 32, 2), (10, 4, 3), (7, 100, 7), (40, 20, 2)]:
        per_rank = [eval_batches(n, b, r, world) for r in range(world)]
        assert len({len(bs) for bs in per_rank}) == 1  # same number of forwards on every rank
        flat = torch.cat([i for bs in per_rank for i in bs])
        assert torch.equal(flat, torch.arange(n))  # every image once, none repeated
        assert all(1 <= len(i) <= b for bs in per_rank for i in bs)
    with pytest.raises(DataError, match="smaller than the number of processes"):
        eval_batches(1, 4, 0, 2)


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_every_op_keeps_shape_and_range():
    x = torch.rand(6, 3, 16, 16)
    v = torch.full((6,), 0.5)
    for name, op in A.OPS.items():
        arg = {"Posterize": torch.full((6,), 4.0), "Rotate": torch.full((6,), 20.0),
               "TranslateX": torch.full((6,), 3.0), "TranslateY": torch.full((6,), 3.0)}.get(name, v)
        y = op(x, arg)
        assert y.shape == x.shape, name
        assert y.min() >= 0 and y.max() <= 1, name


def test_ops_do_what_they_say():
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(A.translate_x(x, torch.tensor([1.0, 1.0]))[..., 1:], x[..., :-1])
    assert torch.allclose(A.invert(x), 1 - x)
    assert torch.allclose(A.rotate(x, torch.zeros(2)), x)
    q = A.posterize(x, torch.tensor([1.0, 8.0]))
    assert set((q[0] * 255).round().unique().tolist()) <= {0.0, 128.0}
    assert torch.allclose(q[1], (x[1] * 255).round() / 255)
    e = A.equalize(torch.linspace(0, 0.5, 1024).view(1, 1, 32, 32))
    assert e.max() > 0.95  # stretched to the full range
    ac = A.autocontrast(x * 0.5 + 0.25)
    assert torch.allclose(ac.amin(dim=(2, 3)), torch.zeros(2, 1), atol=1e-6)


def test_policies_are_batched_and_reproducible():
    x = torch.rand(32, 3, 32, 32)
    a = A.auto_augment_cifar10(x, _gen(1))
    assert torch.equal(a, A.auto_augment_cifar10(x, _gen(1)))
    assert not torch.equal(a, x) and a.shape == x.shape
    r = A.rand_augment(x, 2, 9, _gen(2))
    assert torch.equal(r, A.rand_augment(x, 2, 9, _gen(2))) and r.shape == x.shape
    c = A.random_crop(x, 4, _gen(3))
    assert c.shape == x.shape
    f = A.random_hflip(x, _gen(4))
    flipped = [(torch.equal(f[i], x[i].flip(-1))) for i in range(32)]
    assert 0 < sum(flipped) < 32


def test_slices_of_a_batch_draw_what_the_whole_batch_draws():
    """Draws(gen, total, start) hands a slice the numbers of those images in the whole batch,
    and mixing partners pair images 2j, 2j + 1 of the whole batch: augmenting a batch in parts
    (ranks, micro-batches) equals augmenting it whole."""
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)

    def augment(xs, ys, start):
        d = A.Draws(_gen(5), total=8, start=start)
        xs = A.rand_augment(A.random_hflip(A.random_crop(xs, 4, d), d), 2, 9, d)
        xs = A.auto_augment_cifar10(xs, d)
        return A.mix(xs, ys, 0.8, 1.0, 1.0, 0.5, np.random.default_rng(3), start)

    whole = augment(x, y, 0)
    for cuts in ([4], [2, 6], [6]):
        parts = [augment(x[s:t], y[s:t], s) for s, t in zip([0, *cuts], [*cuts, 8])]
        for i in range(3):
            assert torch.equal(torch.cat([p[i] for p in parts]), whole[i])
        assert {p[3] for p in parts} == {whole[3]}
    assert A.partners(3, 5, "cpu").tolist() == [0, 2, 1]  # image 5's partner, 4, is elsewhere
    with pytest.raises(ValueError, match=r"images \[6, 10\) are not inside a batch of 8"):
        A.Draws(_gen(0), total=8, start=6).rand(4, "cpu")


def test_mixup_and_cutmix_weights():
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    rng = np.random.default_rng(0)
    xm, ya, yb, lam = A.mix(x, y, 0.8, 0.0, 1.0, 0.5, rng)
    swap = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])  # images 2j and 2j + 1 pair up
    assert torch.allclose(xm, lam * x + (1 - lam) * x[swap]) and torch.equal(yb, y[swap])
    xc, _, _, lam = A.mix(x, y, 0.0, 1.0, 1.0, 0.5, np.random.default_rng(1))
    from_partner = (xc != x).any(1).float().mean().item()
    assert abs((1 - lam) - from_partner) < 0.05
    assert A.mix(x, y, 0.0, 0.0, 1.0, 0.5, rng)[3] == 1.0
