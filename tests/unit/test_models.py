"""Normalization layer, checkpoint round trip, Cohen/Salman-format loading and refusal of bad files."""

from __future__ import annotations

import pytest
import torch

from smoothadv import SmoothAdvError, build_model, load_checkpoint, save_checkpoint
from smoothadv.models import Normalize, normalization_spec


def test_normalize_layer_values_buffers_and_state_dict() -> None:
    layer = Normalize([0.5, 0.25], [0.5, 0.25])
    x = torch.tensor([1.0, 0.5]).view(1, 2, 1, 1)
    torch.testing.assert_close(layer(x), torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    assert list(layer.state_dict()) == []  # non-persistent: released state dicts load strictly
    center = Normalize([0.5, 0.25])
    torch.testing.assert_close(center(x), torch.tensor([0.5, 0.25]).view(1, 2, 1, 1))
    assert layer.to(torch.float64).mean.dtype == torch.float64  # buffers follow .to()


def test_round_trip_preserves_predictions_and_metadata(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("fashion_cnn", "fashion_mnist").eval()
    path = tmp_path / "c.pth.tar"
    save_checkpoint(path, model, arch="fashion_cnn", dataset="fashion_mnist",
                    normalization=normalization_spec("fashion_mnist"), sigma=0.25, epoch=3)
    loaded, meta = load_checkpoint(path)
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["arch"] == "fashion_cnn" and meta["dataset"] == "fashion_mnist" and meta["sigma"] == 0.25
    assert meta["epoch"] == 3 and meta["normalization"]["mean"] == [0.2860]
    assert not loaded.training


def _cohen_file(tmp_path, prefix: str):
    torch.manual_seed(1)
    model = build_model("cifar_resnet20", "cifar10").eval()
    state = {prefix + k[2:]: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 90, "arch": "cifar_resnet20", "state_dict": state, "optimizer": {}}, path)
    return model, path


@pytest.mark.parametrize("prefix", ["1.", "1.module."])
def test_cohen_and_salman_checkpoints_load(tmp_path, prefix) -> None:
    model, path = _cohen_file(tmp_path, prefix)
    loaded, meta = load_checkpoint(path, normalization="normalize")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert meta["dataset"] == "cifar10" and meta["sigma"] is None
    centered, _ = load_checkpoint(path, normalization="center")  # Salman's InputCenterLayer: x - mean only
    torch.testing.assert_close(centered[0](x), x - torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))


def test_foreign_checkpoint_requires_a_normalization_choice(tmp_path) -> None:
    _, path = _cohen_file(tmp_path, "1.")
    with pytest.raises(SmoothAdvError, match="--normalization"):
        load_checkpoint(path)


def test_weights_of_another_architecture_are_refused(tmp_path) -> None:
    model = build_model("toy_cnn", "synthetic")
    path = tmp_path / "c.pth.tar"
    save_checkpoint(path, model, arch="toy_cnn", dataset="synthetic", normalization=normalization_spec("synthetic"),
                    sigma=0.1)
    payload = torch.load(path, weights_only=True)
    payload["arch"] = "fashion_cnn"
    torch.save(payload, path)
    with pytest.raises(SmoothAdvError, match="do not fit architecture"):
        load_checkpoint(path)


def test_missing_corrupt_and_truncated_files(tmp_path) -> None:
    with pytest.raises(SmoothAdvError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(SmoothAdvError, match="corrupt|refusing"):
        load_checkpoint(garbage)
    good = tmp_path / "good.pth"
    save_checkpoint(good, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.1)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SmoothAdvError, match="corrupt or truncated"):
        load_checkpoint(truncated)


def test_unknown_architecture_and_dataset() -> None:
    with pytest.raises(SmoothAdvError, match="unknown architecture"):
        build_model("vgg_nope", "cifar10")
    with pytest.raises(SmoothAdvError, match="unknown dataset"):
        build_model("toy_cnn", "mnist_nope")


def test_lenet_shape_parameters_and_names() -> None:
    """LeNet of the certified-training papers: 431,080 parameters, their parameter names, 10 logits."""
    model = build_model("lenet", "fashion_mnist", "none")
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert [name for name, _ in model[1].named_parameters()] == [
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert isinstance(model[0], torch.nn.Identity)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


# ------------------------------------------------------------------ the architecture registry

# The old CLASSIFIER_HEADS, and the old models._FOREIGN_ARCH_DATASET (the dataset of Cohen's/Salman's files).
OLD_HEADS = {"fashion_cnn": "classifier.3", "lenet": "fc2", "toy_cnn": "fc", "cifar_resnet20": "fc",
             "cifar_resnet110": "fc", "imagenet32_resnet110": "fc", "resnet50": "fc"}
OLD_FOREIGN_DATASET = {"cifar_resnet20": "cifar10", "cifar_resnet110": "cifar10", "resnet50": "imagenet",
                       "imagenet32_resnet110": "imagenet32"}


def test_architecture_registry_holds_the_old_facts() -> None:
    from smoothadv.archs import ARCHITECTURES, architecture_names, foreign_names

    assert architecture_names() == tuple(ARCHITECTURES) == tuple(OLD_HEADS)
    assert {name: info.head for name, info in ARCHITECTURES.items()} == OLD_HEADS
    assert {name: info.dataset for name, info in ARCHITECTURES.items() if info.foreign} == OLD_FOREIGN_DATASET
    assert foreign_names() == ("cifar_resnet20", "cifar_resnet110", "imagenet32_resnet110", "resnet50")
    assert all(name == info.name for name, info in ARCHITECTURES.items())


@pytest.mark.parametrize("arch", list(OLD_HEADS))
def test_every_architecture_builds_with_its_head_at_the_registered_path(arch: str) -> None:
    from smoothadv.archs import ARCHITECTURES
    from smoothadv.data import input_shape
    from smoothadv.models import replace_head

    info = ARCHITECTURES[arch]
    model = build_model(arch, info.dataset, classes=7).eval()
    head = model[1]
    for name in info.head.split("."):
        head = head[int(name)] if name.isdigit() else getattr(head, name)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 7
    x = torch.rand(1, *input_shape(info.dataset))
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        replace_head(model, arch, 3)
        assert model(x).shape == (1, 3)


def test_foreign_format_file_of_an_architecture_without_releases_is_refused(tmp_path) -> None:
    path = tmp_path / "checkpoint.pth.tar"
    state = {k[2:]: v for k, v in build_model("toy_cnn", "synthetic").state_dict().items()}
    torch.save({"arch": "toy_cnn", "state_dict": state}, path)
    with pytest.raises(SmoothAdvError, match="'toy_cnn' has no Cohen/Salman-format checkpoints") as info:
        load_checkpoint(path, normalization="normalize")
    assert "cifar_resnet110" in str(info.value) and "\n" not in str(info.value)
