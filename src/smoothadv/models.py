"""Models are `Sequential(normalization, network)`, and the checkpoint format is specified here.

The normalization layer is the model's first layer (Cohen et al.'s design): Gaussian noise and
attacks act on raw [0, 1] pixels, so sigma, eps and certified radii are in pixel units.

Checkpoint format (`torch.save` of a dict holding only tensors, numbers, strings, lists and
dicts, so it loads with `weights_only=True`):

    format          "smoothadv-checkpoint"      version   1
    arch            architecture name (archs.ARCHITECTURES), or a name of your own ("custom" by default)
    module          for your own module only: its class, "package.module.ClassName" (information)
    dataset         dataset name (data.DATASETS), or None (your own data)
    num_classes     int (None only for your own module when its output count is unknown)
    normalization   {"kind": "normalize" | "center" | "none", "mean": [...], "std": [...]}, or None
    sigma           training noise level (float, may be 0; None when not given)
    epoch           completed epochs
    state_dict      a registered architecture's: state dict of Sequential(norm, net), keys "1.<param>"
                    exactly as in Cohen's files; your own module's: its `state_dict()` as it is
    weights_sha256  `weights_digest(state_dict)`: recomputed over the weights read on every load
                    (`load_checkpoint`, `load_weights`, `load_denoiser`, `read_checkpoint`) and
                    compared, so flipped or overwritten weight bytes are refused (torch does not
                    check the zip's CRC). `weights_verified` in the metadata is True only after that
                    comparison succeeded. Files written before it existed have none and still load,
                    unverified (`weights_verified` False); Cohen's and Salman's files carry one once
                    converted (`convert_trusted_checkpoint`).
    optimizer, scheduler, rng, config, objective, smoothadv_version   (training state and provenance)
    kind            absent for a classifier; "denoiser" for a denoised-smoothing denoiser (Salman et al.
                    2020, arXiv:2003.01908; `save_denoiser`: channels, depth, width, classifiers,
                    history; no num_classes), which `load_checkpoint` refuses as a classifier

Your own model (any `nn.Module`, its normalization inside it): `save_checkpoint(path, model, num_classes=K,
sigma=...)` writes it with its digest, and `load_weights(path, module)` (or `load_checkpoint(path,
model=module)`) loads it back into a module you hold, with a one-line error naming what does not fit.

Denoisers (the DnCNN family of `denoise.py`) are saved and loaded here too (`save_denoiser`, `load_denoiser`),
with the checks `certify --denoiser` makes (`check_sigma`, `check_fits`, `check_dataset`), f o D for it
(`attach_denoiser`), and their cost (`multiply_adds`, `cost_summary`). Denoisers written before they shared
this format (format "smoothadv-denoiser", no digest) still load, unverified.

`load_checkpoint` also reads Cohen et al.'s and Salman et al.'s released `checkpoint.pth.tar`
files (keys `arch`, `state_dict` with `1.` or `1.module.` prefixes) of the architectures their code
defines (`ArchInfo.foreign`), as trained on that architecture's `ArchInfo.dataset`. They do not record their
normalization, so the caller must choose it: "normalize" (x - mean) / std, or "center" x - mean
(Salman's InputCenterLayer; see the README's table of which released model needs which).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch
from torch import Tensor, nn

from . import __version__  # set before the package imports its modules
from .archs import ARCHITECTURES, arch_info, foreign_names
from .data import dataset_stats, input_shape, num_classes
from .diffusion import diffusion_denoiser
from .errors import SmoothAdvError
from .files import atomic_torch_save, check_new_output, file_sha256
from .settings import NORMALIZATIONS, registered
from .smoothing import eval_mode

if TYPE_CHECKING:  # annotations only: `denoise` registers its DnCNN family here when imported (`register_denoisers`)
    from .denoise import DenoisedClassifier, DnCNN

__all__ = [
    "CUSTOM", "DENOISER", "DIGEST", "FORMAT", "LEGACY_DENOISER_FORMAT", "NORMALIZATIONS", "Normalize",
    "attach_denoiser", "build_model", "check_arch_fits", "check_dataset", "check_fits", "check_sigma",
    "convert_trusted_checkpoint", "cost_summary", "is_denoiser", "load_checkpoint", "load_denoiser", "load_weights",
    "multiply_adds", "normalization_spec", "read_checkpoint", "register_denoisers", "replace_head", "save_checkpoint",
    "save_denoiser", "weights_digest",
]

FORMAT = "smoothadv-checkpoint"
DENOISER = "denoiser"
LEGACY_DENOISER_FORMAT = "smoothadv-denoiser"
DIGEST = "weights_sha256"
M = TypeVar("M", bound=nn.Module)


class Normalize(nn.Module):
    """(x - mean) / std per channel. mean and std are non-persistent buffers: they follow `.to()`
    but stay out of the state dict, so Cohen's and Salman's state dicts load strictly.

    An input whose channel count (dimension -3) is not the layer's is refused (SmoothAdvError),
    where broadcasting would silently turn a 1-channel image into a 3-channel one. (Not checked
    while torch.fx traces the layer, e.g. for `accel.fold_batchnorm`.)
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        std_values = list(std) if std is not None else [1.0] * len(mean)
        self.register_buffer("std", torch.tensor(std_values, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.centers_only = std is None

    def forward(self, x: Tensor) -> Tensor:
        channels = self.mean.shape[1]
        if not isinstance(x, torch.fx.Proxy) and (x.dim() < 3 or x.shape[-3] != channels):
            raise SmoothAdvError(f"the model takes {channels}-channel images (its input normalization has {channels} "
                                 f"channel(s)), got an input of shape {tuple(x.shape)}")
        return (x - self.mean) / self.std  # a centering layer's std is ones: x - mean, exactly

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        if self.centers_only:
            return f"center, mean={mean}"
        return f"mean={mean}, std={[round(v, 4) for v in self.std.flatten().tolist()]}"


def normalization_spec(dataset: str, kind: str = "normalize") -> dict[str, Any]:
    """The checkpoint's record of a normalization layer for `dataset` of the given kind."""
    if kind not in NORMALIZATIONS:
        raise SmoothAdvError(f"unknown normalization {kind!r}; choose one of {', '.join(NORMALIZATIONS)}")
    mean, std = dataset_stats(dataset)
    return {"kind": kind, "mean": list(mean), "std": list(std)}


def _norm_layer(spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("kind")
    if kind == "normalize":
        return Normalize(spec["mean"], spec["std"])
    if kind == "center":
        return Normalize(spec["mean"], None)
    if kind == "none":
        return nn.Identity()
    raise SmoothAdvError(f"unknown normalization kind {kind!r} in checkpoint")


def build_model(arch: str, dataset: str, normalization: str | dict[str, Any] = "normalize",
                classes: int | None = None) -> nn.Sequential:
    """Sequential(normalization layer, network) for `arch` trained on `dataset`.

    The network is `ARCHITECTURES[arch].build(classes)`, with `classes` defaulting to the dataset's number of
    classes; an unknown architecture or dataset is a one-line SmoothAdvError.
    """
    info = arch_info(arch)
    spec = normalization if isinstance(normalization, dict) else normalization_spec(dataset, normalization)
    net = info.build(classes if classes is not None else num_classes(dataset))
    return nn.Sequential(_norm_layer(spec), net)


def check_arch_fits(arch: str, dataset: str) -> None:
    """Raise SmoothAdvError (one line) unless network `arch` takes `dataset`'s images.

    An architecture built for images of the dataset's shape (`ArchInfo.dataset`'s `input_shape`) fits; any
    other is tried on two blank images of that shape (e.g. torchvision's ResNet-50 pools adaptively and
    takes CIFAR images), so training never starts with a network that fails at its first batch.
    """
    info = arch_info(arch)
    shape = input_shape(dataset)
    if input_shape(info.dataset) == shape:
        return
    try:
        net = info.build(num_classes(dataset)).eval()
        with torch.no_grad():
            net(torch.zeros(2, *shape))
    except RuntimeError:
        fitting = [name for name, other in ARCHITECTURES.items() if input_shape(other.dataset) == shape]
        size = "x".join(map(str, shape))
        raise SmoothAdvError(
            f"architecture {arch!r} does not take {dataset} images ({size}; it is built for {info.dataset}, "
            f"{'x'.join(map(str, input_shape(info.dataset)))}): choose --arch {' or '.join(fitting) or 'another one'}"
        ) from None


def replace_head(model: nn.Sequential, arch: str, classes: int) -> None:
    """Replace the final Linear layer of `model` (built by build_model; at `ARCHITECTURES[arch].head`) with a
    fresh one of `classes` outputs, on the old layer's device."""
    *path, last = arch_info(arch).head.split(".")
    parent: Any = model[1]
    for name in path:
        parent = getattr(parent, name) if not name.isdigit() else parent[int(name)]
    old = getattr(parent, last) if not last.isdigit() else parent[int(last)]
    new = nn.Linear(old.in_features, classes).to(old.weight.device)
    if last.isdigit():
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def weights_digest(state: Mapping[str, Tensor]) -> str:
    """Hex SHA-256 of a state dict: each entry's name, dtype, shape and bytes, in sorted name order.

    Depends only on the tensors' values (not on their device or on how the file stores them)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return digest.hexdigest()


def is_denoiser(payload: Mapping[str, Any]) -> bool:
    """Whether a read checkpoint holds a denoiser (this format's `kind`, or the earlier denoiser format)."""
    return payload.get("kind") == DENOISER or payload.get("format") == LEGACY_DENOISER_FORMAT


CUSTOM = "custom"
"""The `arch` recorded for a module of your own (no registered architecture): it loads into a module you hold."""


def _head_classes(model: nn.Module, arch: str | None) -> int | None:
    """The class count of a classifier module: its registered head's outputs, else its last `nn.Linear`'s."""
    if arch in ARCHITECTURES and isinstance(model, nn.Sequential) and len(model) == 2:
        parent: Any = model[1]
        try:
            for name in arch_info(arch).head.split("."):
                parent = parent[int(name)] if name.isdigit() else getattr(parent, name)
            if isinstance(parent, nn.Linear):
                return int(parent.out_features)
        except (AttributeError, IndexError, TypeError):
            pass
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module under a `torch.compile` or (Distributed)DataParallel wrapper (whose state dict keys carry
    `_orig_mod.` or `module.` prefixes), so a checkpoint holds and takes the model's own keys."""
    while True:
        inner = getattr(module, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            module = inner
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            return module


def _recorded_normalization(model: nn.Module) -> dict[str, Any]:
    """The normalization record of a `Sequential(Normalize or Identity, network)` (read from its first layer)."""
    first = model[0] if isinstance(model, nn.Sequential) and len(model) == 2 else None
    if isinstance(first, Normalize):
        mean = [float(v) for v in first.mean.flatten().tolist()]
        if first.centers_only:
            return {"kind": "center", "mean": mean, "std": [1.0] * len(mean)}
        return {"kind": "normalize", "mean": mean, "std": [float(v) for v in first.std.flatten().tolist()]}
    return {"kind": "none"}


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, arch: str | None = None,
                    dataset: str | None = None, normalization: dict[str, Any] | None = None,
                    sigma: float | None = None, num_classes: int | None = None, **extra: Any) -> None:
    """Write `model`'s weights and what they are in the format above, atomically (temporary file, fsync,
    rename), with the digest of its weights (`weights_sha256`) that every load verifies.

    Your own module (any `nn.Module`): `save_checkpoint(path, model)` or with `arch="my_net"`, `num_classes=K`,
    `sigma=...`, `dataset=...` as you wish. Such a file records `arch` (default "custom") and the module's
    class name, and loads back into a module you hold: `load_weights(path, module)` or
    `load_checkpoint(path, model=module)`. Your normalization is part of your module; `normalization` is
    then an optional record.

    A registered architecture (`archs.ARCHITECTURES`): `model` is `Sequential(normalization layer, network)`
    as `build_model` makes it, or the bare network (saved as that Sequential's `1.` keys, with no
    normalization unless given); weights that fit neither are refused here, not at load time.
    `normalization` defaults to the model's own first layer (a `Normalize`, or none).

    `num_classes` defaults to the model's output count (its registered head, else its last `nn.Linear`),
    then to the dataset's. Anything else in `extra` (epoch, optimizer, ...) is stored as given;
    `kind="denoiser"` writes a denoiser (no `num_classes`). A model under `torch.compile` or
    (Distributed)DataParallel is saved as the model itself.
    """
    model = _unwrapped(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    denoiser = extra.get("kind") == DENOISER
    name = CUSTOM if arch is None else str(arch)
    registered = name in ARCHITECTURES and not denoiser
    if registered:
        state = _registered_state(model, state, name, num_classes)
        if normalization is None:
            normalization = _recorded_normalization(model)
    payload: dict[str, Any] = {"format": FORMAT, "version": 1, "arch": name, "dataset": dataset}
    if not registered and not denoiser:
        payload["module"] = f"{type(model).__module__}.{type(model).__qualname__}"
    if not denoiser:
        classes = num_classes if num_classes is not None else _head_classes(model, name)
        if classes is None and dataset is not None:
            classes = _dataset_classes(dataset)
        if classes is not None and (isinstance(classes, bool) or int(classes) != classes or classes < 2):
            raise SmoothAdvError(f"num_classes must be an integer >= 2, got {classes!r}")
        payload["num_classes"] = None if classes is None else int(classes)
    payload.update({"normalization": normalization, "sigma": None if sigma is None else float(sigma),
                    "state_dict": state, "smoothadv_version": __version__, DIGEST: weights_digest(state)})
    payload.update(extra)
    atomic_torch_save(payload, path)


def _dataset_classes(dataset: str) -> int:
    return num_classes(dataset)


def _registered_state(model: nn.Module, state: dict[str, Tensor], arch: str, classes: int | None) -> dict[str, Tensor]:
    """The state dict of a registered architecture as `Sequential(norm, net)` keys ("1.<param>"), or a one-line
    SmoothAdvError naming the first keys that do not fit (at save time, so no unloadable file is written)."""
    own = set(arch_info(arch).build(classes or 10).state_dict())  # the key names do not depend on the count
    wrapped = {f"1.{k}" for k in own}
    if set(state) == wrapped:
        return state
    if set(state) == own:  # the bare network: store it as Sequential(normalization, network)
        return {f"1.{k}": v for k, v in state.items()}
    odd = sorted(set(state) - wrapped - own)[:3] or sorted(wrapped - set(state))[:3]
    raise SmoothAdvError(f"the module's weights do not fit registered architecture {arch!r} (first differing keys "
                         f"{odd}); to save a module of your own, leave arch out (or give a name not in the registry)")


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True, turning every failure into a one-line SmoothAdvError.

    A file that records the digest of its weights (`weights_sha256`) is returned only if the digest
    recomputed over the weights read from it equals the recorded one (else SmoothAdvError: the file is
    corrupt, or its weights were changed after it was saved)."""
    return _read_verified(Path(path), map_location)[0]


def _read_verified(file: Path, map_location: str | torch.device) -> tuple[dict[str, Any], bool]:
    """(`read_checkpoint`'s payload, whether its weights were verified): True only when the file records a weights
    digest and the digest recomputed over its state dict equals it, False when it records none (a mismatch is
    refused). Every loader reports it as `weights_verified`, never the mere presence of a digest."""
    if file.is_dir():
        raise SmoothAdvError(f"checkpoint {file} is a directory, not a checkpoint file")
    if not file.is_file():
        raise SmoothAdvError(f"checkpoint {file} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses anyway
            warnings.simplefilter("ignore")
            payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).strip()
        if "global" not in text.lower():  # "Unsupported operand", "pop from empty", ...: not a pickle we know
            caller = _bare_pickle_call(file)
            if caller is not None:  # a plain pickle (not torch.save's format) that would call something
                raise SmoothAdvError(
                    f"refusing to load {file}: it is not a weights-only checkpoint but a bare Python pickle that "
                    f"would call {caller[:120]} when unpickled (unsafe pickle: it could run code); nothing was run"
                ) from None
            detail = text.split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:160]  # not torch's advice
            raise SmoothAdvError(f"checkpoint {file} is corrupt or truncated (UnpicklingError: {detail})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)  # name the offending object; never echo torch's allowlist advice
        unsupported = f"it would call {found.group(1)}" if found else "unsupported object"
        raise SmoothAdvError(
            f"refusing to load {file}: it holds objects other than tensors and plain containers, which could run "
            f"code when unpickled ({unsupported[:160]}). If you trust the file, convert it once with "
            "`smoothadv convert-checkpoint IN OUT --trust`"
        ) from None
    except Exception as exc:  # zip, EOF, stream and pickle-structure errors all mean an unreadable file
        detail = str(exc).splitlines()[0][:160] if str(exc) else "unreadable"
        raise SmoothAdvError(f"checkpoint {file} is corrupt or truncated ({type(exc).__name__}: {detail})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise SmoothAdvError(f"{file} is not a model checkpoint (expected a dict with 'arch' and 'state_dict')")
    return payload, _verify_weights(payload, file)


def _verify_weights(payload: dict[str, Any], file: Path) -> bool:
    """True if `payload` records a weights digest and the digest recomputed over its state dict (the tensors a
    loader then copies into the model) equals it; False if it records none; SmoothAdvError (one line) if they
    differ or the fields are malformed."""
    recorded = payload.get(DIGEST)
    if recorded is None:
        return False  # written before digests existed, or by Cohen's or Salman's code: nothing to verify
    state = payload["state_dict"]
    if not isinstance(recorded, str) or not isinstance(state, dict) or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise SmoothAdvError(f"{file} is malformed: {DIGEST} must be a string and state_dict a dict of named tensors")
    if weights_digest(state) != recorded:
        raise SmoothAdvError(f"checkpoint {file} is corrupt: its weights do not match the digest recorded when it was "
                             "saved (flipped or overwritten bytes); restore it from a copy or retrain")
    return True


def _bare_pickle_call(file: Path) -> str | None:
    """What a plain pickle file would import or call when unpickled ('module.name', or 'code'), read from its
    opcodes without unpickling it; None if it is not such a pickle (a torch zip file, garbage, plain data)."""
    if zipfile.is_zipfile(file):
        return None
    strings: list[str] = []
    try:
        with open(file, "rb") as handle:
            for opcode, arg, _ in pickletools.genops(handle):
                if isinstance(arg, str):
                    strings = [*strings[-1:], arg]
                if opcode.name in ("GLOBAL", "INST"):
                    return str(arg).replace(" ", ".")
                if opcode.name == "STACK_GLOBAL":
                    return ".".join(strings) if len(strings) == 2 else "an imported object"
                if opcode.name in ("REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"):
                    return "code"
    except Exception:  # not a (complete) pickle: let the caller call it corrupt
        return None
    return None


def _foreign_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map Cohen/Salman keys ('1.x', '1.module.x', 'module.1.x' or bare 'x') to this library's '1.x'."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        parts = [p for i, p in enumerate(parts) if not (p == "module" and i <= 1)]
        if parts[0] == "0":  # a normalization layer saved with buffers: ours are non-persistent
            continue
        if parts[0] != "1":
            parts = ["1", *parts]
        out[".".join(parts)] = value
    return out


def _load_state(model: nn.Module, state: dict[str, Tensor], file: Path, arch: str) -> None:
    own = model.state_dict()
    for key in own:  # old checkpoints predate BatchNorm's num_batches_tracked
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong_shape:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape mismatch at {wrong_shape[:3]}")
        raise SmoothAdvError(f"the weights in {file} do not fit architecture {arch!r} ({detail}); "
                             "is the checkpoint of another architecture?")
    model.load_state_dict(state, strict=True)


def _check_fields(payload: dict[str, Any], file: Path) -> None:
    """Raise SmoothAdvError unless the checkpoint's fields have the types the format above specifies
    (`dataset`, `num_classes` and `normalization` may be None in a file of your own module)."""
    def bad(field: str, what: str) -> SmoothAdvError:
        return SmoothAdvError(f"{file} is malformed: {field} must be {what}, got {type(payload.get(field)).__name__}")

    if not isinstance(payload.get("arch"), str):
        raise bad("arch", "a string")
    state = payload.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise bad("state_dict", "a dict of named tensors")
    if payload.get("format") != FORMAT:
        return
    if "dataset" not in payload or (payload["dataset"] is not None and not isinstance(payload["dataset"], str)):
        raise bad("dataset", "a string (or None for your own data)")
    classes = payload.get("num_classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 2):
        raise bad("num_classes", "an integer >= 2")
    spec = payload.get("normalization")
    if spec is None:
        return
    numbers_ok = isinstance(spec, dict) and (spec.get("kind") == "none" or all(
        isinstance(spec.get(key), (list, tuple)) and all(isinstance(v, (int, float)) for v in spec[key])
        for key in ("mean", "std")))
    if not numbers_ok or spec.get("kind") not in NORMALIZATIONS:
        raise bad("normalization", f"a dict with kind in {NORMALIZATIONS} and numeric mean and std lists")
    sigma = payload.get("sigma")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))):
        raise bad("sigma", "a number")


def _metadata(payload: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k not in ("state_dict", "optimizer", "scheduler", "rng")}


def _fitting_state(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` renamed to fit `module`'s keys when a known renaming does: as saved; a foreign file's keys
    ("1.module.x", "module.x", ...) mapped to "1.x"; or without the "1." of `Sequential(norm, network)` when
    `module` is the bare network. Otherwise `state` unchanged (the caller names what does not fit)."""
    own = set(module.state_dict())
    optional = {k for k in own if k.endswith("num_batches_tracked")}  # older files predate BatchNorm's counter
    mapped = _foreign_state_dict(state)
    for candidate in (state, mapped, {k[2:]: v for k, v in mapped.items() if k.startswith("1.")}):
        if own - optional <= set(candidate) <= own:
            return dict(candidate)
    return dict(state)


def load_weights(path: str | os.PathLike[str], module: nn.Module, *, normalization: str | None = None,
                 ) -> dict[str, Any]:
    """Load the weights of a checkpoint into `module`, a module you hold, in place; returns the metadata.

    Works with any file `load_checkpoint` reads: one of your own module (`save_checkpoint(path, model)`),
    of a registered architecture (into `Sequential(norm, network)` or the bare network), a denoiser, or a
    Cohen/Salman release (their "1.module." key prefixes are mapped). The weights digest is verified first
    (a corrupt file is refused); the weights are copied onto the module's own device; the module's
    train/eval mode is left as it was (as `module.load_state_dict`).

    Every mismatch is a one-line SmoothAdvError naming the first differing keys, or, when the output
    layer has another size, both class counts. `normalization` is accepted for symmetry with
    `load_checkpoint` and not used: your module carries its own.

    Returns: the checkpoint's metadata (without tensors), with `weights_verified` as in `load_checkpoint`.
    """
    del normalization
    file = Path(path)
    if not isinstance(module, nn.Module):
        raise SmoothAdvError(f"load_weights needs the nn.Module to load {file} into, got {type(module).__name__}")
    module = _unwrapped(module)  # a compiled or DataParallel module shares its parameters with the model inside
    payload, verified = _read_verified(file, "cpu")
    _check_fields(payload, file)
    state = _fitting_state(module, payload["state_dict"])
    own = module.state_dict()
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    recorded = payload.get("num_classes")
    classes = _head_classes(module, None)
    if wrong and isinstance(recorded, int) and classes is not None and recorded != classes:
        raise SmoothAdvError(f"{file} holds a {recorded}-class model but the module has {classes} outputs "
                             f"(shapes differ at {wrong[:3]}); build the module with {recorded} classes")
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing in the file {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"not in the module {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}" if unexpected else "",
            f"other shapes at {wrong[:3]}" if wrong else "") if part)
        raise SmoothAdvError(f"the weights in {file} (arch {payload.get('arch')!r}) do not fit the "
                             f"{type(module).__name__} given: {detail}")
    module.load_state_dict(state, strict=True)
    return {**_metadata(payload), "weights_verified": verified}


@overload
def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = ...,
                    normalization: str | None = ..., *, model: None = None) -> tuple[nn.Sequential, dict[str, Any]]:
    ...


@overload
def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = ...,
                    normalization: str | None = ..., *, model: M) -> tuple[M, dict[str, Any]]:
    ...


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                    normalization: str | None = None, *, model: nn.Module | None = None,
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model and its metadata from a smoothadv checkpoint or a Cohen/Salman release.

    Args:
        path: checkpoint file.
        map_location: device for the tensors (and the model built; a `model` given keeps its device).
        normalization: required for Cohen/Salman files, which do not record it: "normalize"
            (mean/std; Cohen's models) or "center" (mean only; most SmoothAdv models). For this
            library's own files it overrides the recorded choice only if given.
        model: a module you hold to load the weights into (`load_weights`), instead of building the
            recorded architecture; required for a file of your own module (arch not registered).

    Returns: (model in eval mode, metadata dict without the state dict). The metadata always has
    `arch`, `dataset`, `num_classes`, `normalization`, `sigma` (None when unknown) and
    `weights_verified`: True only if the file records a weights digest and the digest recomputed over the
    weights loaded from it equals it (a mismatch is refused, SmoothAdvError); False for a file without one
    (Cohen/Salman files not converted, smoothadv files older than the digest).
    """
    file = Path(path)
    if isinstance(map_location, nn.Module) and model is None:  # load_checkpoint(path, module): what was meant
        model, map_location = map_location, "cpu"
    if model is not None:
        meta = load_weights(file, model)
        meta = {"dataset": None, "num_classes": None, "normalization": None, "sigma": None, **meta}
        return model.eval(), meta
    payload, verified = _read_verified(file, map_location)
    if is_denoiser(payload):
        raise SmoothAdvError(f"{file} is a denoiser checkpoint, not a classifier; load it with "
                             "denoise.load_denoiser (the CLI: pass it as --denoiser next to the classifier's "
                             "checkpoint)")
    _check_fields(payload, file)
    arch = payload["arch"]
    if arch not in ARCHITECTURES:
        saved = f" (saved from your module {payload['module']})" if isinstance(payload.get("module"), str) else ""
        raise SmoothAdvError(f"{file} holds architecture {arch!r}{saved}, which is not registered: load it into "
                             "a module you hold with load_checkpoint(path, model=module) or load_weights(path, "
                             f"module) (registered: {', '.join(ARCHITECTURES)})")
    state = payload["state_dict"]
    if payload.get("format") == FORMAT:
        dataset = payload["dataset"] if payload.get("dataset") is not None else ARCHITECTURES[arch].dataset
        recorded = payload.get("normalization") or {"kind": "none"}
        spec = recorded if normalization is None else normalization_spec(dataset, normalization)
        classes = int(payload["num_classes"]) if payload.get("num_classes") is not None else num_classes(dataset)
        sigma = payload.get("sigma")
    else:
        info = ARCHITECTURES[arch]
        if not info.foreign:
            raise SmoothAdvError(
                f"{file} is not a smoothadv checkpoint, and {arch!r} has no Cohen/Salman-format checkpoints (those "
                f"are read for {', '.join(foreign_names())} only)"
            )
        dataset = info.dataset
        if normalization is None:
            raise SmoothAdvError(
                f"{file} is a Cohen/Salman-format checkpoint, which does not record its input normalization: pass "
                "normalization='normalize' (Cohen's models) or 'center' (most SmoothAdv models; the CLI's "
                "--normalization; see README)"
            )
        spec = normalization_spec(dataset, normalization)
        state = _foreign_state_dict(state)
        classes = num_classes(dataset)
        sigma = None
    built = build_model(arch, dataset, spec, classes)
    _load_state(built, dict(state), file, arch)
    built.to(map_location).eval()
    meta = _metadata(payload)
    meta.update({"arch": arch, "dataset": dataset, "num_classes": classes, "normalization": spec, "sigma": sigma,
                 "weights_verified": verified})
    return built, meta


def convert_trusted_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                               force: bool = False) -> None:
    """Re-save a *trusted* legacy checkpoint that needs full unpickling as a weights-only file.

    This runs `torch.load(weights_only=False)`, which can execute code from the file: only use it on
    files whose origin you trust. Keeps `arch`, `epoch`, the tensors of `state_dict` and every other field
    that is plain data (so a smoothadv checkpoint keeps its format, dataset, normalization, num_classes and
    sigma, and loads as before), and adds the weights' digest (`weights_sha256`, verified when the new file
    is loaded). A `src` that already records a digest is converted only if its weights still match it (else
    SmoothAdvError: a tampered file is never given a fresh digest). An existing `dst` is refused unless
    `force`, and `dst` may never be `src` (checked before `src` is read).
    """
    check_new_output(dst, force=force, inputs=[src], flag="output")
    try:
        payload = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SmoothAdvError(f"cannot read {src}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload:
        raise SmoothAdvError(f"{src} is not a checkpoint dict with a 'state_dict'")
    state = payload["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise SmoothAdvError(f"{src} has a 'state_dict' that is not a dict of tensors")
    if payload.get(DIGEST) is not None:  # never give weights changed after saving a digest of their own
        _verify_weights({DIGEST: payload[DIGEST], "state_dict": dict(state)}, Path(src))
    # every field that is plain data (this format's format, dataset, normalization, num_classes, sigma, kind,
    # training state, ...) is kept as it was, so a smoothadv file loads as before; anything else is dropped
    clean: dict[str, Any] = {str(k): v for k, v in payload.items()
                             if isinstance(k, str) and k not in ("state_dict", DIGEST) and _plain_data(v)}
    clean["arch"] = str(payload.get("arch"))
    clean["state_dict"] = {str(k): v.detach().cpu() for k, v in state.items()}
    if "epoch" in payload:
        try:
            clean["epoch"] = int(payload["epoch"])
        except (TypeError, ValueError):
            clean.pop("epoch", None)
    clean[DIGEST] = weights_digest(clean["state_dict"])
    atomic_torch_save(clean, dst)


def _plain_data(value: Any, depth: int = 0) -> bool:
    """Whether `value` loads with `torch.load(weights_only=True)`: tensors, numbers, strings, None, and lists,
    tuples and dicts of them (keys: strings or integers)."""
    if depth > 32:
        return False
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(item, depth + 1) for item in value)
    if type(value) in (dict, OrderedDict):
        return all(isinstance(k, (str, int)) and _plain_data(v, depth + 1) for k, v in value.items())
    return False


# ------------------------------------------------------------------ denoisers (denoised smoothing)


@dataclass
class _DenoiserFamily:
    """The networks a denoiser checkpoint loads into and f o D, as `denoise` registers them (`register_denoisers`)."""

    build: Callable[[str, int, int | None, int | None], DnCNN] | None = None
    compose: Callable[[nn.Module, nn.Module], DenoisedClassifier] | None = None


_DENOISERS = _DenoiserFamily()


def register_denoisers(build: Callable[[str, int, int | None, int | None], DnCNN],
                       compose: Callable[[nn.Module, nn.Module], DenoisedClassifier]) -> None:
    """Make `build(arch, channels, depth, width)` the network a denoiser checkpoint is loaded into and
    `compose(denoiser, classifier)` the f o D that `attach_denoiser` returns. `denoise`, which defines them (the
    DnCNN family and `DenoisedClassifier`), registers them when it is imported, so this module imports none of it
    (as `settings.register_names`)."""
    _DENOISERS.build, _DENOISERS.compose = build, compose


def _registered_family() -> tuple[Callable[[str, int, int | None, int | None], DnCNN],
                                  Callable[[nn.Module, nn.Module], DenoisedClassifier]]:
    if _DENOISERS.build is None or _DENOISERS.compose is None:
        raise SmoothAdvError("no denoiser family is registered (import smoothadv first)")
    return _DENOISERS.build, _DENOISERS.compose


def multiply_adds(module: nn.Module, shape: Sequence[int]) -> int:
    """Multiply-adds of one forward pass of `module` on one image of `shape` (C, H, W), counting the
    Conv2d and Linear layers (the rest is negligible for these networks)."""
    total = 0

    def count(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(layer, nn.Conv2d):
            total += output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            total += output.numel() * layer.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with eval_mode(module), torch.no_grad():
            module(torch.zeros((1, *shape), device=_device_of(module)))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def cost_summary(denoiser: nn.Module, classifier: nn.Module, shape: Sequence[int]) -> str:
    """One line: multiply-adds per image of D, of f and of f o D (a certification sample costs f o D)."""
    d, f = multiply_adds(denoiser, shape), multiply_adds(classifier, shape)
    return (f"denoiser {d / 1e6:.2f} M multiply-adds per image, classifier {f / 1e6:.2f} M: f o D costs "
            f"{(d + f) / max(f, 1):.1f}x f per noise sample")


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def save_denoiser(path: str | Path, denoiser: DnCNN, *, arch: str, dataset: str, sigma: float, **extra: Any) -> None:
    """Write a denoiser checkpoint (`save_checkpoint`, kind "denoiser", with its weights digest):
    arch (a `denoise.DENOISERS` name), channels, depth, width, dataset, sigma (the noise level it removes), and
    `extra` (epoch, objective, history, classifiers, ...)."""
    save_checkpoint(path, denoiser, arch=arch, dataset=dataset, normalization={"kind": "none"}, sigma=sigma,
                    kind=DENOISER, channels=denoiser.channels, depth=denoiser.depth, width=denoiser.width, **extra)


def load_denoiser(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[DnCNN, dict[str, Any]]:
    """(DnCNN in eval mode, metadata without the tensors; `weights_verified` as in `load_checkpoint`).

    Refuses, in one line, a missing, corrupt or truncated file, flipped weight bytes (digest), a file holding
    anything but plain data, a classifier checkpoint, malformed fields, and weights that do not fit the
    recorded size. Files of the earlier "smoothadv-denoiser" format (no digest) still load, unverified."""
    file = Path(path)
    build, _ = _registered_family()
    try:
        payload, verified = _read_verified(file, map_location)
    except SmoothAdvError as exc:
        text = str(exc)
        raise SmoothAdvError(text if text.startswith("denoiser") else f"denoiser {text}") from None
    if not is_denoiser(payload):
        if payload.get("format") == FORMAT:
            raise SmoothAdvError(f"{file} is a classifier checkpoint ({payload.get('arch')}), not a denoiser; train "
                                 "one with `smoothadv train-denoiser`")
        raise SmoothAdvError(f"{file} is not a smoothadv denoiser checkpoint")
    for key in ("channels", "depth", "width"):
        value = payload.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SmoothAdvError(f"denoiser {file} is malformed: {key} must be a positive integer, got {value!r}")
    sigma = payload.get("sigma")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise SmoothAdvError(f"denoiser {file} is malformed: sigma must be a number >= 0, got {sigma!r}")
    if payload.get("arch") not in registered("denoiser")() or not isinstance(payload.get("dataset"), str):
        raise SmoothAdvError(f"denoiser {file} is malformed: unknown arch {payload.get('arch')!r} or no dataset")
    denoiser = build(payload["arch"], payload["channels"], payload["depth"], payload["width"])
    state, own = payload["state_dict"], denoiser.state_dict()
    if not isinstance(state, dict) or set(state) != set(own) or any(
            not isinstance(state[k], Tensor) or state[k].shape != own[k].shape for k in own):
        raise SmoothAdvError(f"the weights in denoiser {file} do not fit a DnCNN of depth {payload['depth']} and width "
                             f"{payload['width']}; the file is damaged")
    denoiser.load_state_dict(state)
    denoiser.to(map_location).eval()
    return denoiser, {**_metadata(payload), "weights_verified": verified}


def check_sigma(denoiser_sigma: float, sigma: float, source: str = "the denoiser") -> None:
    """Refuse a denoiser trained for another noise level than the smoothing's `sigma` (one line): the
    certificate would stay valid, but f o D would be a poor classifier, almost always a mistake."""
    if not math.isclose(float(denoiser_sigma), float(sigma), rel_tol=1e-9, abs_tol=1e-12):
        raise SmoothAdvError(f"{source} was trained for sigma {denoiser_sigma:g}, but --sigma is {sigma:g}; use a "
                             f"denoiser trained at {sigma:g} (smoothadv train-denoiser --sigma {sigma:g})")


def check_fits(denoiser: nn.Module, classifier: nn.Module, shape: Sequence[int], channels: int | None = None,
               source: str = "the denoiser") -> None:
    """Refuse (one line) a denoiser that does not fit the classifier's images of `shape` (C, H, W):
    other channels, an output of another shape, or an output the classifier cannot take."""
    if channels is not None and channels != shape[0]:
        raise SmoothAdvError(f"{source} takes {channels}-channel images, but the classifier's are {shape[0]}x"
                             f"{shape[1]}x{shape[2]}")
    probe = torch.zeros((2, *shape), device=_device_of(denoiser))
    try:
        with eval_mode(denoiser), eval_mode(classifier), torch.no_grad():
            out = denoiser(probe)
            if tuple(out.shape) != tuple(probe.shape):
                raise SmoothAdvError(f"{source} turns {tuple(shape)} images into {tuple(out.shape[1:])}; it must keep "
                                     "their shape")
            classifier(out)
    except RuntimeError as exc:
        raise SmoothAdvError(f"{source} does not fit the classifier's {tuple(shape)} images "
                             f"({str(exc).splitlines()[0][:160]})") from None


def check_dataset(meta: Mapping[str, Any], dataset: Any, source: str = "the denoiser") -> None:
    """Refuse (one line) a denoiser recorded as trained on another dataset than the classifier's images: with the
    same channel count it fits, and f o D would silently be a poor classifier."""
    recorded = meta.get("dataset")
    if isinstance(recorded, str) and isinstance(dataset, str) and recorded != dataset:
        raise SmoothAdvError(f"{source} was trained on {recorded}, but the classifier is for {dataset}; train a "
                             f"denoiser on {dataset} (smoothadv train-denoiser --dataset {dataset})")


def attach_denoiser(classifier: nn.Module, path: str | Path, *, sigma: float, shape: Sequence[int],
                    device: torch.device | str = "cpu", steps: int = 1) -> tuple[DenoisedClassifier, dict[str, Any]]:
    """f o D for `certify --denoiser`: the denoiser at `path` in front of `classifier`, checked (corrupt
    file, another sigma, a misfit: one line). `path` is a denoiser checkpoint, or a directory holding a
    diffusers diffusion model: diffusion denoised smoothing (Carlini et al., ICLR 2023;
    `diffusion.diffusion_denoiser`: the UNet at the timestep of `sigma`, `steps` network evaluations, 1 for
    a checkpoint). Returns the composed model (eval mode) and the denoiser's metadata with its digest
    (`sha256`: the file's, or the diffusion model's weights and configs') and `facts`, what an evaluation
    records in OUT.args.json and compares on resume and merge."""
    _, compose = _registered_family()
    source = f"denoiser {path}"
    if Path(path).is_dir():
        diffusion, meta = diffusion_denoiser(path, sigma=sigma, shape=shape, device=device, steps=steps)
        check_fits(diffusion, classifier, shape, None, source)
        return compose(diffusion, classifier).eval(), meta
    if steps != 1:
        raise SmoothAdvError(f"--denoiser-steps {steps} needs a diffusion model directory as --denoiser; {path} is a "
                             "one-step denoiser checkpoint")
    denoiser, meta = load_denoiser(path, device)
    check_fits(denoiser, classifier, shape, meta["channels"], source)
    check_sigma(meta["sigma"], sigma, source)
    digest = file_sha256(path)
    facts = {"denoiser_sha256": digest, "denoiser_sigma": meta["sigma"],
             "denoiser_arch": f"{meta['arch']} ({meta['depth']}x{meta['width']})"}
    return compose(denoiser, classifier).eval(), {**meta, "sha256": digest, "facts": facts}
