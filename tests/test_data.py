"""Data sets written in their real on-disk formats, loaded through consensus_gates.training.data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torchvision.datasets.cifar
from PIL import Image
from torch.utils.data import DistributedSampler

from consensus_gates.errors import DataError
from consensus_gates.training.data import (
    DATASETS,
    DataInfo,
    build_datasets,
    dataset_info,
    make_loaders,
)

from conftest import fake_fashion_mnist

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def no_md5(monkeypatch):
    """Let torchvision accept our fake CIFAR files: they cannot have the real md5 sums. Only the
    test patches this; users' files are still checked."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def _pickle(path: Path, obj: dict) -> None:
    # the real files are Python 2 pickles, whose str keys torchvision reads (encoding="latin1")
    # as str; Python 3 str keys give the same
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _pixels(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def fake_cifar10(root: Path, per_batch: int = 8, n_test: int = 10) -> dict[str, np.ndarray]:
    """`cifar-10-batches-py` with five training batches of `per_batch` images each."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if name == "test_batch" else per_batch
        written[name] = _pixels(n, i)
        labels = [(i + j) % 10 for j in range(n)]
        _pickle(folder / name, {"data": written[name], "labels": labels, "batch_label": name})
    _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return written


def fake_cifar100(root: Path, n_train: int = 20, n_test: int = 6) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for i, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        fine = [(7 * j + i) % 100 for j in range(n)]
        _pickle(
            folder / name,
            {"data": _pixels(n, i), "fine_labels": fine, "coarse_labels": [f // 5 for f in fine]},
        )
    names = [f"fine{c}" for c in range(100)]
    _pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]})


WNIDS = ["n02", "n01", "n03"]  # not sorted: the class index is the order in wnids.txt


def fake_tiny_imagenet(root: Path, per_class: int = 2) -> list[int]:
    """The layout of tiny-imagenet-200.zip; returns the val labels in dataset order."""
    base = root / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for c, wnid in enumerate(WNIDS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # as in the zip
        for k in range(per_class):
            Image.new("RGB", (64, 64), (80 * c, 40, 200 - 80 * c)).save(images / f"{wnid}_{k}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines, labels = [], []
    for k, wnid in enumerate(["n03", "n02", "n01", "n03"]):
        Image.new("L", (64, 64), 100).save(base / "val" / "images" / f"val_{k}.JPEG")  # greyscale
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        labels.append(WNIDS.index(wnid))
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return labels


def fake_image_folder(root: Path, test_split: str = "val", classes=("cat", "dog")) -> Path:
    for split, n in (("train", 3), (test_split, 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (40, 30), (100 * c, k, 50)).save(folder / f"{k}.png")
    return root


# --- names and info ---


def test_names_aliases_and_info():
    assert DATASETS == ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet", "imagefolder")
    for alias, name in [
        ("FMNIST", "fashion_mnist"),
        ("Fashion-MNIST", "fashion_mnist"),
        ("cifar-10", "cifar10"),
        ("CIFAR-100", "cifar100"),
        ("tiny-imagenet", "tiny_imagenet"),
    ]:
        assert dataset_info(alias).name == name
    assert dataset_info("cifar10") == DataInfo(
        "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    )
    assert (dataset_info("fmnist").in_channels, dataset_info("fmnist").image_size) == (1, 28)
    assert dataset_info("tiny_imagenet").num_classes == 200
    assert dataset_info("tiny_imagenet").image_size == 64
    with pytest.raises(ValueError, match="cifar10, cifar100, fashion_mnist, tiny_imagenet"):
        dataset_info("mnist")
    with pytest.raises(ValueError, match="pass root"):
        dataset_info("imagefolder")


# --- each format ---


def test_cifar10(tmp_path, no_md5):
    written = fake_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", tmp_path, augment=False)
    assert (len(train), len(test), info.num_classes) == (40, 10, 10)
    x, y = train[9]  # second image of data_batch_2
    assert x.shape == (3, 32, 32) and y == (1 + 1) % 10
    raw = torch.from_numpy(written["data_batch_2"][1].astype(np.float32)).view(3, 32, 32)
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw / 255 - mean) / std)
    assert test.targets == [(5 + j) % 10 for j in range(10)]

    augmented, _, _ = build_datasets("cifar-10", tmp_path)
    assert augmented[0][0].shape == (3, 32, 32)


def test_cifar_md5_is_still_checked_for_users(tmp_path):
    fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="corrupted"):
        build_datasets("cifar10", tmp_path)


def test_cifar100_fine_labels(tmp_path, no_md5):
    fake_cifar100(tmp_path)
    train, test, info = build_datasets("cifar100", tmp_path, augment=False)
    assert (len(train), len(test), info.num_classes) == (20, 6, 100)
    assert train.targets == [(7 * j) % 100 for j in range(20)]
    assert test[5][0].shape == (3, 32, 32) and test[5][1] == 36


def test_fashion_mnist_normalization(tmp_path):
    fake_fashion_mnist(tmp_path, n_train=30, n_test=10)
    train, test, info = build_datasets("fashion_mnist", tmp_path, augment=False)
    assert (len(train), len(test), info.in_channels) == (30, 10, 1)
    x, y = train[3]
    raw = train.data[3].float()
    assert x.shape == (1, 28, 28) and y == 3
    torch.testing.assert_close(x[0], (raw / 255 - 0.2860) / 0.3530)


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "tiny-imagenet-200"])
def test_tiny_imagenet(tmp_path, inside):
    val_labels = fake_tiny_imagenet(tmp_path)
    root = tmp_path / "tiny-imagenet-200" if inside else tmp_path
    train, test, info = build_datasets("tiny-imagenet", root)
    assert (len(train), len(test), info.num_classes, info.image_size) == (6, 4, 3, 64)
    assert train.classes == WNIDS and train.targets == [0, 0, 1, 1, 2, 2]
    assert test.targets == val_labels == [2, 0, 1, 2]
    x, y = test[0]
    assert x.shape == (3, 64, 64) and y == 2  # the greyscale JPEG comes out RGB
    # train images of class c are (80c, 40, 200 - 80c): the labels follow wnids.txt
    image, label = build_datasets("tiny_imagenet", root, augment=False)[0][5]
    red = image[0].mean() * info.std[0] + info.mean[0]
    assert label == 2 and abs(red.item() - 160 / 255) < 0.02
    assert dataset_info("tiny_imagenet", root).num_classes == 3


def test_tiny_imagenet_errors(tmp_path):
    fake_tiny_imagenet(tmp_path)
    with pytest.raises(DataError, match="cs231n.stanford.edu/tiny-imagenet-200.zip"):
        build_datasets("tiny_imagenet", tmp_path, download=True)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:1: .*n99"):
        build_datasets("tiny_imagenet", tmp_path)
    with pytest.raises(DataError, match="wnids.txt, train/<wnid>/images"):
        build_datasets("tiny_imagenet", tmp_path / "elsewhere")


@pytest.mark.parametrize("test_split", ["val", "test"])
def test_image_folder(tmp_path, test_split):
    root = fake_image_folder(tmp_path, test_split)
    train, test, info = build_datasets("imagefolder", root)
    assert (len(train), len(test), info.num_classes) == (6, 4, 2)
    assert train[0][0].shape == test[0][0].shape == (3, 224, 224)
    assert test.targets == [0, 0, 1, 1]
    assert dataset_info("imagefolder", root) == info


def test_image_folder_errors(tmp_path):
    fake_image_folder(tmp_path / "a")
    (tmp_path / "a" / "val" / "dog").rename(tmp_path / "a" / "val" / "zebra")
    with pytest.raises(DataError, match="classes differ"):
        build_datasets("imagefolder", tmp_path / "a")
    with pytest.raises(DataError, match="nothing to download"):
        build_datasets("imagefolder", tmp_path / "a", download=True)
    with pytest.raises(DataError, match=r"train/<class>/<image>"):
        dataset_info("imagefolder", tmp_path / "missing")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "cifar10",
            "cifar-10-batches-py/data_batch_1, data_batch_2, data_batch_3, data_batch_4, "
            "data_batch_5, test_batch, batches.meta",
        ),
        ("cifar100", "cifar-100-python/train, test, meta"),
        (
            "fashion_mnist",
            "FashionMNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
        ),
    ],
)
def test_missing_data_says_what_to_put_where(tmp_path, name, expected):
    with pytest.raises(DataError) as err:
        build_datasets(name, tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/{expected}" in message
    assert "--download" in message and "--data-root" in message
    assert isinstance(err.value.__cause__, RuntimeError)  # torchvision's, chained


# --- loaders ---


def test_subsets_and_seeded_order(tmp_path, no_md5):
    fake_cifar10(tmp_path)

    def first_batch(seed: int) -> tuple[list[int], torch.Tensor, list[int]]:
        train, test, _ = make_loaders(
            "cifar10", tmp_path, batch_size=4, subset=12, test_subset=5, seed=seed, augment=False
        )
        assert (len(train.dataset), len(test.dataset), len(train)) == (12, 5, 3)
        x, y = next(iter(train))
        assert x.shape == (4, 3, 32, 32)
        return train.dataset.indices, x, y.tolist()

    indices, x, y = first_batch(0)
    again = first_batch(0)
    assert again[0] == indices and torch.equal(again[1], x) and again[2] == y
    assert first_batch(1)[0] != indices

    train, test, _ = make_loaders("cifar10", tmp_path, batch_size=8, subset=0)
    assert (len(train.dataset), len(test.dataset), len(train)) == (40, 10, 5)  # drop_last
    assert len(test) == 1  # no drop_last
    with pytest.raises(ValueError, match="larger than the 12 training images"):
        make_loaders("cifar10", tmp_path, batch_size=13, subset=12)
    with pytest.raises(ValueError, match="between 1 and the 40 images"):
        make_loaders("cifar10", tmp_path, subset=41)


def test_distributed_sampler(tmp_path, no_md5):
    fake_cifar10(tmp_path / "data")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        train, test, _ = make_loaders(
            "cifar10", tmp_path / "data", batch_size=8, seed=3, distributed=True
        )
        assert isinstance(train.sampler, DistributedSampler) and train.sampler.shuffle
        assert isinstance(test.sampler, DistributedSampler) and not test.sampler.shuffle
        assert len(train) == 5 and len(test) == 1
        epoch0 = list(train.sampler)
        train.sampler.set_epoch(1)
        assert list(train.sampler) != epoch0 and sorted(train.sampler) == sorted(epoch0)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no real Fashion-MNIST at {SHARED_DATA}")
def test_real_fashion_mnist():
    train, test, info = make_loaders("fashion_mnist", SHARED_DATA, subset=512, batch_size=64)
    assert info.num_classes == 10 and len(test.dataset) == 10000 and len(train) == 8
    x, y = next(iter(train))
    assert x.shape == (64, 1, 28, 28) and y.min() >= 0 and y.max() <= 9
