"""Image classification data sets: CIFAR-10/100, Fashion-MNIST, Tiny ImageNet, any ImageFolder.

`build_datasets` gives (train, test) with the standard augmentation and normalization,
`make_loaders` wraps them in DataLoaders (seeded subsets, optional DistributedSampler), and
`dataset_info` says what a model needs to know (classes, channels, image size) without loading
anything. A missing or malformed data set raises `DataError` naming the files expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes

from ..errors import DataError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_FOLDER = "tiny-imagenet-200"

# what torchvision and our own readers raise for a missing, partial or corrupt data set
_LOAD_ERRORS = (
    RuntimeError,
    OSError,
    ValueError,
    KeyError,
    EOFError,
    AssertionError,
    pickle.UnpicklingError,
)


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a data set."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TinyImageNet(Dataset):
    """Tiny ImageNet 200 in the layout of the original zip.

    `root` is the `tiny-imagenet-200` folder or its parent. Class `i` is line `i` of
    `wnids.txt`; the training images are `train/<wnid>/images/*`, and the labelled validation
    split (`val/images/*` with `val/val_annotations.txt`) serves as the test set, since the
    official test split has no labels.
    """

    def __init__(
        self, root: str | Path, train: bool = True, transform: Callable | None = None
    ) -> None:
        base = tiny_imagenet_folder(root)
        self.classes = read_wnids(base)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.samples = self._train_samples(base) if train else self._val_samples(base)
        self.targets = [target for _, target in self.samples]
        self.transform = transform

    def _train_samples(self, base: Path) -> list[tuple[Path, int]]:
        samples = []
        for wnid, target in self.class_to_idx.items():
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is missing")
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
            if not images:
                raise FileNotFoundError(f"{folder} holds no images")
            samples += [(p, target) for p in images]
        return samples

    def _val_samples(self, base: Path) -> list[tuple[Path, int]]:
        annotations, folder = base / "val" / "val_annotations.txt", base / "val" / "images"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing")
        present = {p.name for p in folder.iterdir()}
        samples = []
        for lineno, line in enumerate(annotations.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in self.class_to_idx:
                raise ValueError(
                    f"{annotations}:{lineno}: expected 'file<TAB>wnid<TAB>...' "
                    f"with a wnid from wnids.txt, got {line!r}"
                )
            if fields[0] not in present:
                raise FileNotFoundError(f"{folder / fields[0]} (in {annotations}) is missing")
            samples.append((folder / fields[0], self.class_to_idx[fields[1]]))
        if not samples:
            raise ValueError(f"{annotations} lists no images")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = default_loader(str(path))  # RGB: a few Tiny ImageNet JPEGs are greyscale
        return (self.transform(image) if self.transform else image), target


def tiny_imagenet_folder(root: str | Path) -> Path:
    """The `tiny-imagenet-200` folder: `root` itself if it holds `wnids.txt`, else inside it."""
    root = Path(root).expanduser()
    return root if (root / "wnids.txt").is_file() else root / TINY_IMAGENET_FOLDER


def read_wnids(base: Path) -> list[str]:
    """The class ids (WordNet ids) listed in `base/wnids.txt`, in file order."""
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    if not wnids:
        raise ValueError(f"{base / 'wnids.txt'} lists no classes")
    return wnids


def _image_folder(root: Path, train: bool, transform: Callable) -> tvd.ImageFolder:
    split = "train" if train else ("test" if (root / "test").is_dir() else "val")
    return tvd.ImageFolder(str(root / split), transform=transform)


def _torchvision(cls: type) -> Callable[..., Dataset]:
    def load(root: Path, train: bool, transform: Callable, download: bool) -> Dataset:
        return cls(str(root), train=train, transform=transform, download=download)

    return load


def _cifar_layout(cls: type) -> str:
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return f"{{root}}/{cls.base_folder}/{', '.join(files)} (the unpacked {cls.filename})"


def _mnist_layout(cls: type) -> str:
    files = [Path(name).stem for name, _ in cls.resources]  # torchvision reads them unzipped
    return f"{{root}}/{cls.__name__}/raw/{', '.join(files)} (gunzip any .gz files)"


def _crop_flip(size: int, padding: int) -> Callable[[], list]:
    return lambda: [T.RandomCrop(size, padding=padding), T.RandomHorizontalFlip()]


_FETCH = "Pass --download to fetch it, or --data-root to point at it"
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _Spec:
    title: str  # the name in messages
    info: DataInfo
    load: Callable[[Path, bool, Callable, bool], Dataset]  # (root, train, transform, download)
    layout: str  # the files expected, with "{root}" in place of the root
    fetch: str  # how to get the data; also says whether --download works
    train_aug: Callable[[], list]  # PIL transforms before ToTensor + Normalize
    test_prep: Callable[[], list] = list
    count_classes: Callable[[Path], int] | None = None  # from disk, where the data decides
    downloadable: bool = True


def _torchvision_spec(
    title: str, cls: type, layout: Callable[[type], str], info: DataInfo, padding: int = 4
) -> _Spec:
    """A torchvision data set: downloadable, random crop (zero padding) and flip."""
    return _Spec(title, info, _torchvision(cls), layout(cls), _FETCH,
                 _crop_flip(info.image_size, padding))  # fmt: skip


_SPECS: dict[str, _Spec] = {
    "cifar10": _torchvision_spec(
        "CIFAR-10",
        tvd.CIFAR10,
        _cifar_layout,
        DataInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    ),
    "cifar100": _torchvision_spec(
        "CIFAR-100",
        tvd.CIFAR100,
        _cifar_layout,
        DataInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    ),
    "fashion_mnist": _torchvision_spec(
        "Fashion-MNIST",
        tvd.FashionMNIST,
        _mnist_layout,
        DataInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
        padding=2,
    ),
    "tiny_imagenet": _Spec(
        title="Tiny ImageNet",
        # the data set's own statistics
        info=DataInfo(
            "tiny_imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
        ),
        load=lambda root, train, transform, _download: TinyImageNet(root, train, transform),
        layout=f"{{root}}/{TINY_IMAGENET_FOLDER}/wnids.txt, train/<wnid>/images/*.JPEG, "
        "val/images/*.JPEG and val/val_annotations.txt (file<TAB>wnid<TAB>x<TAB>y<TAB>w<TAB>h)",
        fetch=f"Download {TINY_IMAGENET_URL} and unzip it into {{root}} (giving {{root}}/"
        f"{TINY_IMAGENET_FOLDER}/), or pass --data-root to point at it",
        train_aug=_crop_flip(64, 4),
        count_classes=lambda root: len(read_wnids(tiny_imagenet_folder(root))),
        downloadable=False,
    ),
    "imagefolder": _Spec(
        title="ImageFolder data set",
        info=DataInfo("imagefolder", 0, 3, 224, _IMAGENET_MEAN, _IMAGENET_STD),
        load=lambda root, train, transform, _download: _image_folder(root, train, transform),
        layout="{root}/train/<class>/<image> and {root}/val/<class>/<image> (or test/ for val/)",
        fetch="Pass --data-root to point at a folder in this layout (there is nothing to download)",
        train_aug=lambda: [T.RandomResizedCrop(224), T.RandomHorizontalFlip()],
        test_prep=lambda: [T.Resize(256), T.CenterCrop(224)],
        count_classes=lambda root: len(find_classes(root / "train")[0]),
        downloadable=False,
    ),
}

DATASETS: tuple[str, ...] = tuple(_SPECS)
_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
}


def _spec(name: str) -> _Spec:
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _SPECS[key]


@contextlib.contextmanager
def _data_errors(spec: _Spec, root: Path, download: bool) -> Iterator[None]:
    """Turn whatever the readers raise into a DataError that says what to put where."""
    try:
        yield
    except _LOAD_ERRORS as e:
        how = "downloading it failed" if download else "it is missing or incomplete"
        raise DataError(
            f"{spec.title} could not be loaded from {root}: {how} ({type(e).__name__}: {e}).\n"
            f"Expected {spec.layout.format(root=root)}.\n"
            f"{spec.fetch.format(root=root)}."
        ) from e


def dataset_info(name: str, root: str | Path | None = None) -> DataInfo:
    """Classes, channels, image size and normalization of data set `name` (aliases such as
    "fmnist", "cifar-10", "tiny-imagenet" are accepted, in any case).

    For "imagefolder" the number of classes is that of class folders in `root/train`, so
    `root` is required; for "tiny_imagenet" it is read from `wnids.txt` when `root` is given,
    else 200. Raises ValueError for an unknown name, DataError if the folder is missing.
    """
    spec = _spec(name)
    if spec.count_classes is None or root is None:
        if spec.info.num_classes == 0:
            raise ValueError(f"{name!r}: the number of classes comes from the data; pass root")
        return spec.info
    root = Path(root).expanduser()
    with _data_errors(spec, root, download=False):
        return dataclasses.replace(spec.info, num_classes=spec.count_classes(root))


def build_datasets(
    name: str, root: str | Path, *, download: bool = False, augment: bool = True
) -> tuple[Dataset, Dataset, DataInfo]:
    """The (train, test, info) of data set `name` stored under `root`.

    Training images get the usual augmentation, then every image is converted to a tensor and
    normalized with the data set's mean and std:

    - cifar10 / cifar100: RandomCrop(32, padding=4) and RandomHorizontalFlip;
    - fashion_mnist: RandomCrop(28, padding=2) and RandomHorizontalFlip (flipped clothes are
      still the same garment);
    - tiny_imagenet: RandomCrop(64, padding=4) and RandomHorizontalFlip; the labelled val split
      is the test set;
    - imagefolder (`root/train/<class>/*`, `root/val/<class>/*` or `root/test/<class>/*`):
      RandomResizedCrop(224) and RandomHorizontalFlip for training, Resize(256) and
      CenterCrop(224) for testing, ImageNet mean and std.

    `augment=False` gives the training set the test transform. `download=True` lets torchvision
    fetch CIFAR and Fashion-MNIST; Tiny ImageNet and ImageFolder data must be put in place by
    hand. Raises DataError, naming the files expected, if the data are missing or malformed.
    """
    spec = _spec(name)
    root = Path(root).expanduser()
    if download and not spec.downloadable:
        raise DataError(
            f"{spec.title} cannot be downloaded by this tool.\n{spec.fetch.format(root=root)}.\n"
            f"Expected {spec.layout.format(root=root)}."
        )
    normalize = [T.ToTensor(), T.Normalize(spec.info.mean, spec.info.std)]
    test_tf = T.Compose(spec.test_prep() + normalize)
    train_tf = T.Compose(spec.train_aug() + normalize) if augment else test_tf
    with _data_errors(spec, root, download):
        train = spec.load(root, True, train_tf, download)
        test = spec.load(root, False, test_tf, False)  # the first call downloaded everything
    if list(train.classes) != list(test.classes):
        raise DataError(
            f"{spec.title} under {root}: the train and test classes differ, so their labels "
            f"would not match:\n  train: {train.classes}\n  test:  {test.classes}"
        )
    return train, test, dataclasses.replace(spec.info, num_classes=len(train.classes))


def _subset(dataset: Dataset, size: int | None, seed: int, what: str) -> Dataset:
    if not size:
        return dataset
    if not 0 < size <= len(dataset):
        raise ValueError(f"{what} subset={size} must be between 1 and the {len(dataset)} images")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, order[:size].tolist())


def make_loaders(
    name: str,
    root: str | Path,
    *,
    batch_size: int = 128,
    test_batch_size: int = 512,
    workers: int = 0,
    download: bool = False,
    subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    distributed: bool = False,
    augment: bool = True,
) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Training and test DataLoaders, and the DataInfo, of data set `name` (see
    `build_datasets` for the transforms and errors).

    `subset` / `test_subset` keep a random, `seed`-determined selection of that many training /
    test images (None or 0 keeps all). The training loader reshuffles every epoch in an order
    fixed by `seed`, and drops the last incomplete batch.

    With `distributed=True` (needs an initialized torch.distributed process group) each process
    gets its share through a DistributedSampler: the training one shuffles with `seed` and
    drops the remainder; call `train_loader.sampler.set_epoch(epoch)` at the start of every
    epoch, or every epoch repeats the same order. The test sampler does not shuffle, and pads
    with repeated images so that every process gets as many.
    """
    train, test, info = build_datasets(name, root, download=download, augment=augment)
    train = _subset(train, subset, seed, "training")
    test = _subset(test, test_subset, seed, "test")
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": workers > 0,
    }
    if distributed:
        train_sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=True)
        test_sampler = DistributedSampler(test, shuffle=False)
        per_process = len(train_sampler)
        shuffle = {"sampler": train_sampler}
    else:
        test_sampler, per_process = None, len(train)
        shuffle = {"shuffle": True, "generator": torch.Generator().manual_seed(seed)}
    if batch_size > per_process:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {per_process} training images"
            f"{' per process' if distributed else ''}, so no batch would be complete; "
            "use a smaller batch size or a larger subset"
        )
    train_loader = DataLoader(train, batch_size, drop_last=True, **shuffle, **common)
    test_loader = DataLoader(test, test_batch_size, sampler=test_sampler, **common)
    return train_loader, test_loader, info
