"""Data sets as in-memory tensors: digits (bundled), MNIST/CIFAR (torchvision), synthetic.

Every data set is read once into memory and served as float images in [0, 1] (what
``torchvision.transforms.ToTensor`` gives, applied in bulk), so the training loop can
index batches directly instead of going through a per-item DataLoader.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DATASET_NAMES = ("cifar10", "cifar100", "digits", "mnist", "synthetic")
DOWNLOADABLE = ("mnist", "cifar10", "cifar100")  # digits is bundled, synthetic generated
DATA_ENV_VAR = "HESSWEEP_DATA"
# (num_classes, in_channels, image_size) of each data set, known before loading it: a spec
# is checked against them without reading (or having) the files.
SHAPES = {
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "digits": (10, 1, 8),
    "mnist": (10, 1, 28),
    "synthetic": (4, 1, 8),
}

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are missing (and were not downloaded)."""


class DatasetCorruptError(RuntimeError):
    """A data set's files exist but fail torchvision's checks (checksum or format)."""


class ImageTensorDataset(Dataset):
    """Images held in memory (uint8 0..255 or float 0..1) with integer labels.

    Items are ``(float32 tensor C x H x W in [0, 1], int label)``; `batch` and `tensors`
    give whole batches without a per-item loop.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_float_images(self.images[index]), int(self.labels[index])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images and labels at `index` (a 1-D index tensor)."""
        return to_float_images(self.images[index]), self.labels[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All float images and labels."""
        return to_float_images(self.images), self.labels

    def batches(
        self, batch_size: int, device: str | torch.device = "cpu"
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole set, in order, as (float images, labels) chunks on `device`.

        The form the Hessian operators take as `data` (every example exactly once).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return [
            (
                to_float_images(self.images[i : i + batch_size]).to(device),
                self.labels[i : i + batch_size].to(device),
            )
            for i in range(0, len(self), batch_size)
        ]


def to_float_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 images to float32 in [0, 1]; float images unchanged."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images


@dataclass(frozen=True)
class DataSplits:
    """A loaded data set: train and test splits plus the shape facts models need."""

    name: str
    train: ImageTensorDataset
    test: ImageTensorDataset
    num_classes: int
    in_channels: int
    image_size: int


def download_hint(name: str, root: Path | None = None) -> str:
    """How to fetch a data set once into ``root`` (training itself never downloads)."""
    if root is None or root == default_root():
        return f"`hessweep download {name}` (or load_dataset({name!r}, download=True))"
    return (
        f"`hessweep download {name} --root {root}` "
        f"(or load_dataset({name!r}, root={str(root)!r}, download=True))"
    )


def default_root() -> Path:
    """`HESSWEEP_DATA` if set, else a per-user cache folder."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hessweep" / "data"


def expected_files(name: str, root: str | os.PathLike[str]) -> str:
    """Where a downloadable data set's files must lie, for people who copy them by hand."""
    folder, files = _layout(name, Path(root))
    return f"{', '.join(files)} in {folder}"


def _layout(name: str, root: Path) -> tuple[Path, Sequence[str]]:
    """The folder torchvision reads a downloadable data set from, and its files there."""
    if name == "mnist":
        return root / "MNIST" / "raw", _MNIST_FILES
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    return root / cls.base_folder, _CIFAR10_FILES if name == "cifar10" else _CIFAR100_FILES


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    *,
    verify_checksums: bool = True,
) -> DataSplits:
    """Load a data set by name; `root` defaults to `HESSWEEP_DATA`, else the user cache.

    `verify_checksums=False` skips torchvision's MD5 check of the CIFAR files (for copies
    re-packed or trimmed on purpose, such as the tiny files tests write); the files must
    still exist and parse.
    """
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic()
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    base = Path(root).expanduser() if root is not None else default_root()
    if name == "mnist":
        return _load_mnist(base, download)
    return _load_cifar(name, base, download, verify_checksums)


def load_digits(test_size: float = 0.2, random_state: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split, pixels / 16."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=random_state
    )
    return DataSplits(
        name="digits",
        train=ImageTensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr)),
        test=ImageTensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te)),
        num_classes=10,
        in_channels=1,
        image_size=8,
    )


def load_synthetic(
    n_train: int = 256,
    n_test: int = 128,
    num_classes: int = 4,
    image_size: int = 8,
    noise: float = 0.15,
    seed: int = 0,
) -> DataSplits:
    """A small seeded, learnable task: noisy copies of one random prototype per class."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, 1, image_size, image_size, generator=gen)

    def sample(n: int) -> ImageTensorDataset:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=gen)]
        images = prototypes[labels] + noise * torch.randn(
            n, 1, image_size, image_size, generator=gen
        )
        return ImageTensorDataset(images.clamp_(0.0, 1.0), labels)

    return DataSplits(
        name="synthetic",
        train=sample(n_train),
        test=sample(n_test),
        num_classes=num_classes,
        in_channels=1,
        image_size=image_size,
    )


def _load_mnist(root: Path, download: bool) -> DataSplits:
    """MNIST through torchvision's own class (idx files under root/MNIST/raw/)."""
    from torchvision.datasets import MNIST

    raw, _ = _layout("mnist", root)
    _gunzip_missing(raw, _MNIST_FILES)
    missing = _missing(raw, _MNIST_FILES)
    if missing and not download:
        raise _not_found("mnist", root, raw, _MNIST_FILES, missing)
    fetch = download and bool(missing)
    splits = [_construct(MNIST, "mnist", root, raw, train, fetch) for train in (True, False)]
    train, test = (
        ImageTensorDataset(ds.data.unsqueeze(1).contiguous(), ds.targets) for ds in splits
    )
    return DataSplits("mnist", train, test, num_classes=10, in_channels=1, image_size=28)


def _load_cifar(name: str, root: Path, download: bool, verify_checksums: bool) -> DataSplits:
    """CIFAR-10/100 through torchvision's own classes (pickled batches)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    folder, files = _layout(name, root)
    if not verify_checksums:
        cls = _without_md5(cls)
    missing = _missing(folder, files)
    if missing and not download:
        raise _not_found(name, root, folder, files, missing)
    fetch = download and bool(missing)
    splits = [_construct(cls, name, root, folder, train, fetch) for train in (True, False)]
    train, test = (
        ImageTensorDataset(
            torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2))),
            torch.as_tensor(ds.targets),
        )
        for ds in splits
    )
    num_classes = len(splits[0].classes)
    return DataSplits(name, train, test, num_classes=num_classes, in_channels=3, image_size=32)


def _without_md5(cls: type) -> type:
    """A subclass of a torchvision CIFAR class whose integrity check is existence only.

    torchvision's `check_integrity(path, md5=None)` checks only that the file exists, so
    clearing the recorded MD5s is the whole change; parsing is torchvision's own.
    """
    return type(
        f"Unverified{cls.__name__}",
        (cls,),
        {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        },
    )


def _construct(
    cls: type, name: str, root: Path, folder: Path, train: bool, download: bool
) -> Dataset:
    """Instantiate a torchvision data set, turning its failures into clear errors."""
    try:
        return cls(str(root), train=train, download=download)
    except (
        OSError,
        RuntimeError,
        ValueError,
        EOFError,
        KeyError,
        AssertionError,  # torchvision's MNIST reader asserts on a bad idx header
        pickle.UnpicklingError,
    ) as err:
        reason = str(err) or f"{type(err).__name__} in {cls.__name__}"
        if download:
            raise DatasetNotFoundError(
                f"could not download {name} into {folder}: {reason}. Without internet, copy the "
                f"files there yourself, or point data_root / {DATA_ENV_VAR} at a copy."
            ) from err
        raise DatasetCorruptError(
            f"{name} files in {folder} exist but torchvision rejected them: {reason}. They may be "
            "truncated or not the published release (CIFAR files are MD5-checked); delete the "
            f"folder and fetch them again with {download_hint(name, root)}, or pass "
            "verify_checksums=False for a copy trimmed on purpose."
        ) from err


def _missing(folder: Path, files: Sequence[str]) -> list[str]:
    """The names in `files` that are not regular files in `folder`."""
    return [f for f in files if not (folder / f).is_file()]


def _not_found(
    name: str, root: Path, folder: Path, files: Sequence[str], missing: Sequence[str]
) -> Exception:
    """The error for a data set that is not on disk."""
    return DatasetNotFoundError(
        f"{name} not found: expected files {', '.join(files)} in {folder} "
        f"(missing: {', '.join(missing)}). Fetch them with {download_hint(name, root)}, or set "
        f"data_root / {DATA_ENV_VAR} to a folder that holds them."
    )


def _gunzip_missing(folder: Path, files: Sequence[str]) -> None:
    """Unpack `name.gz` next to it for each missing `name` (as torchvision's download does)."""
    for f in _missing(folder, files):
        packed = folder / f"{f}.gz"
        if packed.is_file():
            tmp = folder / f"{f}.partial"
            with gzip.open(packed, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(folder / f)


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, padding: int | None = None
) -> torch.Tensor:
    """Standard augmentation: zero-pad, random crop back to size, random horizontal flip.

    `padding` defaults to image_size // 8 (4 pixels on 32x32, the usual CIFAR recipe).
    Randomness comes from `generator` (CPU) only; the input is not modified.
    """
    n, _, h, w = images.shape
    pad = max(1, h // 8) if padding is None else padding
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


__all__ = [
    "DATASET_NAMES",
    "DOWNLOADABLE",
    "SHAPES",
    "DataSplits",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "ImageTensorDataset",
    "default_root",
    "load_dataset",
    "load_digits",
    "load_synthetic",
    "random_crop_flip",
    "to_float_images",
]
