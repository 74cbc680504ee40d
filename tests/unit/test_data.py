"""Datasets: IDX parsing, the Fashion-MNIST search order, synthetic data, clear errors when data is missing."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from smoothadv import SmoothAdvError, data


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_data_root_in_torchvision_layout(tmp_path, monkeypatch) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.array([7, 0, 9]))
    monkeypatch.setattr(data, "_debian_fashion_dir", lambda: None)
    ds = data.get_dataset("fashion_mnist", "test", tmp_path)
    assert len(ds) == 3
    x, y = ds[2]
    assert y == 9 and x.shape == (1, 28, 28)
    assert float(x[0, 0, 5]) == pytest.approx(((2 * 784 + 5) % 256) / 255)


def test_truncated_idx_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "t.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(SmoothAdvError, match="truncated"):
        data.read_idx(path)


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data, "_debian_fashion_dir", lambda: None)
    with pytest.raises(SmoothAdvError, match="apt-get install dataset-fashion-mnist") as info:
        data.load_fashion_mnist("test", tmp_path, download=False)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_missing_imagenet_and_cifar_are_one_line_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    with pytest.raises(SmoothAdvError, match="IMAGENET_DIR"):
        data.get_dataset("imagenet", "test", tmp_path)
    with pytest.raises(SmoothAdvError, match="cifar-10-batches-py"):
        data.get_dataset("cifar10", "test", tmp_path, download=False)


def test_imagenet_folder_layout_and_cohen_transforms(tmp_path, monkeypatch) -> None:
    from PIL import Image

    for label in ("n01", "n02"):
        folder = tmp_path / "val" / label
        folder.mkdir(parents=True)
        Image.fromarray(np.full((300, 400, 3), 200 if label == "n02" else 10, dtype=np.uint8)).save(folder / "a.png")
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    ds = data.get_dataset("imagenet", "test")
    x, y = ds[1]
    assert y == 1 and x.shape == (3, 224, 224) and float(x.mean()) == pytest.approx(200 / 255, abs=1e-6)


def test_cifar10_reads_torchvision_layout(tmp_path, monkeypatch) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    arrays = np.zeros((2, 3072), dtype=np.uint8)
    arrays[1, :1024] = 255  # red channel of the second image
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": arrays, "labels": [3, 5]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle)
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)  # hand-made batch, not the real one
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    ds = data.get_dataset("cifar10", "test", tmp_path, download=False)
    x, y = ds[1]
    assert y == 5 and float(x[0].mean()) == 1.0 and float(x[1:].max()) == 0.0


def test_synthetic_is_deterministic_and_learnable() -> None:
    a, b = data.make_synthetic("train"), data.make_synthetic("train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert len(a) == 512 and len(data.make_synthetic("test")) == 128
    assert sorted(a.labels.bincount().tolist()) == [128] * 4
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1


def test_npz_dataset_format(tmp_path) -> None:
    path = tmp_path / "extra.npz"
    np.savez(path, images=np.full((5, 8, 8, 3), 255, dtype=np.uint8), labels=np.arange(5) % 4)
    ds = data.NpzDataset(path, (3, 8, 8))
    x, y = ds[3]
    assert x.shape == (3, 8, 8) and float(x.min()) == 1.0 and y == 3
    with pytest.raises(SmoothAdvError, match="shape"):
        data.NpzDataset(path, (1, 28, 28))


@pytest.mark.skipif(data._debian_fashion_dir() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SMOOTHADV_DATA", str(tmp_path))
    ds = data.get_dataset("fashion_mnist", "test")
    assert len(ds) == 10_000 and torch.bincount(ds.labels).tolist() == [1000] * 10


# ------------------------------------------------------------------ the dataset registry

# The constants of the five parallel dicts the registry replaced (_NUM_CLASSES, _STATS, _INPUT_SHAPES, DEFAULT_ARCH).
OLD_CONSTANTS = {
    "fashion_mnist": (10, (0.2860,), (0.3530,), (1, 28, 28), "fashion_cnn"),
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), (3, 32, 32), "cifar_resnet110"),
    "imagenet": (1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 224, 224), "resnet50"),
    "synthetic": (4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (3, 8, 8), "toy_cnn"),
    "imagenet32": (1000, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), (3, 32, 32), "imagenet32_resnet110"),
}


@pytest.mark.parametrize("name", list(OLD_CONSTANTS))
def test_registry_entries_hold_the_old_constants(name: str) -> None:
    classes, mean, std, shape, arch = OLD_CONSTANTS[name]
    info = data.DATASETS[name]
    assert (info.name, info.num_classes, info.mean, info.std, info.input_shape, info.default_arch) == (
        name, classes, mean, std, shape, arch)
    assert data.num_classes(name) == classes and data.dataset_stats(name) == (mean, std)
    assert data.input_shape(name) == shape and data.dataset_info(name) is info


def test_registry_names_and_loadability() -> None:
    assert set(data.DATASETS) == set(OLD_CONSTANTS)
    assert data.dataset_names() == ("fashion_mnist", "cifar10", "imagenet", "synthetic")
    assert [name for name, info in data.DATASETS.items() if not info.loadable] == ["imagenet32"]


def test_every_default_architecture_is_registered_for_images_of_that_shape() -> None:
    from smoothadv.archs import ARCHITECTURES

    for name, info in data.DATASETS.items():
        arch = ARCHITECTURES[info.default_arch]
        assert data.input_shape(arch.dataset) == info.input_shape, name


def test_unloadable_and_unknown_datasets_are_one_line_errors() -> None:
    with pytest.raises(SmoothAdvError, match="'imagenet32' cannot be loaded") as info:
        data.get_dataset("imagenet32", "test")
    assert "\n" not in str(info.value)
    for call in (lambda: data.get_dataset("mnist_nope", "test"), lambda: data.num_classes("mnist_nope"),
                 lambda: data.dataset_info("mnist_nope")):
        with pytest.raises(SmoothAdvError, match="unknown dataset 'mnist_nope'; choose one of fashion_mnist, cifar10"):
            call()
    with pytest.raises(SmoothAdvError, match="unknown split"):
        data.get_dataset("synthetic", "validation")  # type: ignore[arg-type]


def test_get_dataset_calls_the_registered_loader() -> None:
    x, y = data.get_dataset("synthetic", "test")[5]
    reference = data.make_synthetic("test")
    assert torch.equal(x, reference[5][0]) and y == reference[5][1] and len(reference) == 128


def test_dataset_info_rejects_inconsistent_facts() -> None:
    with pytest.raises(ValueError, match="disagree"):
        data.DatasetInfo("bad", 10, (0.5,), (0.5, 0.5), (1, 28, 28), "lenet", None)
    with pytest.raises(ValueError, match="num_classes"):
        data.DatasetInfo("bad", 1, (0.5,), (0.5,), (1, 28, 28), "lenet", None)
