"""Contracts of the checkpoint code (`smoothadv.models`) at their edges: the input normalization's refusals, what a
checkpoint records, which keys a refusal names, how an unsafe or corrupt file is described without being run, what
a trusted conversion keeps, which values count as plain data, multiply-adds in closed form, and the denoiser's
malformed fields. Each test states the behaviour a user sees."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from smoothadv import SmoothAdvError
from smoothadv.models import (
    FORMAT,
    Normalize,
    _bare_pickle_call,
    _foreign_state_dict,
    _plain_data,
    build_model,
    check_arch_fits,
    check_dataset,
    check_sigma,
    convert_trusted_checkpoint,
    load_checkpoint,
    load_weights,
    multiply_adds,
    normalization_spec,
    read_checkpoint,
    save_checkpoint,
    weights_digest,
)


def test_normalize_refuses_an_image_of_other_channels_and_takes_a_single_image() -> None:
    layer = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert torch.equal(layer(torch.full((3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))  # one (C, H, W) image
    with pytest.raises(SmoothAdvError, match="takes 3-channel images .* shape \\(2, 1, 8, 8\\)"):
        layer(torch.zeros(2, 1, 8, 8))  # broadcasting would make it 3 channels
    with pytest.raises(SmoothAdvError, match="shape \\(8, 8\\)"):
        layer(torch.zeros(8, 8))
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(Normalize([0.5, 0.25, 0.125])(x), x - torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1))
    assert repr(Normalize([0.123456], [0.5])) == "Normalize(mean=[0.1235], std=[0.5])"
    assert repr(Normalize([0.123456])) == "Normalize(center, mean=[0.1235])"


def test_an_architecture_of_other_images_is_tried_and_refused_with_the_ones_that_fit() -> None:
    check_arch_fits("lenet", "fashion_mnist")
    check_arch_fits("resnet50", "cifar10")  # pools adaptively: it takes 32x32 images
    with pytest.raises(SmoothAdvError, match=r"'lenet' does not take cifar10 images \(3x32x32; it is built for "
                                             r"fashion_mnist, 1x28x28\): choose --arch cifar_resnet20 or "
                                             r"cifar_resnet110 or imagenet32_resnet110"):
        check_arch_fits("lenet", "cifar10")


def test_the_weights_digest_covers_names_types_shapes_and_values_whatever_their_graph() -> None:
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert weights_digest(dict(net.named_parameters())) == weights_digest(state)  # parameters that need grad
    assert weights_digest({"w": state["weight"]}) != weights_digest({"v": state["weight"]})
    assert weights_digest({"w": state["weight"]}) != weights_digest({"w": state["weight"].reshape(3, 2)})
    assert weights_digest({"w": torch.zeros(2, dtype=torch.int32)}) != weights_digest({"w": torch.zeros(1)})


def test_a_checkpoint_records_its_format_version_normalization_and_class_count(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.pth", build_model("toy_cnn", "synthetic", "center"), arch="toy_cnn",
                    dataset="synthetic")
    payload = read_checkpoint(tmp_path / "c.pth")
    mean = normalization_spec("synthetic")["mean"]
    assert (payload["format"], payload["version"], payload["num_classes"]) == (FORMAT, 1, 4)
    assert payload["normalization"] == {"kind": "center", "mean": mean, "std": [1.0] * len(mean)}
    assert "module" not in payload  # a registered architecture is rebuilt from its name

    class Votes(nn.Module):  # a module of your own without a Linear layer: the dataset says how many classes
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).flatten(1)

    save_checkpoint(tmp_path / "own.pth", Votes(), dataset="synthetic")
    own = read_checkpoint(tmp_path / "own.pth")
    assert own["num_classes"] == 4 and own["module"].endswith("Votes")
    save_checkpoint(tmp_path / "binary.pth", nn.Linear(3, 2))  # two classes are a classifier
    assert read_checkpoint(tmp_path / "binary.pth")["num_classes"] == 2
    binary = nn.Linear(3, 2)
    assert load_weights(tmp_path / "binary.pth", binary)["num_classes"] == 2
    with pytest.raises(SmoothAdvError, match="num_classes must be an integer >= 2, got 1"):
        save_checkpoint(tmp_path / "one.pth", nn.Linear(3, 1))


def test_weights_that_fit_no_registered_architecture_are_refused_naming_the_first_keys(tmp_path: Path) -> None:
    extra = build_model("toy_cnn", "synthetic")
    extra.add_module("2", nn.Linear(1, 1))
    extra.add_module("3", nn.Linear(1, 1))  # four weights too many: the first three named
    with pytest.raises(SmoothAdvError, match=r"first differing keys \['2.bias', '2.weight', '3.bias'\]"):
        save_checkpoint(tmp_path / "x.pth", extra, arch="toy_cnn")
    lacking = nn.Sequential(nn.Identity(), nn.Module())  # every weight missing: the first three named
    with pytest.raises(SmoothAdvError, match=r"first differing keys \['1.conv.bias', '1.conv.weight', '1.fc.bias'\]"):
        save_checkpoint(tmp_path / "y.pth", lacking, arch="toy_cnn")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_an_unsafe_pickle_is_named_by_what_it_would_call_and_never_run(tmp_path: Path) -> None:
    for protocol in (0, 2, 4):
        path = tmp_path / f"evil{protocol}.pkl"
        path.write_bytes(pickle.dumps({"key": "text", "model": _Evil()}, protocol=protocol))
        assert _bare_pickle_call(path) == f"{os.name}.system"
        with pytest.raises(SmoothAdvError, match=f"would call {os.name}.system"):
            read_checkpoint(path)
    with pytest.raises(SmoothAdvError, match="bare Python pickle that would call"):  # protocol 4: STACK_GLOBAL
        read_checkpoint(tmp_path / "evil4.pkl")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"a": [1, 2.0, "x"]}, protocol=4))
    assert _bare_pickle_call(plain) is None  # plain data calls nothing
    reduce_only = tmp_path / "reduce.pkl"
    reduce_only.write_bytes(b"\x80\x02N)R.")  # None(): a call with no import
    assert _bare_pickle_call(reduce_only) == "code"


def test_a_corrupt_file_is_described_by_the_first_line_of_the_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04garbage here")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SmoothAdvError) as info:
        warnings.simplefilter("always")
        read_checkpoint(garbage)
    assert caught == []  # torch's warning about the pickle protocol of a file refused anyway is not shown
    assert str(info.value) == f"checkpoint {garbage} is corrupt or truncated (UnpicklingError: Unsupported operand 103)"
    torch.save({"state_dict": {}}, tmp_path / "no_arch.pt")
    with pytest.raises(SmoothAdvError, match="not a model checkpoint"):
        read_checkpoint(tmp_path / "no_arch.pt")
    torch.save({"arch": "toy_cnn", "state_dict": {}, "weights_sha256": 3}, tmp_path / "int_digest.pt")
    with pytest.raises(SmoothAdvError, match="is malformed: weights_sha256 must be a string"):
        read_checkpoint(tmp_path / "int_digest.pt")
    torch.save({"arch": "toy_cnn", "state_dict": {"w": 1.0}, "weights_sha256": "ab"}, tmp_path / "float_state.pt")
    with pytest.raises(SmoothAdvError, match="is malformed"):
        read_checkpoint(tmp_path / "float_state.pt")


def test_foreign_keys_drop_only_the_wrappers_module_prefixes() -> None:
    t = torch.zeros(1)
    assert list(_foreign_state_dict({"1.module.conv.weight": t, "module.1.fc.bias": t, "0.mean": t,
                                     "1.block.module.weight": t, "x": t})) == [
        "1.conv.weight", "1.fc.bias", "1.block.module.weight", "1.x"]


def test_a_checkpoint_lacking_a_weight_is_refused_even_when_batchnorm_counters_are_filled_in(tmp_path: Path) -> None:
    model = build_model("cifar_resnet20", "cifar10")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"arch": "cifar_resnet20", "state_dict": state}, tmp_path / "old.pth")  # a Cohen-era file
    loaded, meta = load_checkpoint(tmp_path / "old.pth", normalization="normalize")
    assert meta["weights_verified"] is False
    del state["1.fc.weight"]
    torch.save({"arch": "cifar_resnet20", "state_dict": state}, tmp_path / "lacking.pth")
    with pytest.raises(SmoothAdvError, match=r"missing \['1.fc.weight'\]"):
        load_checkpoint(tmp_path / "lacking.pth", normalization="normalize")


def test_a_trusted_conversion_keeps_plain_fields_and_refuses_its_own_input_or_an_existing_output(tmp_path) -> None:
    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    state = build_model("toy_cnn", "synthetic").state_dict()
    parameters = dict(build_model("toy_cnn", "synthetic").named_parameters())  # saved with requires_grad
    torch.save({"arch": "toy_cnn", "state_dict": parameters, "epoch": "12", "note": {"a": [1, 2]}, "obj": _Plain()},
               src)
    convert_trusted_checkpoint(src, dst)
    payload = read_checkpoint(dst)
    assert payload["epoch"] == 12 and payload["note"] == {"a": [1, 2]} and "obj" not in payload
    assert not any(t.requires_grad for t in payload["state_dict"].values())  # plain tensors, as every file holds
    with pytest.raises(SmoothAdvError, match="already exists"):
        convert_trusted_checkpoint(src, dst)
    with pytest.raises(SmoothAdvError, match="is also an input"):
        convert_trusted_checkpoint(src, src, force=True)
    torch.save({"arch": "toy_cnn", "state_dict": state, "epoch": "twelve"}, src)
    convert_trusted_checkpoint(src, dst, force=True)
    assert "epoch" not in read_checkpoint(dst)  # not a number: dropped rather than guessed
    torch.save({"arch": "toy_cnn"}, src)
    with pytest.raises(SmoothAdvError, match="not a checkpoint dict with a 'state_dict'"):
        convert_trusted_checkpoint(src, dst, force=True)
    torch.save({"arch": "toy_cnn", "state_dict": {"w": 1.0}}, src)
    with pytest.raises(SmoothAdvError, match="not a dict of tensors"):
        convert_trusted_checkpoint(src, dst, force=True)


class _Plain:
    """An object that is not plain data (a weights-only load would refuse it)."""


def _nested(levels: int, wrap=lambda value: [value]) -> object:
    """1 inside `levels` containers made by `wrap` (lists by default)."""
    value: object = 1
    for _ in range(levels):
        value = wrap(value)
    return value


def test_plain_data_is_what_a_weights_only_load_reads_nested_up_to_32_levels() -> None:
    assert _plain_data(_nested(32)) and not _plain_data(_nested(33))
    assert _plain_data({"a": _nested(20), 3: (1.0, None, "x", torch.zeros(1), torch.float32)})
    assert not _plain_data({(1, 2): 1}) and not _plain_data({"a": _Plain()}) and not _plain_data({1, 2})
    assert not _plain_data(_Plain())


def test_multiply_adds_are_counted_in_closed_form_and_leave_no_hook() -> None:
    conv = nn.Conv2d(4, 6, kernel_size=(3, 1), groups=2)  # output 6 x 6 x 8 on a 4 x 8 x 8 input
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(6 * 6 * 8, 5))
    total = multiply_adds(net, (4, 8, 8))
    assert total == 6 * 6 * 8 * (4 // 2) * 3 * 1 + 5 * 6 * 6 * 8 and isinstance(total, int)
    assert all(not m._forward_hooks for m in net.modules())


def test_a_denoiser_of_another_sigma_or_dataset_is_refused() -> None:
    check_sigma(0.25, 0.25 + 1e-12)  # the same noise level written another way
    with pytest.raises(SmoothAdvError, match="trained for sigma 0.25, but --sigma is 0.26"):
        check_sigma(0.25, 0.26)
    with pytest.raises(SmoothAdvError, match="trained for sigma 0, but --sigma is 1e-09"):
        check_sigma(0.0, 1e-9)
    check_dataset({"dataset": "mnist"}, "mnist")
    check_dataset({"dataset": None}, "mnist")  # nothing recorded: nothing to compare
    with pytest.raises(SmoothAdvError, match="trained on mnist, but the classifier is for fashion_mnist"):
        check_dataset({"dataset": "mnist"}, "fashion_mnist")


def test_an_unsafe_call_with_a_long_name_is_cut_to_160_characters(tmp_path: Path) -> None:
    path = tmp_path / "long.pkl"
    path.write_bytes(b"\x80\x02c" + b"m" * 200 + b"\nfunc\n)R.")  # GLOBAL of a 200-character module, called
    with pytest.raises(SmoothAdvError) as info:
        read_checkpoint(path)
    assert f"(it would call {'m' * 146}). If you trust the file" in str(info.value)  # 160 characters in all


def test_a_checkpoint_loads_for_the_dataset_it_records_else_its_architecture_s(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "i32.pth", build_model("cifar_resnet20", "imagenet32"), arch="cifar_resnet20",
                    dataset="imagenet32")  # a CIFAR network trained on 32x32 ImageNet
    _, meta = load_checkpoint(tmp_path / "i32.pth")
    assert (meta["dataset"], meta["num_classes"]) == ("imagenet32", 1000)
    save_checkpoint(tmp_path / "bare.pth", build_model("toy_cnn", "synthetic"), arch="toy_cnn")  # no dataset given
    _, meta = load_checkpoint(tmp_path / "bare.pth")
    assert (meta["dataset"], meta["num_classes"]) == ("synthetic", 4)


def test_load_weights_checks_the_fields_and_fills_in_batchnorm_counters_an_old_file_lacks(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"arch": "custom", "state_dict": state}, tmp_path / "old.pth")
    assert load_weights(tmp_path / "old.pth", nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))[
        "weights_verified"] is False
    torch.save({"format": FORMAT, "arch": "custom", "state_dict": state, "dataset": 3}, tmp_path / "bad.pth")
    with pytest.raises(SmoothAdvError, match="is malformed: dataset must be a string"):
        load_weights(tmp_path / "bad.pth", net)


def test_nested_dicts_count_towards_the_same_depth_limit() -> None:
    def in_dicts(levels: int) -> object:
        return _nested(levels, lambda value: {"k": value})

    assert _plain_data(in_dicts(20)) and _plain_data(in_dicts(32)) and not _plain_data(in_dicts(33))


def _denoiser_file(path: Path, **changes) -> Path:
    """A DnCNN checkpoint (save_denoiser's format) with `changes` written over its fields, digest removed so that
    the field checks, not the digest, are what a load meets."""
    from smoothadv.denoise import DnCNN
    from smoothadv.models import save_denoiser

    torch.manual_seed(0)
    save_denoiser(path, DnCNN(1, depth=3, width=4), arch="dncnn_small", dataset="fashion_mnist", sigma=0.25)
    payload = torch.load(path, weights_only=True)
    payload.pop("weights_sha256")
    torch.save({**payload, **changes}, path)
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"channels": 0}, "channels must be a positive integer, got 0"),
    ({"depth": True}, "depth must be a positive integer, got True"),
    ({"width": 2.0}, "width must be a positive integer, got 2.0"),
    ({"sigma": "0.25"}, "sigma must be a number >= 0, got '0.25'"),
    ({"sigma": float("nan")}, "sigma must be a number >= 0, got nan"),
    ({"sigma": -0.25}, "sigma must be a number >= 0, got -0.25"),
    ({"arch": "unet"}, "unknown arch 'unet' or no dataset"),
    ({"dataset": None}, "unknown arch 'dncnn_small' or no dataset"),
    ({"state_dict": {}}, "do not fit a DnCNN of depth 3 and width 4"),
    ({"depth": 4}, "do not fit a DnCNN of depth 4 and width 4"),
    ({"width": 5}, "do not fit a DnCNN of depth 3 and width 5"),  # the same names, other shapes
])
def test_a_denoiser_with_a_malformed_field_is_refused_in_one_line(tmp_path: Path, changes, message) -> None:
    from smoothadv.models import load_denoiser

    with pytest.raises(SmoothAdvError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_denoiser(_denoiser_file(tmp_path / "d.pth", **changes))


def test_a_denoiser_for_no_noise_loads_and_a_classifier_is_not_a_denoiser(tmp_path: Path) -> None:
    from smoothadv.models import load_denoiser

    assert load_denoiser(_denoiser_file(tmp_path / "d.pth", sigma=0))[1]["sigma"] == 0  # the identity's level
    save_checkpoint(tmp_path / "f.pth", build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic")
    with pytest.raises(SmoothAdvError, match="is a classifier checkpoint \\(toy_cnn\\), not a denoiser"):
        load_denoiser(tmp_path / "f.pth")


def test_a_diffusion_model_that_cannot_run_on_its_own_image_size_is_refused_when_attached(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from conftest import ddpm_scheduler

    from smoothadv.models import attach_denoiser

    # 7x7 images halve to 4x4 and double back to 8x8: the UNet's skip connections cannot be joined
    unet = diffusers.UNet2DModel(sample_size=7, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    diffusers.DDPMPipeline(unet=unet, scheduler=ddpm_scheduler()).save_pretrained(tmp_path / "odd")
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 7, 4))
    with pytest.raises(SmoothAdvError, match=r"does not fit the classifier's \(3, 7, 7\) images"):
        attach_denoiser(classifier, tmp_path / "odd", sigma=0.25, shape=(3, 7, 7))
