"""Checkpoints of a researcher's own model: one call to save it, one to load it back into a module they hold.

Written as a researcher's script would: their own CNN with their own normalization, their own class count,
no registry entry, no dataset name; every mismatch is one line that says what differs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from smoothadv import SmoothAdvError, build_model, load_checkpoint, load_weights, save_checkpoint
from smoothadv.data import input_shape
from smoothadv.models import normalization_spec


class MyNet(nn.Module):
    """A researcher's 5-class CNN on 3x8x8 inputs with its own normalization inside."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - self.mean))


def _trained(seed: int = 0) -> MyNet:
    torch.manual_seed(seed)
    net = MyNet()
    net.features[1].running_mean.uniform_()  # state that is not a parameter round-trips too
    return net.eval()


def test_own_module_round_trips_in_one_call_each(tmp_path) -> None:
    net = _trained()
    save_checkpoint(tmp_path / "mine.pt", net, sigma=0.25, epoch=7)
    fresh = MyNet()
    meta = load_weights(tmp_path / "mine.pt", fresh)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), net(x))
    assert meta["arch"] == "custom" and meta["num_classes"] == 5 and meta["sigma"] == 0.25 and meta["epoch"] == 7
    assert meta["weights_verified"] and meta["dataset"] is None and meta["module"].endswith("MyNet")
    assert "state_dict" not in meta

    other = MyNet()
    other.train()
    model, meta2 = load_checkpoint(tmp_path / "mine.pt", model=other)
    assert model is other and not model.training  # load_checkpoint returns the model in eval mode
    torch.testing.assert_close(model(x), net(x))
    assert meta2["num_classes"] == 5


def test_load_weights_keeps_the_module_mode_and_device(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained())
    fresh = MyNet().train()
    load_weights(tmp_path / "mine.pt", fresh)
    assert fresh.training  # as module.load_state_dict
    assert fresh.head.weight.device.type == "cpu"


def test_a_named_arch_and_explicit_fields_are_recorded(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained(), arch="my_net", num_classes=5, dataset="my_images",
                    normalization={"kind": "normalize", "mean": [0.5, 0.4, 0.3], "std": [1.0, 1.0, 1.0]})
    meta = load_weights(tmp_path / "mine.pt", MyNet())
    assert meta["arch"] == "my_net" and meta["dataset"] == "my_images" and meta["normalization"]["kind"] == "normalize"


def test_an_unregistered_arch_without_a_module_says_how_to_load_it(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained(), arch="my_net")
    with pytest.raises(SmoothAdvError, match=r"not registered.*model=module.*load_weights") as info:
        load_checkpoint(tmp_path / "mine.pt")
    assert "MyNet" in str(info.value) and "\n" not in str(info.value) and "missing" not in str(info.value)


def test_wrong_keys_are_named(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained())
    other = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    with pytest.raises(SmoothAdvError, match=r"do not fit the Sequential given: missing in the file \['1\.weight', "
                                             r"'1\.bias'\]; not in the module \['mean', 'features\.0\.weight'") as info:
        load_weights(tmp_path / "mine.pt", other)
    assert "\n" not in str(info.value)


def test_wrong_class_count_names_both_counts(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained())
    with pytest.raises(SmoothAdvError, match=r"holds a 5-class model but the module has 10 outputs"):
        load_weights(tmp_path / "mine.pt", MyNet(classes=10))
    with pytest.raises(SmoothAdvError, match="num_classes must be an integer >= 2"):
        save_checkpoint(tmp_path / "bad.pt", _trained(), num_classes=1)


def test_flipped_weight_bytes_are_refused(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained())
    payload = torch.load(tmp_path / "mine.pt", weights_only=True)
    payload["state_dict"]["head.bias"][0] += 1.0
    torch.save(payload, tmp_path / "mine.pt")
    with pytest.raises(SmoothAdvError, match="corrupt"):
        load_weights(tmp_path / "mine.pt", MyNet())


def test_class_count_is_the_model_s_not_the_dataset_s(tmp_path) -> None:
    """A 5-class registered network fine-tuned from a 10-class dataset is recorded with its 5 classes."""
    model = build_model("toy_cnn", "synthetic", classes=5)
    save_checkpoint(tmp_path / "toy.pt", model, arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.1)
    loaded, meta = load_checkpoint(tmp_path / "toy.pt")
    assert meta["num_classes"] == 5
    assert loaded(torch.rand(2, *input_shape("synthetic"))).shape == (2, 5)


def test_registered_network_saved_bare_and_loaded_into_your_instance(tmp_path) -> None:
    torch.manual_seed(3)
    model = build_model("toy_cnn", "synthetic").eval()
    save_checkpoint(tmp_path / "wrapped.pt", model, arch="toy_cnn", dataset="synthetic")
    save_checkpoint(tmp_path / "bare.pt", model[1], arch="toy_cnn")
    loaded, meta = load_checkpoint(tmp_path / "wrapped.pt")
    assert meta["normalization"]["kind"] == "normalize"  # read from the model's own first layer
    bare, bare_meta = load_checkpoint(tmp_path / "bare.pt")
    assert bare_meta["normalization"] == {"kind": "none"}
    for a, b in zip(model[1].state_dict().values(), bare[1].state_dict().values()):
        assert torch.equal(a, b)
    net = build_model("toy_cnn", "synthetic")[1]
    load_weights(tmp_path / "wrapped.pt", net)  # the network alone, from Sequential(norm, net)'s file
    for a, b in zip(model[1].state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(SmoothAdvError, match=r"do not fit registered architecture 'toy_cnn'.*leave arch out"):
        save_checkpoint(tmp_path / "wrong.pt", MyNet(), arch="toy_cnn")
    assert not (tmp_path / "wrong.pt").exists()


def test_a_compiled_or_data_parallel_model_is_saved_and_loaded_as_the_model(tmp_path) -> None:
    net = _trained()
    save_checkpoint(tmp_path / "dp.pt", nn.DataParallel(net))
    assert all(not key.startswith("module.") for key in torch.load(tmp_path / "dp.pt", weights_only=True)["state_dict"])
    wrapped = nn.DataParallel(MyNet())
    load_weights(tmp_path / "dp.pt", wrapped)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(wrapped.module.eval()(x), net(x))


def test_the_module_may_be_given_positionally(tmp_path) -> None:
    save_checkpoint(tmp_path / "mine.pt", _trained())
    module, meta = load_checkpoint(tmp_path / "mine.pt", MyNet())  # type: ignore[call-overload]
    assert isinstance(module, MyNet) and meta["num_classes"] == 5
