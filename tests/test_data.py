"""Data: loaders (real torchvision paths on datasets written to disk here), partitions, batches."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

import lte_fed.data as D


@pytest.fixture(scope="module")
def digits():
    return D.load_data("digits", seed=0)


def _entropy(labels: torch.Tensor, num_classes: int) -> float:
    p = torch.bincount(labels, minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_and_split(digits):
    d = digits
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.train_x.shape[1:] == (1, 8, 8) and d.in_chans == 1 and d.img_size == 8
    assert len(d.train_y) + len(d.test_y) == 1797 and abs(len(d.test_y) - 0.2 * 1797) < 10
    assert d.num_classes == 10 and set(d.test_y.tolist()) == set(range(10))  # stratified
    assert d.train_x.max() == 255 and len(d.mean) == len(d.std) == 1 and 0 < d.mean[0] < 1
    again, other = D.load_data("digits", seed=0), D.load_data("digits", seed=1)
    assert torch.equal(again.test_x, d.test_x) and torch.equal(again.train_y, d.train_y)
    assert not torch.equal(other.test_x, d.test_x)
    # the split is a split: train and test images are, together, the whole set
    assert sorted(d.train_y.tolist() + d.test_y.tolist()) == sorted(other.train_y.tolist() + other.test_y.tolist())


def test_bad_load_args():
    with pytest.raises(D.DataError, match="data.name"):
        D.load_data("mnist")
    with pytest.raises(D.DataError, match="data.test_fraction"):
        D.load_data("digits", test_fraction=1.0)
    with pytest.raises(D.DataError, match="data.synthetic_size"):
        D.load_data("synthetic", synthetic_size=3)


# ----------------------------------------------------------------------------- partition
@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_disjoint_covering_nonempty_deterministic(digits, method):
    y = digits.train_y
    for k in (1, 3, 16, 100):
        shards = D.partition(y, k, method, alpha=0.05, seed=3)
        assert len(shards) == k and all(len(s) > 0 for s in shards)
        assert torch.equal(torch.cat(shards).sort().values, torch.arange(len(y)))
        again = D.partition(y, k, method, alpha=0.05, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(shards, again))
    other = D.partition(y, 16, method, alpha=0.05, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(shards[:16], other))
    if method == "iid":
        sizes = [len(s) for s in D.partition(y, 7, "iid")]
        assert max(sizes) - min(sizes) <= 1


def test_dirichlet_is_label_skewed(digits):
    y = digits.train_y
    ent = {m: np.mean([_entropy(y[s], 10) for s in D.partition(y, 8, m, alpha=0.1, seed=0)])
           for m in ("iid", "dirichlet")}
    assert ent["iid"] > 2.0  # near log(10) = 2.30
    assert ent["dirichlet"] < 0.6 * ent["iid"], ent


def test_partition_bad_args(digits):
    with pytest.raises(D.DataError, match="data.partition"):
        D.partition(digits.train_y, 4, "roundrobin")
    with pytest.raises(D.DataError, match="data.alpha"):
        D.partition(digits.train_y, 4, "dirichlet", alpha=0.0)
    with pytest.raises(D.DataError, match="^lte.heads=9: cannot split the 8 training samples"):
        D.partition(digits.train_y[:8], 9)


# ----------------------------------------------------------------------------- batches
def test_head_batch_indices_stateless_and_epochs():
    shard = torch.arange(100, 150)  # 50 samples
    b = 7
    walked = [D.head_batch_indices(shard, t, b, seed=0, head=2) for t in range(30)]
    assert torch.equal(D.head_batch_indices(shard, 7, b, seed=0, head=2), walked[7])
    stream = torch.cat(walked)
    for e in range(4):  # every epoch visits the shard once
        assert torch.equal(stream[50 * e:50 * (e + 1)].sort().values, shard)
    assert not torch.equal(stream[:50], stream[50:100])  # a fresh order each epoch
    assert not torch.equal(D.head_batch_indices(shard, 0, b, 0, 3), walked[0])  # heads differ
    assert not torch.equal(D.head_batch_indices(shard, 0, b, 1, 2), walked[0])  # seeds differ
    # a batch bigger than the shard spans several epochs
    big = D.head_batch_indices(shard[:3], 1, 8, seed=0, head=0)
    assert len(big) == 8 and set(big.tolist()) <= set(shard[:3].tolist())
    assert torch.bincount(torch.cat([D.head_batch_indices(shard[:3], t, 8, 0, 0) for t in range(3)]) - 100).tolist() \
        == [8, 8, 8]


def test_make_batch_shapes_normalisation_determinism(digits):
    idx = torch.arange(256)
    x, y = D.make_batch(digits, idx, train=True, img_size=8, augment=False, seed=0, head=0, step=0)
    assert x.shape == (256, 1, 8, 8) and x.dtype == torch.float32 and torch.equal(y, digits.train_y[:256])
    whole, _ = D.make_batch(digits, torch.arange(len(digits.train_y)), train=True, img_size=8, augment=False,
                            seed=0, head=0, step=0)
    assert abs(whole.mean()) < 1e-4 and abs(whole.std() - 1) < 1e-3  # normalised by the train stats
    big, _ = D.make_batch(digits, idx, train=True, img_size=16, augment=False, seed=0, head=0, step=0)
    assert big.shape == (256, 1, 16, 16)

    kw = dict(train=True, img_size=8, augment=True, seed=0, head=1)
    a1, a2 = D.make_batch(digits, idx, step=5, **kw)[0], D.make_batch(digits, idx, step=5, **kw)[0]
    assert torch.equal(a1, a2) and not torch.equal(a1, x)
    assert not torch.equal(a1, D.make_batch(digits, idx, step=6, **kw)[0])
    ev = D.make_batch(digits, idx, train=False, img_size=8, augment=True, seed=0, head=0, step=0)[0]
    assert torch.equal(ev, D.make_batch(digits, idx, train=False, img_size=8, augment=False, seed=0, head=0,
                                        step=0)[0])  # never augment test data


@pytest.mark.parametrize("kind", ["cifar10", "synthetic"])
def test_augment_is_shift_and_flip(kind):
    d = D.load_data("synthetic", img_size=16, synthetic_size=64)
    d.name = kind  # cifar10 is mirror-invariant (crops and flips); synthetic is not (crops only)
    idx = torch.arange(64)
    plain = D.make_batch(d, idx, train=True, img_size=16, augment=False, seed=0, head=0, step=0)[0]
    aug = D.make_batch(d, idx, train=True, img_size=16, augment=True, seed=0, head=0, step=0)[0]
    black = (0 - torch.tensor(d.mean).view(1, 3, 1, 1)) / torch.tensor(d.std).view(1, 3, 1, 1)
    # every augmented image is a shifted (maybe mirrored) copy of its source, padded with black (pad 2)
    found = []
    for i in range(64):
        src = torch.nn.functional.pad(plain[i:i + 1] - black, (2, 2, 2, 2))[0] + black[0]
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                if torch.allclose((src.flip(-1) if f else src)[:, dy:dy + 16, dx:dx + 16], aug[i], atol=1e-5)]
        assert hits, i
        found.append(hits[0])
    assert len({(dy, dx) for dy, dx, _ in found}) > 10  # offsets vary across the batch
    flipped = sum(f for _, _, f in found)
    assert (20 < flipped < 44) if kind == "cifar10" else flipped == 0


def test_test_batches_in_order(digits):
    xs, ys = zip(*D.test_batches(digits, 100, 8))
    assert [len(y) for y in ys][:-1] == [100] * (len(ys) - 1)
    assert torch.equal(torch.cat(ys), digits.test_y) and torch.cat(xs).shape == (len(digits.test_y), 1, 8, 8)


def test_synthetic_is_learnable():
    d = D.load_data("synthetic", seed=0)
    assert d.train_x.shape == (512, 3, 8, 8) and d.test_x.shape == (128, 3, 8, 8) and d.num_classes == 10
    assert torch.equal(d.train_x, D.load_data("synthetic", seed=0).train_x)
    assert not torch.equal(d.train_x, D.load_data("synthetic", seed=1).train_x)
    x = d.train_x.flatten(1).float()
    means = torch.stack([x[d.train_y == c].mean(0) for c in range(10)])
    pred = torch.cdist(d.test_x.flatten(1).float(), means).argmin(1)
    acc = (pred == d.test_y).float().mean()
    assert 0.6 < acc, acc  # nearest class mean is well above chance (0.1)


# ----------------------------------------------------------------------------- torchvision loaders on disk
def _write_cifar(root, n_per_batch=6, names=10):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for f in files:  # the real format: uint8 (n, 3072) rows in CHW order, labels a list
        entry = {"batch_label": f, "data": g.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": g.integers(0, names, n_per_batch).tolist(), "filenames": [f"{i}.png" for i in range(n_per_batch)]}
        (folder / f).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(names)]}))
    return {f: hashlib.md5((folder / f).read_bytes()).hexdigest() for f in files + ["batches.meta"]}


def test_cifar_format_on_disk_through_torchvision(tmp_path, monkeypatch):
    """A CIFAR-10 directory in the real pickle format, read by torchvision's own CIFAR10 class.

    torchvision always compares each file's md5 with the published one, and no handmade file can
    match it; so (test only) the class's expected md5s are pointed at the files written here —
    the integrity check itself still runs, everything else is the real loader."""
    from torchvision.datasets import CIFAR10

    md5 = _write_cifar(tmp_path)
    with pytest.raises(D.DataError, match="cifar-10-batches-py"):  # unpatched: the checksums differ
        D.load_data("cifar10", root=str(tmp_path))
    monkeypatch.setattr(CIFAR10, "train_list", [[f, md5[f]] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, md5[f]] for f, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    d = D.load_data("cifar10", root=str(tmp_path))
    assert d.train_x.shape == (30, 3, 32, 32) and d.test_x.shape == (6, 3, 32, 32) and d.num_classes == 10
    first = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    assert torch.equal(d.train_x[0], torch.from_numpy(first["data"][0]).view(3, 32, 32))  # CHW kept
    assert d.train_y[:6].tolist() == first["labels"] and d.img_size == 32 and len(d.mean) == 3
    x, _ = D.make_batch(d, torch.arange(4), train=True, img_size=16, augment=True, seed=0, head=0, step=0)
    assert x.shape == (4, 3, 16, 16)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                         ("stl10", "stl10_binary")])
def test_missing_torchvision_dataset_says_where_and_how(tmp_path, name, folder):
    root = tmp_path / "nothing"
    with pytest.raises(D.DataError) as e:
        D.load_data(name, root=str(root))
    msg = str(e.value)
    assert str(root) in msg and folder in msg and "data.download=true" in msg


def _write_pngs(folder, classes=("cat", "dog"), n=4, size=(12, 10)):
    from PIL import Image

    g = np.random.default_rng(1)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / c / f"{i}.png")


def test_imagefolder_split_by_seed(tmp_path):
    _write_pngs(tmp_path, n=5)
    d = D.load_data("imagefolder", root=str(tmp_path), img_size=8, test_fraction=0.2)
    assert d.train_x.shape == (8, 3, 8, 8) and d.test_x.shape == (2, 3, 8, 8) and d.num_classes == 2
    assert d.test_y.tolist() == [0, 1]  # one of each class: stratified
    assert D.load_data("imagefolder", root=str(tmp_path)).img_size == 32  # default size


def test_imagefolder_train_val(tmp_path):
    _write_pngs(tmp_path / "train", n=3)
    _write_pngs(tmp_path / "val", n=2)
    d = D.load_data("imagefolder", root=str(tmp_path), img_size=6)
    assert d.train_x.shape == (6, 3, 6, 6) and d.test_x.shape == (4, 3, 6, 6)
    assert d.train_y.tolist() == [0, 0, 0, 1, 1, 1] and d.test_y.tolist() == [0, 0, 1, 1]


def test_imagefolder_bad_paths(tmp_path):
    with pytest.raises(D.DataError, match="nowhere"):
        D.load_data("imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(D.DataError, match="data.root"):
        D.load_data("imagefolder", root=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="empty"):
        D.load_data("imagefolder", root=str(tmp_path / "empty"))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(D.DataError, match="not a folder"):
        D.load_data("imagefolder", root=str(tmp_path / "a.png"))
    _write_pngs(tmp_path / "one", classes=("cat",))  # would "train" to 100% accuracy
    with pytest.raises(D.DataError, match="1 class folder.*at least 2"):
        D.load_data("imagefolder", root=str(tmp_path / "one"))


def test_imagefolder_reads_16_bit_images_at_their_brightness(tmp_path):
    """A 16-bit PNG (grey, 0..65535) is scaled to 8 bits, not clipped at 255 (all white)."""
    from PIL import Image

    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(grey).save(tmp_path / c / f"{i}.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")  # what the test is about
    d = D.load_data("imagefolder", root=str(tmp_path), img_size=8, test_fraction=0.5)
    assert set(d.train_x.unique().tolist()) == {32768 // 257}


def test_imagefolder_names_a_file_it_cannot_or_will_not_decode(tmp_path, monkeypatch):
    from PIL import Image

    _write_pngs(tmp_path, n=2)
    (tmp_path / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(D.DataError, match="bad.png: not a readable image"):
        D.load_data("imagefolder", root=str(tmp_path), img_size=8)
    (tmp_path / "cat" / "bad.png").unlink()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # a 12x10 image is then a "decompression bomb"
    with pytest.raises(D.DataError, match="larger than Pillow's safety limit"):
        D.load_data("imagefolder", root=str(tmp_path), img_size=8)


def test_imagefolder_reads_what_a_user_folder_holds_and_refuses_what_it_would_misread(tmp_path):
    from PIL import Image

    # train/ + valid/ is a split, not two classes; hidden folders and files are not classes or images
    _write_pngs(tmp_path / "tv" / "train", n=3)
    _write_pngs(tmp_path / "tv" / "valid", n=2)
    _write_pngs(tmp_path / "tv" / "train" / ".ipynb_checkpoints", classes=("x",), n=1)
    (tmp_path / "tv" / "train" / "cat" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    d = D.load_data("imagefolder", root=str(tmp_path / "tv"), img_size=6)
    assert d.num_classes == 2 and len(d.train_y) == 6 and len(d.test_y) == 4
    # a class missing from the held-out split is named
    _write_pngs(tmp_path / "tv" / "train", classes=("eel",), n=2)
    with pytest.raises(D.DataError, match="in one only: eel"):
        D.load_data("imagefolder", root=str(tmp_path / "tv"))
    # train/ alone: not read as a class called "train"
    _write_pngs(tmp_path / "only" / "train", n=2)
    with pytest.raises(D.DataError, match="holds train/ but none of"):
        D.load_data("imagefolder", root=str(tmp_path / "only"))
    # float TIFFs in [0, 1] keep their brightness (Pillow alone turns them black); GIFs are read
    for c, v in (("dark", 0.2), ("light", 0.8)):
        (tmp_path / "f" / c).mkdir(parents=True)
        Image.fromarray(np.full((4, 4), v, dtype=np.float32), mode="F").save(tmp_path / "f" / c / "0.tif")
        Image.fromarray(np.full((4, 4), int(v * 255), dtype=np.uint8)).save(tmp_path / "f" / c / "1.gif")
    d = D.load_data("imagefolder", root=str(tmp_path / "f"), img_size=4, test_fraction=0.5)
    x = torch.cat([d.train_x, d.test_x]).float().mean(dim=(1, 2, 3))
    assert sorted(x.round().tolist()) == [51.0, 51.0, 204.0, 204.0]
    Image.fromarray(np.full((4, 4), 1000.0, dtype=np.float32), mode="F").save(tmp_path / "f" / "dark" / "2.tif")
    with pytest.raises(D.DataError, match=r"2\.tif: not a readable image \(a float image with values in \[1000"):
        D.load_data("imagefolder", root=str(tmp_path / "f"), img_size=4)
    # a symlink loop (or a linked duplicate) would put one image in both train and test
    _write_pngs(tmp_path / "loop", n=2)
    (tmp_path / "loop" / "cat" / "up").symlink_to("..")
    with pytest.raises(D.DataError, match="are the same image"):
        D.load_data("imagefolder", root=str(tmp_path / "loop"))


def test_a_head_left_fewer_samples_than_its_batch_is_warned_about(caplog):
    from lte_fed.job import setup
    from lte_fed.spec import Spec

    spec = Spec.from_dict({"data": {"name": "digits", "partition": "dirichlet", "alpha": 0.001},
                           "lte": {"heads": 8}, "run": {"engine": "fused", "device": "cpu"}})
    with caplog.at_level("WARNING", logger="lte_fed"):
        setup(spec)
    assert "heads hold fewer samples than their batch of 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lte_fed"):
        setup(Spec.from_dict({"lte": {"heads": 8}, "run": {"engine": "fused", "device": "cpu"}}))  # iid
    assert "fewer samples" not in caplog.text


# ----------------------------------------------------------------------------- resize
@pytest.mark.parametrize("shape,size", [((3, 3, 4, 4), 56), ((2, 1, 8, 8), 32), ((2, 3, 64, 64), 24),
                                        ((2, 3, 37, 37), 100), ((2, 3, 100, 100), 37), ((1, 1, 5, 5), 5)])
def test_resize_is_bilinear_and_the_same_at_every_thread_count(shape, size):
    import torch.nn.functional as F

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < shape[-1])
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            got.append(D.resize(x, size))
    finally:
        torch.set_num_threads(threads)
    assert got[0].shape == (*shape[:2], size, size)
    torch.testing.assert_close(got[0], ref, rtol=0, atol=1e-5)
    assert all(torch.equal(got[0], g) for g in got[1:])


def test_synthetic_data_and_upscaled_batches_do_not_depend_on_the_thread_count():
    """F.interpolate's CPU kernel rounds differently at other thread counts: a node with another
    thread count drew other batches and hashed the data differently (it was refused)."""
    threads = torch.get_num_threads()
    try:
        got = []
        for t in (1, 2):
            torch.set_num_threads(t)
            d = D.load_data("synthetic", seed=0, img_size=96, synthetic_size=16)
            x, _ = D.make_batch(d, torch.arange(4), train=True, img_size=160, augment=True, seed=0, head=0, step=0)
            got.append((d.train_x, x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
