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
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .errors import SmoothAdvError

Split = Literal["train", "test"]

DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "imagenet", "synthetic")

_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "imagenet": 1000, "imagenet32": 1000, "synthetic": 4}

# Channel statistics recorded in each checkpoint. CIFAR-10 keeps Cohen et al.'s constants because
# released checkpoints were trained with them (the dataset's true pixel std is about 0.247/0.243/0.262).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet32": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}

_INPUT_SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32), "imagenet32": (3, 32, 32),
                 "imagenet": (3, 224, 224), "synthetic": (3, 8, 8)}

DEFAULT_ARCH = {"fashion_mnist": "fashion_cnn", "cifar10": "cifar_resnet110", "imagenet": "resnet50",
                "synthetic": "toy_cnn"}

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _check_name(name: str) -> None:
    if name not in _NUM_CLASSES:
        raise SmoothAdvError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def num_classes(name: str) -> int:
    """Number of classes of a dataset."""
    _check_name(name)
    return _NUM_CLASSES[name]


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) used by the normalization layer of models trained on `name`."""
    _check_name(name)
    return _STATS[name]


def input_shape(name: str) -> tuple[int, int, int]:
    """Shape (C, H, W) of one image of the dataset."""
    _check_name(name)
    return _INPUT_SHAPES[name]  # type: ignore[return-value]


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


def get_dataset(name: str, split: Split, data_dir: str | os.PathLike[str] | None = None,
                augment: bool = False, download: bool = True) -> Dataset:
    """Load a dataset split by name. Raises SmoothAdvError (one line, where it looked) if it is missing."""
    _check_name(name)
    if split not in ("train", "test"):
        raise SmoothAdvError(f"unknown split {split!r}; choose train or test")
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir, download)
    if name == "cifar10":
        return load_cifar10(split, data_dir, download, augment)
    if name == "imagenet":
        return load_imagenet(split, data_dir, augment)
    if name == "synthetic":
        return make_synthetic(split)
    raise SmoothAdvError(f"dataset {name!r} has no loader")  # imagenet32: pretraining data, bring your own


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
