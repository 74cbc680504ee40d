"""Pseudo-labelling an unlabelled image set, for self-training (Salman et al. 2019, Section 4.2; Carmon et al. 2019).

The paper mixes 500K Tiny Images pseudo-labelled by a standard classifier into SmoothAdv training.
Here any image set works, in one documented format, the same one `train --unlabelled` reads:

    an .npz file with
      images: uint8 (N, H, W), (N, H, W, C) or (N, C, H, W) with values 0..255,
              or float (same shapes) with values in [0, 1]
      labels: int (N,)   (written by `pseudo_label`; ignored on its input)

`pseudo_label` labels each image with the argmax of the checkpoint's base classifier on the clean
image (eval mode), keeps the `images` array byte for byte, and writes `labels` as int64.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch

from .accel import resolve_device
from .data import input_shape
from .errors import SmoothAdvError
from .files import atomic_write_bytes, check_new_output
from .models import load_checkpoint
from .smoothing import eval_mode

__all__ = ["load_images", "pseudo_label"]


def load_images(path: str | os.PathLike[str], shape: tuple[int, int, int]) -> tuple[np.ndarray, torch.Tensor]:
    """The raw `images` array of an .npz and the same images as a float (N, C, H, W) tensor in [0, 1]."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            raw = archive["images"]
    except (OSError, KeyError, ValueError) as exc:
        raise SmoothAdvError(f"cannot read {path} as an .npz with an 'images' array: {exc}") from None
    if raw.dtype != np.uint8 and raw.dtype.kind != "f":  # strings, objects, bools, other integers, complex
        raise SmoothAdvError(f"{path}: images must be uint8 (0..255) or float (in [0, 1]), got dtype {raw.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("=")))
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() == 4 and tuple(tensor.shape[1:]) != shape and tensor.shape[-1] == shape[0]:
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.dim() != 4 or tuple(tensor.shape[1:]) != shape:
        raise SmoothAdvError(f"{path}: images have shape {tuple(raw.shape)}, expected (N, {shape[1]}, {shape[2]}"
                             f"{', ' + str(shape[0]) if shape[0] > 1 else ''}) or (N, {', '.join(map(str, shape))})")
    if tensor.dtype == torch.uint8:
        return raw, tensor.float() / 255.0
    tensor = tensor.float()
    if tensor.numel() and (not bool(torch.isfinite(tensor).all()) or float(tensor.min()) < 0
                           or float(tensor.max()) > 1):
        raise SmoothAdvError(f"{path}: float images must be finite and in [0, 1]")
    return raw, tensor


def pseudo_label(checkpoint: str | os.PathLike[str], images: str | os.PathLike[str], out: str | os.PathLike[str],
                 *, batch_size: int = 1000, device: str = "cpu", normalization: str | None = None,
                 force: bool = False) -> int:
    """Write `out` (.npz: the input `images` and the base classifier's `labels`); returns the image count.
    `out` must not exist unless `force`, and is never the checkpoint or the images (even with `force`)."""

    out_path = check_new_output(out, force=force, inputs=[checkpoint, images], flag="--out")  # never an input
    dev = resolve_device(device)
    model, meta = load_checkpoint(checkpoint, dev, normalization=normalization)
    raw, tensor = load_images(images, input_shape(meta["dataset"]))
    labels = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(tensor), batch_size):
            labels.append(model(tensor[start:start + batch_size].to(dev)).argmax(1).cpu())
    label_array = (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).numpy().astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, images=raw, labels=label_array)
    atomic_write_bytes(out_path, buffer.getvalue())
    return len(label_array)
