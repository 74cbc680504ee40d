"""Certify and predict over a dataset, streaming one result row per example into a resumable TSV.

Row formats are Cohen et al.'s, so their and Salman et al.'s published logs and ours are read by
the same `report` code:

    certify:  idx  label  predict  radius  correct  time
    predict:  idx  label  predict  correct  time
    attack:   idx  label  predict  correct  eps  norm  time   (PREDICT after a SmoothAdv attack)
    smooth-prediction:  idx  label  predict  correct  counts  time   (CAT-RS's smoothed prediction)

`time` is a `datetime.timedelta` string as in Cohen's scripts; `radius` is rounded *down* to 6
decimals so that rounding never enlarges a certificate.

`time` of certify rows is a per-group average: when one example's n0 + n samples do not fill a
`--batch`, consecutive examples are certified together in shared forward passes (up to 64 per group,
about 8 full batches), and each row of the group gets the group's time divided by its size, so rows
certified together show the same time. The column's sum over a run is the run's certification time;
a single row's value is not that example's own cost. predict and attack rows are timed one by one.

Randomness: each example's noise comes from its own generator seeded by (seed, dataset index),
so a row does not depend on which other examples were run, in which order, or on how many
workers shared the work (`--shard`, torchrun): a sharded, resumed or re-run evaluation gives the
same rows as one uninterrupted run.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from .attacks import Attack
from .errors import SmoothAdvError
from .files import read_tsv
from .rundir import read_settings
from .seeds import example_generator
from .smoothing import ABSTAIN, PackedSampler, SampleRequest, Smooth, SoftSmoothed, eval_mode

__all__ = [
    "ATTACK_COLUMNS", "AttackRow", "CERTIFY_COLUMNS", "CertifyRow", "PREDICT_COLUMNS", "PredictRow",
    "SMOOTH_PREDICTION_COLUMNS", "SmoothPredictionRow", "attack_dataset", "certify_dataset", "format_radius",
    "format_time", "predict_dataset", "read_smooth_prediction", "row_fields", "smooth_prediction_dataset",
]

CERTIFY_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "radius", "correct", "time")
PREDICT_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "correct", "time")


class CertifyRow(NamedTuple):
    idx: int
    label: int
    predict: int
    radius: float
    correct: int
    time: str


class PredictRow(NamedTuple):
    idx: int
    label: int
    predict: int
    correct: int
    time: str


def format_time(seconds: float) -> str:
    """Cohen's time column: str(datetime.timedelta(seconds=...)), e.g. '0:00:14.172309'."""
    return str(datetime.timedelta(seconds=seconds))


def format_radius(radius: float) -> str:
    """Radius rounded down to 6 decimals (never up, so the logged certificate stays valid)."""
    return f"{math.floor(radius * 1e6) / 1e6:.6f}"


def _load_example(dataset: Dataset, index: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Example `index` of a dataset of `(input tensor, integer label)` pairs, the input moved to `device`.

    Anything else is a one-line SmoothAdvError saying what the dataset returned and what to add (a
    torchvision dataset without `transforms.ToTensor()` returns PIL images)."""
    item = dataset[index]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise SmoothAdvError(f"dataset[{index}] must be an (input, label) pair, got {type(item).__name__}"
                             + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))
    x, label = item
    if not isinstance(x, torch.Tensor):
        hint = ("add transforms.ToTensor() to the dataset's transform (a torchvision dataset without it returns PIL "
                "images)" if type(x).__module__.startswith("PIL") or hasattr(x, "getpixel")
                else "convert it with torch.as_tensor (images as floats (C, H, W) in [0, 1])")
        raise SmoothAdvError(f"dataset[{index}] returned a {type(x).__module__}.{type(x).__name__} as its input, "
                             f"not a torch.Tensor: {hint}")
    try:
        number = int(label)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several elements
        number = None
    if number is None or bool(number != label):
        raise SmoothAdvError(f"dataset[{index}] must have an integer class label, got {label!r:.60}")
    return x.to(device), number


def certify_dataset(smooth: Smooth, dataset: Dataset, indices: Iterable[int], *, n0: int, n: int, alpha: float,
                    batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> Iterator[CertifyRow]:
    """Run CERTIFY on each dataset example in `indices`; yields one `CertifyRow` per example.

    When one example's n0 + n samples do not fill a batch, consecutive examples are certified
    together (`Smooth.certify_many`) so every forward pass is a full batch; each row is still
    exactly the one a lone `certify` with that example's generator gives. The `time` column is
    then the group's time divided equally among its examples.
    """
    device = torch.device(device)
    group = max(1, min(64, -(-8 * batch_size // (n0 + n))))  # about 8 full batches per group when n is small
    todo = list(indices)
    for start in range(0, len(todo), group):
        chunk = todo[start:start + group]
        examples = [_load_example(dataset, index, device) for index in chunk]
        started = time.time()
        certificates = smooth.certify_many([x for x, _ in examples], n0, n, alpha, batch_size,
                                           [example_generator(seed, index, device) for index in chunk])
        elapsed = (time.time() - started) / len(chunk)
        for index, (_, label), (prediction, radius) in zip(chunk, examples, certificates):
            yield CertifyRow(index, label, int(prediction), radius, int(prediction == label), format_time(elapsed))


def predict_dataset(smooth: Smooth, dataset: Dataset, indices: Iterable[int], *, n: int, alpha: float,
                    batch_size: int, seed: int = 0, device: torch.device | str = "cpu") -> Iterator[PredictRow]:
    """Run PREDICT on each dataset example in `indices`; yields one `PredictRow` per example."""
    device = torch.device(device)
    for index in indices:
        x, label = _load_example(dataset, index, device)
        started = time.time()
        prediction = smooth.predict(x, n, alpha, batch_size, generator=example_generator(seed, index, device))
        elapsed = time.time() - started
        yield PredictRow(index, label, prediction, int(prediction == label and prediction != ABSTAIN),
                         format_time(elapsed))


# ------------------------------------------------------------------ the smoothed prediction (CAT-RS)

SMOOTH_PREDICTION_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "correct", "counts", "time")


class SmoothPredictionRow(NamedTuple):
    idx: int
    label: int
    predict: int   # the most frequent class among the n votes (no test, no abstention)
    correct: int   # 1 iff predict == label
    counts: str    # the n votes per class, comma-separated (K integers)
    time: str


def smooth_prediction_dataset(smooth: Smooth, dataset: Dataset, indices: Iterable[int], *, n: int, batch_size: int,
                              seed: int = 0, device: torch.device | str = "cpu") -> Iterator[SmoothPredictionRow]:
    """The vote counts of the base classifier on n noisy copies of each example in `indices`.

    This is CAT-RS's precomputed "smoothed prediction" (Jeong, Kim & Shin, AAAI 2023, `smooth_prediction.py`
    with `Smooth.confidence_top2`): pi_i = counts_i / n, the hard-vote frequencies of f under N(0, sigma^2 I)
    noise, later the target of CAT-RS's training (`read_smooth_prediction`, `objectives.CATRS`). The
    original computes it on the training split with n = 10,000 from a Gaussian-trained model at sigma =
    0.25. Each example's noise comes from its own generator seeded by (seed, index), so the rows do not
    depend on sharding or resumption; several examples share forward passes when n is below the batch.
    Cost: n forward passes per example (no backward).
    """
    device = torch.device(device)
    group = max(1, min(64, -(-8 * batch_size // n)))
    todo = list(indices)
    sampler = PackedSampler(smooth.sampler)
    for start in range(0, len(todo), group):
        chunk = todo[start:start + group]
        examples = [_load_example(dataset, index, device) for index in chunk]
        started = time.time()
        requests = [SampleRequest(x, (int(n),), example_generator(seed, index, device))
                    for index, (x, _) in zip(chunk, examples)]
        counts = sampler.counts(requests, batch_size).cpu()
        elapsed = (time.time() - started) / len(chunk)
        for index, (_, label), votes in zip(chunk, examples, counts):
            top = int(votes.argmax())
            yield SmoothPredictionRow(index, label, top, int(top == label), ",".join(str(int(v)) for v in votes),
                                      format_time(elapsed))


def read_smooth_prediction(path: str | Path, size: int | None = None) -> torch.Tensor:
    """pi (size, K) float32 from a `smooth-prediction` TSV: row i = counts / n of training example i.

    Examples without a row stay uniform (1/K), as in the original. `size` defaults to the dataset size
    recorded next to the file (`OUT.args.json`), else the largest index + 1. SmoothAdvError (one line)
    for a missing or malformed file, one computed on another split than train, and, by what its sidecar
    records, a shard (merge the shards first) or an unfinished file (fewer rows than its selection)."""
    path = Path(path)
    if not path.exists():
        raise SmoothAdvError(f"smoothed prediction {path} does not exist; compute it with smoothadv smooth-prediction")
    recorded = read_settings(path) or {}
    if recorded.get("split", "train") != "train":
        raise SmoothAdvError(f"{path} was computed on the {recorded['split']} split; CAT-RS needs the train split")
    shard = recorded.get("shard")
    if isinstance(shard, list) and len(shard) == 2:
        raise SmoothAdvError(f"{path} is shard {shard[0]} of {shard[1]} of a smooth-prediction run: the examples of "
                             "the other shards would stay uniform; merge the shards (smoothadv merge) and give the "
                             "merged file")
    head, rows = read_tsv(path)
    expected = _selected_count(recorded)
    if expected is not None and len(rows) < expected:
        raise SmoothAdvError(f"{path} is unfinished: {len(rows)} of the {expected} examples its run selected have a "
                             "row (the others would stay uniform); finish it with smooth-prediction --resume")
    columns = head.split("\t")
    if "idx" not in columns or "counts" not in columns:
        raise SmoothAdvError(f"{path} is not a smooth-prediction TSV (its header lacks idx or counts)")
    try:
        parsed = [(int(row[columns.index("idx")]), [int(v) for v in row[columns.index("counts")].split(",")])
                  for row in rows]
    except (ValueError, IndexError):
        raise SmoothAdvError(f"{path} has a malformed row") from None
    if not parsed:
        raise SmoothAdvError(f"{path} has no rows")
    classes = len(parsed[0][1])
    total = size if size is not None else int(recorded.get("dataset_size") or max(i for i, _ in parsed) + 1)
    pi = torch.full((total, classes), 1.0 / classes)
    for index, counts in parsed:
        if len(counts) != classes or not 0 <= index < total or sum(counts) <= 0 or min(counts) < 0:
            raise SmoothAdvError(f"{path}: bad row for idx {index}")
        pi[index] = torch.tensor(counts, dtype=torch.float64).div(sum(counts)).float()
    return pi


def _selected_count(recorded: dict[str, Any]) -> int | None:
    """How many examples a run with these recorded settings selects (`dataset_size`, `skip`, `max`), or None when
    the record does not say (no sidecar, or one written by hand)."""
    values = [recorded.get("dataset_size"), recorded.get("skip", 1), recorded.get("max")]
    if values[2] is None:
        values[2] = values[0]
    counts = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 1]
    if len(counts) != 3:
        return None
    size, skip, most = counts
    return min(len(range(0, size, skip)), most)


def row_fields(row: NamedTuple) -> list[str]:
    """A result row as TSV fields (radius rounded down)."""
    return [format_radius(v) if name == "radius" else str(v) for name, v in zip(row._fields, row)]


# ------------------------------------------------------------------ empirical robustness (SmoothAdv attack)

ATTACK_COLUMNS: tuple[str, ...] = ("idx", "label", "predict", "correct", "eps", "norm", "time")


class AttackRow(NamedTuple):
    idx: int
    label: int
    predict: int      # PREDICT on the adversarial input (ABSTAIN = -1)
    correct: int      # 1 iff predict == label (an abstention counts as wrong)
    eps: float        # the attack's L2 budget
    norm: float       # the actual ||x_adv - x||_2 (<= eps)
    time: str


def attack_dataset(smooth: Smooth, attack: Attack, dataset: Dataset, indices: Iterable[int], *, m: int, n: int,
                   alpha: float, batch_size: int, seed: int = 0, device: torch.device | str = "cpu",
                   base_attack: bool = False) -> Iterator[AttackRow]:
    """Empirical robustness of the smoothed classifier g (Salman et al. 2019, Section 5).

    For each example: attack the smoothed soft classifier G estimated with `m` noise draws that stay
    fixed over the attack's steps (`SoftSmoothed`), then run PREDICT on x_adv with `n` fresh noise
    draws at level `alpha`. With `base_attack` the attack sees the base classifier f alone, without
    noise (the "vanilla PGD" baseline of the paper). The model is attacked in eval mode (its mode
    restored). Each example's noise comes from its own generator seeded by (seed, index), so rows
    do not depend on order, sharding or resumption. Empirical accuracy (mean of `correct`) at eps
    is an upper bound on certified accuracy at radius eps only up to the attack's strength.
    """
    if int(m) != m or m < 1:
        raise SmoothAdvError(f"m (noise draws in the attack) must be an integer >= 1, got {m}")
    device = torch.device(device)
    base = smooth.base_classifier
    for index in indices:
        x, label = _load_example(dataset, index, device)
        generator = example_generator(seed, index, device)
        started = time.time()
        batch, target = x.unsqueeze(0), torch.tensor([label], device=device)
        with eval_mode(base):
            if base_attack:
                model = base
            else:
                noise = torch.randn((1, int(m), *x.shape), device=device, dtype=x.dtype, generator=generator)
                model = SoftSmoothed(base, noise * smooth.sigma)
            x_adv = attack(model, batch, target, generator)[0].detach()
        if not bool(torch.isfinite(x_adv).all()):  # else PREDICT would blame the input for the overflow
            hint = f"; sigma = {smooth.sigma:g} is far outside [0, 1]-pixel units" if smooth.sigma > 1e3 else ""
            raise SmoothAdvError(f"the attack on example {index} overflowed: the attacked image has NaN or Inf "
                                 f"values because the base classifier's outputs or gradients were not finite{hint}")
        prediction = smooth.predict(x_adv, n, alpha, batch_size, generator=generator)
        elapsed = time.time() - started
        norm = float((x_adv - x).flatten().norm())
        yield AttackRow(index, label, prediction, int(prediction == label and prediction != ABSTAIN),
                        float(attack.eps), round(norm, 6), format_time(elapsed))
