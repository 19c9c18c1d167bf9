"""Data sets: digits split, and MNIST / CIFAR read from tiny files in their real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from trainables.data import (
    SHAPES,
    DatasetCorruptError,
    DatasetNotFoundError,
    load_dataset,
    random_crop_flip,
)


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An idx file (the MNIST format): magic 0x0000 08 ndim, big-endian sizes, ubytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, n_train: int = 20, n_test: int = 10, compress: bool = False) -> dict:
    """Write MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte under root."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw / f"{split}-images-idx3-ubyte", images, compress)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = (images, labels)
    return arrays


def _pickle(path: Path, obj: dict) -> None:
    """Pickle the way the CIFAR python release does (protocol 2, latin-1-safe)."""
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(root: Path, per_batch: int = 4) -> dict:
    """Write cifar-10-batches-py/ with five data batches, a test batch and batches.meta."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        filenames = [f"img_{name}_{i}.png" for i in range(per_batch)]
        _pickle(
            folder / name,
            {"batch_label": name, "labels": labels, "data": data, "filenames": filenames},
        )
        arrays[name] = (data, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    _pickle(
        folder / "batches.meta",
        {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072},
    )
    return arrays


def _fake_cifar100(root: Path) -> dict:
    """Write cifar-100-python/{train,test,meta} with fine and coarse labels."""
    rng = np.random.default_rng(2)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    arrays = {}
    for name, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [v // 5 for v in fine]
        _pickle(
            folder / name,
            {
                "filenames": [f"{name}_{i}.png" for i in range(n)],
                "batch_label": name,
                "fine_labels": fine,
                "coarse_labels": coarse,
                "data": data,
            },
        )
        arrays[name] = (data, fine)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{i}" for i in range(100)],
            "coarse_label_names": [f"coarse_{i}" for i in range(20)],
        },
    )
    return arrays


def test_digits_split_is_fixed_stratified_and_scaled() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.labels, b.test.labels)
    train_counts, test_counts = Counter(a.train.labels.tolist()), Counter(a.test.labels.tolist())
    for c in range(10):
        share = test_counts[c] / (train_counts[c] + test_counts[c])
        assert abs(share - 0.2) < 0.01, (c, share)
    x, y = a.train[0]
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8) and isinstance(y, int)
    assert a.train.images.min() == 0.0 and a.train.images.max() == 1.0
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8) == SHAPES["digits"]


def test_digits_pixels_are_sklearn_values_over_16() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    digits = load_dataset("digits")
    # every training image is one of sklearn's images divided by 16
    table = {tuple(row): row for row in (raw.data / 16.0).astype(np.float32)}
    for image in digits.train.images[:50]:
        assert tuple(image.flatten().numpy()) in table


def test_synthetic_is_seeded_and_learnable_by_nearest_mean() -> None:
    a, b = load_dataset("synthetic"), load_dataset("synthetic")
    assert torch.equal(a.train.images, b.train.images)
    x, y = a.train.tensors()
    means = torch.stack([x[y == c].mean(0) for c in range(a.num_classes)])
    assert (a.num_classes, a.in_channels, a.image_size) == SHAPES["synthetic"]
    xt, yt = a.test.tensors()
    nearest = torch.cdist(xt.flatten(1), means.flatten(1)).argmin(1)
    assert (nearest == yt).float().mean() > 0.9


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzipped"])
def test_mnist_reads_real_idx_files(tmp_path: Path, compress: bool) -> None:
    arrays = _fake_mnist(tmp_path, compress=compress)
    data = load_dataset("mnist", root=tmp_path)
    assert (len(data.train), len(data.test)) == (20, 10)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 28) == SHAPES["mnist"]
    images, labels = arrays["t10k"]
    x, y = data.test[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.from_numpy(images[3]).float() / 255)
    assert y == int(labels[3])


def test_mnist_items_equal_torchvision_to_tensor(tmp_path: Path) -> None:
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    _fake_mnist(tmp_path)
    data = load_dataset("mnist", root=tmp_path)
    reference = MNIST(str(tmp_path), train=True, transform=ToTensor())
    for i in (0, 7, 19):
        assert torch.equal(data.train[i][0], reference[i][0])
        assert data.train[i][1] == reference[i][1]


def test_data_root_defaults_to_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mnist(tmp_path)
    monkeypatch.setenv("HESSWEEP_DATA", str(tmp_path))
    assert len(load_dataset("mnist").train) == 20


def test_missing_mnist_names_files_folder_and_flag(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert "download=True" in message and "hessweep download mnist" in message


def test_cifar10_reads_real_pickled_batches(tmp_path: Path) -> None:
    arrays = _fake_cifar10(tmp_path)
    data = load_dataset("cifar10", root=tmp_path, verify_checksums=False)
    assert (len(data.train), len(data.test)) == (20, 4)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32) == SHAPES["cifar10"]
    raw, labels = arrays["data_batch_2"]
    x, y = data.train[4 + 1]  # second image of the second batch
    # a CIFAR row is 1024 red, then 1024 green, then 1024 blue values, each row-major 32x32
    expected = torch.from_numpy(raw[1].reshape(3, 32, 32)).float() / 255
    assert torch.equal(x, expected)
    assert y == labels[1]


def test_cifar100_reads_fine_labels_and_meta(tmp_path: Path) -> None:
    arrays = _fake_cifar100(tmp_path)
    data = load_dataset("cifar100", root=tmp_path, verify_checksums=False)
    assert (len(data.train), len(data.test), data.num_classes) == (6, 3, 100)
    assert (data.num_classes, data.in_channels, data.image_size) == SHAPES["cifar100"]
    assert data.test.labels.tolist() == arrays["test"][1]
    x, _ = data.test[2]
    assert torch.equal(x, torch.from_numpy(arrays["test"][0][2].reshape(3, 32, 32)) / 255.0)


def test_cifar_checksums_are_checked_by_default(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    with pytest.raises(DatasetCorruptError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "MD5" in message and "verify_checksums=False" in message


def test_missing_cifar100_names_files_folder_and_flag(tmp_path: Path) -> None:
    (tmp_path / "cifar-100-python").mkdir()
    _pickle(tmp_path / "cifar-100-python" / "meta", {"fine_label_names": []})
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", root=tmp_path)
    message = str(info.value)
    assert "missing: train, test" in message and "download=True" in message


def test_truncated_cifar_batch_is_reported_as_corrupt(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DatasetCorruptError, match="cifar10 files in"):
        load_dataset("cifar10", root=tmp_path, verify_checksums=False)


def test_mnist_with_a_bad_header_is_reported_as_corrupt(tmp_path: Path) -> None:
    _fake_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"junk" * 100)
    with pytest.raises(DatasetCorruptError) as info:  # torchvision asserts on the header
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "mnist files in" in message and "AssertionError" in message
    assert f"hessweep download mnist --root {tmp_path}" in message  # this root, not the default


def test_unknown_dataset_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'svhn'.*cifar10.*digits.*mnist"):
        load_dataset("svhn")


def test_crop_flip_is_seeded_and_takes_pixels_from_the_image() -> None:
    x = torch.rand(16, 3, 32, 32)
    before = x.clone()
    a = random_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(x, before)
    assert a.shape == x.shape and not torch.equal(a, x)
    # no padding: every output is the image itself or its mirror image
    c = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    same = (c == x).flatten(1).all(1)
    mirrored = (c == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_batches_cover_the_set_once_in_order() -> None:
    data = load_dataset("digits").test
    chunks = data.batches(100)
    assert [len(y) for _, y in chunks] == [100, 100, 100, 60]
    x, y = data.tensors()
    assert torch.equal(torch.cat([c[0] for c in chunks]), x)
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
