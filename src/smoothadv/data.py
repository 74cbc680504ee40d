"""Datasets: Fashion-MNIST (the embedded real default), CIFAR-10, ImageNet, and a synthetic toy set.

Every dataset yields `(image, label)` with `image` a float tensor (C, H, W) in [0, 1]: the
normalization is the model's first layer, never a data transform.

Where data is looked for, in order:
- Fashion-MNIST: the data root (`--data-dir`, else `$SMOOTHADV_DATA`, else `./data`) in
  torchvision's layout (`<root>/FashionMNIST/raw/*-ubyte[.gz]`), then the IDX files of the Debian
  package `dataset-fashion-mnist` (located with `dpkg -L`), then a torchvision download into the
  data root when the machine is online.
- CIFAR-10: `<root>/cifar-10-batches-py` (torchvision layout), else a torchvision download.
- ImageNet: `$IMAGENET_DIR/{train,val}`, else `<root>/imagenet/{train,val}`, as class folders
  (ImageFolder); Cohen et al.'s transforms.
- synthetic: generated deterministically in memory (4 classes of 3x8x8 images).

Every fact about a dataset (classes, normalization statistics, image shape, default architecture,
loader) sits in its `DatasetInfo` entry of the registry `DATASETS`; `num_classes`, `dataset_stats`,
`input_shape` and `get_dataset` read it, and `dataset_names()` lists the loadable ones.

Batching (`batches`, `num_batches`, `subset`) is here too: in-memory sets are sliced directly, and under
torchrun each rank takes its disjoint share of every global batch (`distributed.shard_order`).
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .distributed import shard_order
from .errors import SmoothAdvError
from .settings import register_names

__all__ = [
    "DATASETS", "DatasetInfo", "FASHION_FILES", "Loader", "NpzDataset", "PathArg", "Split", "TensorImageDataset",
    "batches", "check_data_dir", "data_root", "dataset_info", "dataset_names", "dataset_stats", "fashion_mnist_dirs",
    "get_dataset", "imagenet_dir", "input_shape", "load_cifar10", "load_fashion_mnist", "load_imagenet",
    "make_synthetic", "num_batches", "num_classes", "read_idx", "subset",
]

Split = Literal["train", "test"]

PathArg = str | os.PathLike[str] | None
Loader = Callable[[Split, PathArg, bool, bool], Dataset]
"""A dataset loader: `(split, data_dir, download, augment) -> Dataset` of (float [0, 1] image, int label)."""


@dataclass(frozen=True)
class DatasetInfo:
    """Everything smoothadv knows about one dataset; `DATASETS` holds one per name.

    Attributes:
        name: the registry key, also recorded in checkpoints (`dataset`).
        num_classes: number of classes (labels are 0 .. num_classes - 1).
        mean, std: per-channel statistics of the normalization layer of models trained on it
            (recorded in each checkpoint).
        input_shape: shape (C, H, W) of one image.
        default_arch: the architecture `train` uses when none is given (an `archs.ARCHITECTURES` key).
        loader: loads a split, or None for a dataset known only as the training data of released
            checkpoints (its classes and statistics are needed to load them, its images are not).

    Construction checks that mean, std and the image channels agree and that there are >= 2 classes.
    """

    name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_shape: tuple[int, int, int]
    default_arch: str
    loader: Loader | None

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"dataset {self.name!r}: num_classes must be >= 2, got {self.num_classes}")
        if len(self.input_shape) != 3 or not len(self.mean) == len(self.std) == self.input_shape[0]:
            raise ValueError(f"dataset {self.name!r}: mean, std and input_shape (C, H, W) disagree on the channels")

    @property
    def loadable(self) -> bool:
        """Whether `get_dataset` can load it (it has a loader)."""
        return self.loader is not None


FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Split -> (images, labels) IDX file names of Fashion-MNIST (`load_fashion_mnist` looks for them, or `.gz`)."""


def dataset_info(name: str) -> DatasetInfo:
    """The registry entry `DATASETS[name]`; an unknown name is a one-line SmoothAdvError listing the loadable ones."""
    info = DATASETS.get(name)
    if info is None:
        raise SmoothAdvError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return info


def dataset_names() -> tuple[str, ...]:
    """Names of the datasets `get_dataset` can load, in registry order (the CLI's `--dataset` choices)."""
    return tuple(name for name, info in DATASETS.items() if info.loadable)


register_names("dataset", dataset_names)


def num_classes(name: str) -> int:
    """Number of classes of a dataset (`DATASETS[name].num_classes`)."""
    return dataset_info(name).num_classes


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) used by the normalization layer of models trained on `name`."""
    info = dataset_info(name)
    return info.mean, info.std


def input_shape(name: str) -> tuple[int, int, int]:
    """Shape (C, H, W) of one image of the dataset (`DATASETS[name].input_shape`)."""
    return dataset_info(name).input_shape


def check_data_dir(data_dir: str | os.PathLike[str] | None) -> None:
    """Raise SmoothAdvError unless `data_dir` is None (the default root) or an existing directory.

    A data root given explicitly is never silently replaced by another copy of the data (such as
    Debian's): a mistyped `--data-dir` is an error, not a fallback recorded under a bogus path.
    """
    if data_dir is None:
        return
    path = Path(data_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise SmoothAdvError(f"the data directory {path} (--data-dir) {what}; give the folder that holds the data "
                             "(create it first to download into it)")


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: `data_dir`, else `$SMOOTHADV_DATA`, else `./data` (the only default path)."""
    if data_dir is not None:
        return Path(data_dir)
    return Path(os.environ.get("SMOOTHADV_DATA", "data"))


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 (N, C, H, W) or float tensors; yields float [0, 1] images."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if len(images) != len(labels):
            raise SmoothAdvError("images and labels have different lengths")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        return image, int(self.labels[index])


# ------------------------------------------------------------------ Fashion-MNIST (IDX files)

def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a NumPy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as exc:
        raise SmoothAdvError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SmoothAdvError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != expected:
        raise SmoothAdvError(f"{path} is truncated or corrupt: expected {expected} values, found {data.size}")
    return data.reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _debian_fashion_dir() -> Path | None:
    """The directory of the Debian package dataset-fashion-mnist's IDX files, asked of dpkg."""
    if shutil.which("dpkg") is None:
        return None
    try:
        listing = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True,
                                 timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if listing.returncode != 0:
        return None
    for line in listing.stdout.splitlines():
        if line.endswith("t10k-images-idx3-ubyte.gz") or line.endswith("t10k-images-idx3-ubyte"):
            return Path(line).parent
    return None


def fashion_mnist_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Directories searched for Fashion-MNIST's IDX files, in order."""
    root = data_root(data_dir)
    dirs = [root / "FashionMNIST" / "raw", root / "fashion_mnist", root]
    debian = _debian_fashion_dir()
    if debian is not None:
        dirs.append(debian)
    return dirs


def load_fashion_mnist(split: Split, data_dir: str | os.PathLike[str] | None = None,
                       download: bool = True) -> TensorImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train / 10,000 test 1x28x28 images, 10 classes."""
    image_stem, label_stem = FASHION_FILES[split]
    searched = fashion_mnist_dirs(data_dir)
    for directory in searched:
        images_path, labels_path = _find_idx(directory, image_stem), _find_idx(directory, label_stem)
        if images_path and labels_path:
            images = torch.from_numpy(read_idx(images_path).copy()).unsqueeze(1)
            labels = torch.from_numpy(read_idx(labels_path).astype(np.int64))
            return TensorImageDataset(images, labels)
    if download:
        root = data_root(data_dir)
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=(split == "train"), download=True)
        except Exception:  # offline, or the mirror failed: report where we looked instead
            pass
        else:
            return load_fashion_mnist(split, data_dir, download=False)
    where = ", ".join(str(d) for d in searched)
    raise SmoothAdvError(
        f"Fashion-MNIST {split} files not found (looked in {where}; download failed or offline): "
        "install them with `sudo apt-get install dataset-fashion-mnist`, or put the IDX files under "
        "<data-dir>/FashionMNIST/raw/"
    )


# ------------------------------------------------------------------ CIFAR-10 and ImageNet

def load_cifar10(split: Split, data_dir: str | os.PathLike[str] | None = None, download: bool = True,
                 augment: bool = False) -> Dataset:
    """CIFAR-10 in torchvision's layout; training augmentation (crop 32 pad 4, flip) as in Cohen et al."""
    from torchvision import datasets, transforms

    root = data_root(data_dir)
    ops: list = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    transform = transforms.Compose([*ops, transforms.ToTensor()])
    present = (root / "cifar-10-batches-py").is_dir()
    try:
        return datasets.CIFAR10(str(root), train=(split == "train"), download=download and not present,
                                transform=transform)
    except Exception as exc:
        raise SmoothAdvError(
            f"CIFAR-10 not found under {root / 'cifar-10-batches-py'} and could not be downloaded "
            f"({type(exc).__name__}); pass --data-dir pointing at a folder that holds cifar-10-batches-py"
        ) from None


def imagenet_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """ImageNet root: `$IMAGENET_DIR` (Cohen et al.'s convention), else `<data root>/imagenet`."""
    env = os.environ.get("IMAGENET_DIR")
    if env and data_dir is None:
        return Path(env)
    return data_root(data_dir) / "imagenet"


def load_imagenet(split: Split, data_dir: str | os.PathLike[str] | None = None, augment: bool = False) -> Dataset:
    """ImageNet as class folders `<root>/{train,val}` with Cohen et al.'s transforms.

    Train (augment): RandomResizedCrop(224) + flip; test: Resize(256) + CenterCrop(224).
    """
    from torchvision import datasets, transforms

    folder = imagenet_dir(data_dir) / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise SmoothAdvError(
            f"ImageNet {split} folder not found at {folder}: set IMAGENET_DIR to a folder with train/ and "
            "val/ class subfolders (val reorganised into class folders)"
        )
    if augment:
        ops = [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip()]
    else:
        ops = [transforms.Resize(256), transforms.CenterCrop(224)]
    return datasets.ImageFolder(str(folder), transforms.Compose([*ops, transforms.ToTensor()]))


# ------------------------------------------------------------------ synthetic

def make_synthetic(split: Split, size: int | None = None, seed: int = 0) -> TensorImageDataset:
    """A deterministic 4-class dataset of 3x8x8 images for fast tests.

    Each class is a fixed random template in [0.2, 0.8]; an image is its class template plus
    N(0, 0.1^2) pixel noise, clamped to [0, 1]. Train has 512 images, test 128 (by default).
    """
    count = size if size is not None else (512 if split == "train" else 128)
    templates = torch.rand((4, 3, 8, 8), generator=torch.Generator().manual_seed(1234)) * 0.6 + 0.2
    gen = torch.Generator().manual_seed(seed + (0 if split == "train" else 10_000))
    labels = torch.arange(count) % 4
    labels = labels[torch.randperm(count, generator=gen)]
    images = (templates[labels] + 0.1 * torch.randn((count, 3, 8, 8), generator=gen)).clamp_(0, 1)
    return TensorImageDataset(images, labels)


# ------------------------------------------------------------------ the registry

def _fashion_mnist_loader(split: Split, data_dir: PathArg, download: bool, augment: bool) -> Dataset:
    return load_fashion_mnist(split, data_dir, download)  # no augmentation for Fashion-MNIST


def _cifar10_loader(split: Split, data_dir: PathArg, download: bool, augment: bool) -> Dataset:
    return load_cifar10(split, data_dir, download, augment)


def _imagenet_loader(split: Split, data_dir: PathArg, download: bool, augment: bool) -> Dataset:
    return load_imagenet(split, data_dir, augment)  # never downloaded


def _synthetic_loader(split: Split, data_dir: PathArg, download: bool, augment: bool) -> Dataset:
    return make_synthetic(split)  # generated in memory


# CIFAR-10 (and ImageNet32, Salman et al.'s pretraining data for CIFAR-10) keep Cohen et al.'s constants because
# released checkpoints were trained with them (CIFAR-10's true pixel std is about 0.247/0.243/0.262).
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in (
    DatasetInfo("fashion_mnist", 10, (0.2860,), (0.3530,), (1, 28, 28), "fashion_cnn", _fashion_mnist_loader),
    DatasetInfo("cifar10", 10, _CIFAR_MEAN, _CIFAR_STD, (3, 32, 32), "cifar_resnet110", _cifar10_loader),
    DatasetInfo("imagenet", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 224, 224), "resnet50",
                _imagenet_loader),
    DatasetInfo("synthetic", 4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 8, 8), "toy_cnn", _synthetic_loader),
    DatasetInfo("imagenet32", 1000, _CIFAR_MEAN, _CIFAR_STD, (3, 32, 32), "imagenet32_resnet110", None),
)}
"""Dataset name -> DatasetInfo. Loadable ones first (in `dataset_names()` order); `imagenet32` (downsampled
ImageNet, Salman et al.'s pretraining data) is known only so that their `imagenet32_resnet110` checkpoints load."""


def get_dataset(name: str, split: Split, data_dir: str | os.PathLike[str] | None = None,
                augment: bool = False, download: bool = True) -> Dataset:
    """Load a dataset split by name with its registered loader.

    Raises SmoothAdvError (one line) for an unknown name or split, for a dataset without a loader, for a
    `data_dir` that is not an existing directory (`check_data_dir`), and (saying where it looked) when the
    data is missing.
    """
    info = dataset_info(name)
    check_data_dir(data_dir)
    if split not in ("train", "test"):
        raise SmoothAdvError(f"unknown split {split!r}; choose train or test")
    if info.loader is None:
        raise SmoothAdvError(f"dataset {name!r} cannot be loaded: smoothadv knows its classes and statistics only to "
                             f"read released checkpoints trained on it; choose one of {', '.join(dataset_names())}")
    return info.loader(split, data_dir, download, augment)


class NpzDataset(Dataset):
    """Images and labels from an .npz file: `images` uint8 (N, H, W, C) or (N, C, H, W) or float in
    [0, 1], and `labels` int (N,). The documented format for extra (e.g. pseudo-labelled) data.

    Raises SmoothAdvError for an empty file, non-finite or out-of-range pixels, non-integer or
    non-1-D labels, and (with `classes`) labels outside [0, classes)."""

    def __init__(self, path: str | os.PathLike[str], shape: Sequence[int] | None = None,
                 classes: int | None = None) -> None:
        try:
            with np.load(path, allow_pickle=False) as archive:
                images, labels = archive["images"], archive["labels"]
        except (OSError, KeyError, ValueError) as exc:
            raise SmoothAdvError(f"cannot read {path} as an .npz with arrays 'images' and 'labels': {exc}") from None
        labels = np.asarray(labels)
        if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
            raise SmoothAdvError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} of shape "
                                 f"{labels.shape}")
        if len(labels) == 0:
            raise SmoothAdvError(f"{path} holds no images")
        if labels.min() < 0 or (classes is not None and labels.max() >= classes):
            bound = f"[0, {classes})" if classes is not None else ">= 0"
            raise SmoothAdvError(f"{path}: labels must be in {bound}, found {labels.min()}..{labels.max()}")
        if images.dtype.kind not in "biuf":
            raise SmoothAdvError(f"{path}: images must be numeric, got dtype {images.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(images))
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(1)
        if shape is not None and tensor.shape[1:] != tuple(shape) and tensor.shape[-1] == shape[0]:
            tensor = tensor.permute(0, 3, 1, 2).contiguous()
        if shape is not None and tuple(tensor.shape[1:]) != tuple(shape):
            raise SmoothAdvError(f"{path}: images have shape {tuple(tensor.shape[1:])}, expected {tuple(shape)}")
        if tensor.dtype != torch.uint8:
            tensor = tensor.float()
            if not bool(torch.isfinite(tensor).all()):
                raise SmoothAdvError(f"{path}: images contain NaN or Inf values")
            if tensor.numel() and (float(tensor.min()) < 0 or float(tensor.max()) > 1):
                raise SmoothAdvError(f"{path}: float images must be in [0, 1]")
        self.inner = TensorImageDataset(tensor, torch.from_numpy(np.asarray(labels, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.inner[index]


# ------------------------------------------------------------------ batches


def subset(dataset: Dataset, count: int | None) -> Dataset:
    """The first `count` examples of `dataset` (all of it when `count` is None or not smaller than it)."""
    if count is None or count >= len(dataset):  # type: ignore[arg-type]
        return dataset
    if count < 1:
        raise SmoothAdvError(f"subset size must be >= 1, got {count}")
    return Subset(dataset, list(range(count)))


def _tensor_source(dataset: Dataset) -> tuple[TensorImageDataset, Tensor] | None:
    if isinstance(dataset, TensorImageDataset):
        return dataset, torch.arange(len(dataset))
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, TensorImageDataset):
        return dataset.dataset, torch.as_tensor(dataset.indices)
    if isinstance(dataset, NpzDataset):
        return dataset.inner, torch.arange(len(dataset))
    return None


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
            workers: int = 0, rank: int = 0, world: int = 1, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
    """Yield (images, labels) batches; in-memory datasets are sliced directly (no per-item Python).

    With `world` > 1 (torchrun), `batch_size` is the global batch and this yields rank `rank`'s
    disjoint share of each global batch of the same shuffled order (`distributed.shard_order`).
    With `with_index`, (images, labels, indices) with each example's position in the dataset (in
    the underlying dataset for a `Subset`), for objectives that look up per-example data (CAT-RS).
    """
    source = _tensor_source(dataset)
    if source is not None:
        inner, index = source
        if shuffle:
            index = index[torch.randperm(len(index), generator=generator)]
        for chunk in shard_order(index, batch_size, rank, world):
            images = inner.images[chunk]
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield (images, inner.labels[chunk], chunk) if with_index else (images, inner.labels[chunk])
        return
    size = len(dataset)  # type: ignore[arg-type]
    order = torch.randperm(size, generator=generator) if shuffle else torch.arange(size)
    plan = [chunk.tolist() for chunk in shard_order(order, batch_size, rank, world)]
    positions = dataset.indices if isinstance(dataset, Subset) else None
    for rows, (images, labels) in zip(plan, DataLoader(dataset, batch_sampler=plan, num_workers=workers)):
        if not with_index:
            yield images, labels
            continue
        yield images, labels, torch.as_tensor([positions[i] for i in rows] if positions is not None else rows)


def num_batches(dataset: Dataset, batch_size: int) -> int:
    """Batches of `batch_size` in one pass over `dataset` (the last one may be smaller)."""
    return math.ceil(len(dataset) / batch_size)  # type: ignore[arg-type]
