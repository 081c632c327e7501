"""Image data for LTE: loading, sharding across heads, and stateless per-head batches.

Every dataset is held in memory as compact uint8 tensors (N, C, H, W); a batch is converted,
resized, augmented and normalised only when it is drawn (`make_batch`). Every random choice comes
from a generator keyed through `rng` (SPLIT: train/test split, partition, synthetic data; DATA:
batch order; AUGMENT: crops and flips), so a batch is a pure function of (seed, head, step). That
is what lets the fused engine and the Flower clients see the same batches, and makes resume exact.

Key layout (note that numpy's SeedSequence ignores trailing zero keys, so sub-tags start at 1):
    (seed, SPLIT, 1)                  train/test split of datasets without a standard one
    (seed, SPLIT, 2, num_shards)      partition across heads
    (seed, SPLIT, 3)                  the synthetic dataset itself
    (seed, DATA, head, epoch)         head's permutation of its shard in that epoch
    (seed, AUGMENT, head, step)       head's crop offsets and flips at that step
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .rng import AUGMENT, DATA, SPLIT, derive_seed, torch_generator

TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10")  # read from data.root (default DEFAULT_ROOT)
IMAGE_DATASETS = ("digits", *TORCHVISION_DATASETS, "imagefolder", "synthetic")
TEXT_DATASETS = ("shakespeare", "text")  # language-model corpora: lte_fed/text.py
DATASETS = IMAGE_DATASETS + TEXT_DATASETS
NO_FLIP = ("digits", "synthetic")  # not mirror-invariant: a flipped "2" or prototype is another pattern
DEFAULT_ROOT = "data"


class DataError(RuntimeError):
    """The data a config asks for cannot be had (missing files, bad path); the message says why."""


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor  # uint8 (M, C, H, W)
    test_y: torch.Tensor  # int64 (M,)
    num_classes: int
    mean: tuple[float, ...]  # per channel, [0,1] units
    std: tuple[float, ...]
    name: str

    @property
    def in_chans(self) -> int:
        return self.train_x.shape[1]

    @property
    def img_size(self) -> int:
        return self.train_x.shape[-1]


# ----------------------------------------------------------------------------- loading
def load_data(name: str, *, root: str | None = None, seed: int = 0, img_size: int | None = None,
              test_fraction: float = 0.2, synthetic_size: int = 512, download: bool = False) -> ImageData:
    """Load a dataset into memory as uint8 tensors.

    img_size sets the stored size only for `imagefolder` (default 32) and `synthetic` (default 8);
    the other datasets keep their native size and `make_batch` resizes. test_fraction applies to
    datasets without a standard test split (digits, imagefolder without train/ and val/).
    """
    if name == "digits":
        x, y = _digits()
        tr, te = _stratified_split(y, test_fraction, seed)
        return _make(name, x[tr], y[tr], x[te], y[te], 10)
    if name in TORCHVISION_DATASETS:
        return _torchvision(name, root or DEFAULT_ROOT, download)
    if name == "imagefolder":
        return _imagefolder(root, img_size or 32, test_fraction, seed)
    if name == "synthetic":
        return _synthetic(synthetic_size, img_size or 8, seed)
    raise DataError(f"data.name={name!r} is unknown; available: {', '.join(DATASETS)}")


def _make(name, train_x, train_y, test_x, test_y, num_classes) -> ImageData:
    if len(train_y) == 0 or len(test_y) == 0:
        raise DataError(f"{name}: {len(train_y)} training and {len(test_y)} test images; both splits need some "
                        f"(add images or change data.test_fraction)")
    mean, std = _channel_stats(train_x)
    return ImageData(train_x.contiguous(), train_y.long(), test_x.contiguous(), test_y.long(), num_classes,
                     mean, std, name)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std of uint8 images (N, C, H, W), from a 256-bin histogram per
    channel: no float copy of the whole set (CIFAR would need 600 MB)."""
    v = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(x.shape[1]):
        h = torch.bincount(x[:, c].reshape(-1), minlength=256).double()
        p = h / h.sum()
        m = (p * v).sum()
        mean.append(float(m))
        std.append(max(float(((p * (v - m) ** 2).sum()).sqrt()), 1e-3))  # a constant channel must not divide by 0
    return tuple(mean), tuple(std)


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_idx, test_idx): test_fraction of each class, chosen by the seed; both sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    g = torch_generator(seed, SPLIT, 1)
    test = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test.append(idx[:round(test_fraction * len(idx))])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return torch.nonzero(~is_test).flatten(), torch.nonzero(is_test).flatten()


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    d = load_digits()
    x = np.rint(d.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(d.target).long()  # (1797, 1, 8, 8), (1797,)


def _torchvision(name: str, root: str, download: bool) -> ImageData:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}[name]
    try:
        if name == "stl10":
            tr, te = cls(root, split="train", download=download), cls(root, split="test")
            to_x = lambda d: torch.from_numpy(d.data)  # already (N, 3, 96, 96)
            to_y = lambda d: torch.from_numpy(d.labels.astype(np.int64))
        else:
            tr, te = cls(root, train=True, download=download), cls(root, train=False)
            to_x = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2)  # stored HWC
            to_y = lambda d: torch.tensor(d.targets, dtype=torch.int64)
    except (RuntimeError, OSError) as e:  # torchvision: "not found or corrupted"; OSError: download failed
        files = ", ".join(f for f, _ in cls.train_list + cls.test_list)
        raise DataError(
            f"{name}: could not load {cls.base_folder}/ under {os.path.abspath(root)} ({e}). Expected files "
            f"{files} there (torchvision checks their md5). Run with data.download=true on a machine with "
            f"network access, or place {cls.base_folder} (extracted from {cls.url}) under {os.path.abspath(root)} "
            f"(set data.root).") from None
    num_classes = len(tr.classes) if getattr(tr, "classes", None) else int(to_y(tr).max()) + 1
    return _make(name, to_x(tr), to_y(tr), to_x(te), to_y(te), num_classes)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
HELD_OUT = ("val", "valid", "validation", "test")  # beside train/: the held-out split


def _imagefolder(root: str | None, size: int, test_fraction: float, seed: int) -> ImageData:
    """Class subfolders under root (or under root/train and root/val|valid|validation|test),
    loaded and resized to size x size (shorter side to size, then a centre crop: no
    distortion), as RGB. Hidden files and folders are skipped; an image reached twice (a
    symlink) is refused: it could land in both the training and the test split."""
    if root is None:
        raise DataError("data.root must name a folder of class subfolders for data.name=imagefolder")
    if not os.path.isdir(root):
        what = "not a folder" if os.path.exists(root) else "no such folder"
        raise DataError(f"data.root={root!r}: {what} ({os.path.abspath(root)}); imagefolder expects "
                        f"class subfolders of images there, or train/ and val/ (or test/) each holding them")
    held_out = next((s for s in HELD_OUT if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")):
        if not held_out:
            raise DataError(f"data.root={root!r} holds train/ but none of {', '.join(h + '/' for h in HELD_OUT)} beside "
                            f"it; point data.root at the train/ folder itself to split it (data.test_fraction)")
        tr, te = _image_folder(os.path.join(root, "train")), _image_folder(os.path.join(root, held_out))
        if tr.classes != te.classes:
            missing = sorted(set(tr.classes) ^ set(te.classes))
            raise DataError(f"{root}: train/ and {held_out}/ have different class folders (in one only: "
                            f"{', '.join(missing[:5])}); each class needs a folder in both")
        refuse_duplicates([p for p, _ in tr.samples + te.samples], IMAGE_TWICE)
        (train_x, train_y), (test_x, test_y) = _read_images(tr, size), _read_images(te, size)
    else:
        tr = _image_folder(root)
        refuse_duplicates([p for p, _ in tr.samples], IMAGE_TWICE)
        x, y = _read_images(tr, size)
        itr, ite = _stratified_split(y, test_fraction, seed)
        train_x, train_y, test_x, test_y = x[itr], y[itr], x[ite], y[ite]
    if len(tr.classes) < 2:  # one class: every prediction right, nothing learnt
        raise DataError(f"data.root={root!r}: {len(tr.classes)} class folder ({', '.join(tr.classes)}); a classifier "
                        "needs at least 2, one subfolder of images per class")
    return _make("imagefolder", train_x, train_y, test_x, test_y, len(tr.classes))


def _image_folder(root: str):
    """torchvision's ImageFolder over `root`, without hidden class folders or files (.git,
    .ipynb_checkpoints, macOS's ._x.png) and with GIF; DataError for a class without images."""
    from torchvision.datasets import ImageFolder

    class Visible(ImageFolder):
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"no class folders in {directory}")
            return classes, {c: i for i, c in enumerate(classes)}

    def is_image(path: str) -> bool:
        rel = os.path.relpath(path, root).split(os.sep)
        return path.lower().endswith(IMAGE_EXTENSIONS) and not any(part.startswith(".") for part in rel)

    try:
        return Visible(root, is_valid_file=is_image)
    except FileNotFoundError as e:  # no class folders, or a class without images
        raise DataError(f"data.root={root!r}: {e} (images are {' '.join(IMAGE_EXTENSIONS)} files; hidden ones "
                        "are skipped)") from None


IMAGE_TWICE = "image (a symlink, or a loop of them): an image must be in the data once, or it can be both trained on and tested on"


def refuse_duplicates(paths: list[str], why: str) -> None:
    """DataError if two of `paths` are one file (a symlink to another, or a loop of them); `why`
    ends the message: what the file is, and what reading it twice would do."""
    seen: dict[str, str] = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise DataError(f"{path} and {seen[real]} are the same {why}")
        seen[real] = path


def _read_images(ds, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, ImageOps

    x = np.empty((len(ds.samples), size, size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(ds.samples):  # decoding is per file anyway
        try:
            img = _rgb(path)
        except Image.DecompressionBombError as e:
            raise DataError(f"{path}: larger than Pillow's safety limit for one image ({e}); shrink it, or raise "
                            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
        except (OSError, ValueError, SyntaxError) as e:  # Pillow's plugins raise all three on bad files
            raise DataError(f"{path}: not a readable image ({e})") from None
        x[i] = np.asarray(ImageOps.fit(img, (size, size), Image.BILINEAR))
    return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(ds.targets, dtype=torch.int64)


def _rgb(path: str):
    """The image at `path` as 8-bit RGB. 16-bit images (PNG, TIFF) are scaled down to 8 bits:
    Pillow's own conversion would clip every value over 255, making most of the image white.
    Float images (TIFF "F") in [0, 1] are scaled up (Pillow's would make them black), in
    [0, 255] kept; any other range is refused rather than guessed."""
    from PIL import Image

    with Image.open(path) as img:
        if img.mode == "F":
            a = np.asarray(img, dtype=np.float64)
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            if not (np.isfinite(a).all() and lo >= 0 and hi <= 255):
                raise ValueError(f"a float image with values in [{lo:g}, {hi:g}], not [0, 1] or [0, 255]: "
                                 "convert it to 8 or 16 bits")
            scale = 255.0 if hi <= 1.0 else 1.0
            return Image.fromarray(np.rint(a * scale).astype(np.uint8)).convert("RGB")
        if img.mode.startswith("I"):  # "I;16*" (16-bit) or "I" (32-bit ints, how 16-bit PNGs often open)
            a = np.asarray(img).astype(np.int64)
            if img.mode.startswith("I;16") or a.max() > 255:
                a = a.clip(0, 65535) // 257
            return Image.fromarray(a.clip(0, 255).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def _synthetic(n: int, size: int, seed: int, classes: int = 10, chans: int = 3) -> ImageData:
    """A learnable set: each class is a smooth random prototype; a sample is its class's
    prototype, randomly brightened, plus pixel noise. n train samples, n // 4 test samples."""
    if n < classes:
        raise DataError(f"data.synthetic_size must be at least {classes} (one sample per class), got {n}")
    g = torch_generator(seed, SPLIT, 3)
    m = max(n // 4, classes)
    coarse = torch.randn(classes, chans, 4, 4, generator=g)
    proto = resize(coarse, size)
    y = torch.arange(n + m) % classes
    y = y[torch.randperm(n + m, generator=g)]
    gain = 1 + 0.2 * torch.randn(n + m, 1, 1, 1, generator=g)
    x = 0.5 + 0.15 * gain * proto[y] + 0.1 * torch.randn(n + m, chans, size, size, generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return _make("synthetic", x[:n], y[:n], x[n:], y[n:], classes)


# ----------------------------------------------------------------------------- sharding
def partition(labels: torch.Tensor, num_shards: int, method: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[torch.Tensor]:
    """Split sample indices 0..N-1 into num_shards disjoint, covering, non-empty shards.

    iid: a seeded permutation cut into equal-ish parts. dirichlet: label skew — each class's
    samples are dealt to the shards in proportions drawn from Dirichlet(alpha); an empty shard
    then takes one sample from the largest. Returns sorted int64 index tensors; depends only on
    (labels, num_shards, method, alpha, seed).
    """
    n = len(labels)
    if num_shards < 1 or num_shards > n:
        raise DataError(f"lte.heads={num_shards}: cannot split the {n} training samples into {num_shards} non-empty "
                        "shards (use fewer heads or more data)")
    if method == "iid":
        perm = torch.randperm(n, generator=torch_generator(seed, SPLIT, 2, num_shards))
        return [s.sort().values for s in torch.tensor_split(perm, num_shards)]
    if method != "dirichlet":
        raise DataError(f"data.partition={method!r} is unknown; choose iid or dirichlet")
    if not alpha > 0:
        raise DataError(f"data.alpha must be > 0 for data.partition=dirichlet, got {alpha}")
    rng = np.random.default_rng(derive_seed(seed, SPLIT, 2, num_shards))
    y = labels.cpu().numpy()
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(rng.dirichlet(np.full(num_shards, alpha))) * len(idx)).round().astype(int)[:-1]
        for s, part in zip(shards, np.split(idx, cuts)):
            s.extend(part.tolist())
    for s in shards:  # small alpha can leave a shard empty: every head needs data
        if not s:
            big = max(shards, key=len)
            s.append(big.pop(int(rng.integers(len(big)))))
    return [torch.tensor(sorted(s), dtype=torch.int64) for s in shards]


# ----------------------------------------------------------------------------- batches
_PERMS: dict[tuple[int, int, int], tuple[int, torch.Tensor]] = {}  # (n, seed, head) -> its latest epoch's order


def _epoch_perm(n: int, seed: int, head: int, epoch: int) -> torch.Tensor:
    # Keep one permutation per head: consecutive steps mostly stay in one epoch, and memory stays
    # at one int64 per training sample however many epochs and heads go by.
    hit = _PERMS.get((n, seed, head))
    if hit is None or hit[0] != epoch:
        if len(_PERMS) > 4096:
            _PERMS.clear()
        hit = _PERMS[(n, seed, head)] = (epoch, torch.randperm(n, generator=torch_generator(seed, DATA, head, epoch)))
    return hit[1]


def head_batch_indices(shard: torch.Tensor, step: int, batch_size: int, seed: int, head: int) -> torch.Tensor:
    """Dataset indices (batch_size,) head `head` trains on at global step `step` (0-based).

    The head walks its shard epoch after epoch, each epoch in the order of a permutation keyed by
    (seed, DATA, head, epoch); step t takes positions [t*b, (t+1)*b) of that endless stream.
    Stateless: the answer depends only on the arguments, so any step can be computed directly.
    """
    n = len(shard)
    start, stop = step * batch_size, (step + 1) * batch_size
    parts = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
        parts.append(_epoch_perm(n, seed, head, epoch)[lo:hi])
    return shard[torch.cat(parts)]


def make_batch(data: ImageData, indices: torch.Tensor, *, train: bool, img_size: int, augment: bool, seed: int,
               head: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (b, C, img_size, img_size) float32, normalised, and labels (b,) int64.

    With augment and train: random crop from a zero-padded image (pad img_size // 8, at least 1)
    and, except for datasets in NO_FLIP, a horizontal flip; randomness keyed by (seed, AUGMENT,
    head, step). Vectorised over the batch.
    """
    xs, ys = (data.train_x, data.train_y) if train else (data.test_x, data.test_y)
    x = xs[indices].float().div_(255)
    if x.shape[-1] != img_size:
        x = resize(x, img_size)
    if augment and train:
        x = _augment(x, torch_generator(seed, AUGMENT, head, step), flip=data.name not in NO_FLIP)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return (x - mean) / std, ys[indices]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of images (b, C, h, w) float -> (b, C, size, size), antialiased when it
    shrinks (a triangle filter as wide as the scale, as PIL and `F.interpolate(antialias=True)`
    do; pixel centres aligned, `align_corners=False`).

    Why not `F.interpolate`: its CPU kernel gives other roundings at other thread counts
    (measured: 4x4 -> 224 differs in a third of the pixels between 1 and 2 threads), so the
    same seed gave other batches, and another data hash, on a node with another thread count.
    Here every output pixel is a gather and a fixed sequence of elementwise multiplies and
    adds: the same bits whatever the threads."""
    return _resize_axis(_resize_axis(x, size, -1), size, -2)


def _resize_axis(x: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    idx, w = _resize_taps(x.shape[dim], size)
    shape = [1] * x.ndim
    shape[dim] = size
    out = None
    for k in range(idx.shape[1]):
        term = x.index_select(dim, idx[:, k]).mul_(w[:, k].to(x.dtype).view(shape))
        out = term if out is None else out.add_(term)
    return out


@functools.lru_cache(maxsize=32)  # every batch of a run asks for the same few: read-only tensors
def _resize_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of n_out output pixels, the input pixels it reads and their weights: (n_out, taps)
    int64 and float64, each row summing to 1. A triangle of half-width max(scale, 1) input pixels
    around the output pixel's centre; taps outside the image get weight 0 (index clamped), and
    the rest are renormalised, which at the border is bilinear's clamp to the edge pixel."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    first = torch.floor(centre - support + 0.5).long()  # the first pixel whose centre is inside
    j = first[:, None] + torch.arange(int(np.ceil(2 * support)) + 1)
    w = (1 - ((j + 0.5 - centre[:, None]) / support).abs()).clamp_(min=0)
    w[(j < 0) | (j >= n_in)] = 0
    used = int((w > 0).any(0).nonzero().max()) + 1  # taps past the triangle on every row: dropped
    j, w = j[:, :used], w[:, :used]
    return j.clamp(0, n_in - 1), w / w.sum(1, keepdim=True)


def _augment(x: torch.Tensor, g: torch.Generator, flip: bool) -> torch.Tensor:
    """Random crop (per-sample offsets) and optional horizontal flip, (b, C, s, s) -> same."""
    b, c, s, _ = x.shape
    pad = max(s // 8, 1)
    xp = F.pad(x, (pad, pad, pad, pad))  # black border, as padding the raw image would give
    big = s + 2 * pad
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=g)
    ar = torch.arange(s)
    rows = (off[:, 0:1] + ar).view(b, s, 1)
    cols = (off[:, 1:2] + ar).view(b, 1, s)
    # one flat gather per image (6x faster than 4-way advanced indexing)
    flat = (rows * big + cols).view(b, 1, s * s).expand(b, c, s * s)
    x = xp.flatten(2).gather(2, flat).view(b, c, s, s)
    if flip:
        mask = (torch.rand(b, generator=g) < 0.5).view(b, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def test_batches(data: ImageData, batch_size: int, img_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole test set in order, in batches of (<= batch_size, C, img_size, img_size); no augmentation."""
    m = len(data.test_y)
    for i in range(0, m, batch_size):
        yield make_batch(data, torch.arange(i, min(i + batch_size, m)), train=False, img_size=img_size,
                         augment=False, seed=0, head=0, step=0)


test_batches.__test__ = False  # not a pytest test, whatever its name
