"""Read result TSVs and turn them into certified-accuracy tables and plots.

Inputs are the per-example TSVs of `smoothadv certify` / `predict` / `attack` and the published
logs of Cohen et al. and Salman et al., which share the columns (extra columns are ignored):

    certify:           idx  label  predict  radius  correct  time
    sequential certify: the same, then  samples  mode  (`samples` was `n` before smoothadv 0.2)
    predict / attack:  idx  label  predict  correct  [eps  norm]  time   (Salman's adds basePredict)

`time` may be a `datetime.timedelta` string (`0:00:14.172309`, Cohen's scripts and ours) or float
seconds (`15.4`, Cohen's released data files); radii may have any precision (Salman's logs use 4
decimals). Abstentions (predict = -1) always count as wrong.

Metrics (Cohen et al. 2019, Section 4; Salman et al. 2019, Section 5):
- approximate certified accuracy at r: fraction of rows with correct = 1 and radius >= r;
- the envelope: at each r the maximum over several models (ties broken by the higher clean
  accuracy, i.e. certified accuracy at r = 0), which is how the papers' headline tables are built;
- average certified radius (ACR, Zhai et al. 2020), abstention rate;
- optionally Cohen's high-probability correction (`stats.high_prob_certified_accuracy`);
- optionally a 95% Clopper-Pearson interval on each certified accuracy over the test images
  (`stats.clopper_pearson_interval` on the count of certified images; `--ci`): the uncertainty that
  comes from evaluating on a finite sample of test images (500 images: about +-4 pp at 80%), not
  from the Monte Carlo certification (which alpha covers);
- empirical accuracy of an attack TSV at each eps (an upper bound on robust accuracy, where the
  certified accuracy is a lower bound).

Matplotlib is imported only inside `plot_accuracy`, through the object-oriented Figure API with
the Agg canvas, so importing this module never touches a display or the global backend.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from .errors import SmoothAdvError
from .files import atomic_write_bytes, atomic_write_text, read_tsv
from .settings import DemoConfig, read_toml
from .smoothing import Certificate
from .stats import (
    ABSTAIN,
    average_certified_radius,
    certified_accuracy,
    clopper_pearson_interval,
    high_prob_certified_accuracy,
    holm_adjust,
    max_certifiable_radius,
    mcnemar_exact,
    mean_interval,
    radius_grid,
)

__all__ = [
    "COST_NOTE", "DEMO_REPORT_TITLE", "Comparison", "Cost", "FORMATS", "Format", "OUTSIDE_NOTE", "PLOT_FORMATS",
    "Published", "Results", "Row", "RowCost", "SEQUENTIAL_MARK", "SEQUENTIAL_NOTE", "Table", "certified_curve",
    "certified_by_image", "certified_intervals", "certified_radii", "compare", "compare_to_first", "default_radii",
    "demo_table", "describe_comparison", "dkw_halfwidth", "duration", "empirical_curve", "envelope",
    "format_comparison", "format_table", "load_costs", "load_published", "load_results", "merge", "paired_text",
    "parse_seconds", "plot_accuracy", "plot_format", "plot_radius_cdf", "recipe_sigma", "recorded_seconds", "summarize",
    "write_demo_report",
]

Format = Literal["markdown", "latex", "csv"]
FORMATS: tuple[str, ...] = ("markdown", "latex", "csv")

_TIMEDELTA = re.compile(r"^(?:(-?\d+) days?, )?(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def _integers(values: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
    """Labels or predictions given as a list, an array or a tensor, as a flat int64 array."""
    return np.asarray(values.tolist() if isinstance(values, Tensor) else values, dtype=np.int64).reshape(-1)


@dataclass(frozen=True)
class Results:
    """The rows of one result TSV as arrays (one entry per example).

    `kind` is "certify" when the file has a `radius` column, else "attack" (predict and attack
    files: `eps` is 0 for every row when the file has no `eps` column, i.e. clean PREDICT).
    `correct` is 1 only for a non-abstaining correct prediction. `sequential` says the radii come from a
    sequential test (`smoothadv certify --mode sequential`, or `SequentialCertificate`s): each is the bound
    where the test stopped, exact for the decisions at the radii the test settles and a lower bound elsewhere.
    `samples` is the noise samples (forward passes) each row used, when the file records them (the `samples`
    column of sequential certify files, `n` in files written before smoothadv 0.2), else None.

    Results held in memory make the same tables and plots as files: `Results.from_certificates(certificates,
    labels)` and `Results.from_predictions(predictions, labels, eps)`.
    """

    path: Path
    kind: Literal["certify", "attack"]
    idx: np.ndarray
    label: np.ndarray
    predict: np.ndarray
    correct: np.ndarray
    radius: np.ndarray | None
    eps: np.ndarray | None
    seconds: np.ndarray | None
    sequential: bool = False
    samples: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.idx)

    @classmethod
    def from_certificates(cls, certificates: Sequence[Certificate], labels: Sequence[int] | np.ndarray | Tensor, *,
                          name: str = "certificates in memory") -> Results:
        """The results of `certificates` (from `Smooth.certify`, `certify_many` or `certify_sequential`) of
        examples with true `labels`, in that order (idx 0, 1, ...). `name` stands in for the file path in messages."""
        labels_a = _integers(labels)
        if len(certificates) != len(labels_a) or not len(labels_a):
            raise SmoothAdvError(f"give one label per certificate (and at least one): got {len(certificates)} "
                                 f"certificates and {len(labels_a)} labels")
        if not all(isinstance(c, Certificate) for c in certificates):
            raise SmoothAdvError("from_certificates takes Certificate objects (what Smooth.certify returns)")
        predict = np.array([int(c.prediction) for c in certificates], dtype=np.int64)
        radius = np.array([float(c.radius) for c in certificates])
        correct = ((predict == labels_a) & (predict != ABSTAIN)).astype(np.int64)
        sequential = any(hasattr(c, "stop") for c in certificates)
        samples = np.array([c.samples for c in certificates], dtype=np.int64)
        return cls(Path(name), "certify", np.arange(len(labels_a)), labels_a, predict, correct, radius, None, None,
                   sequential, samples)

    @classmethod
    def from_predictions(cls, predictions: Sequence[int] | np.ndarray | Tensor,
                         labels: Sequence[int] | np.ndarray | Tensor, eps: float | Sequence[float] = 0.0, *,
                         name: str = "predictions in memory") -> Results:
        """The results of PREDICT (`Smooth.predict`; ABSTAIN = -1) on examples with true `labels`, attacked at
        radius `eps` (one value, or one per prediction), for the empirical rows of tables and plots."""
        predict, labels_a = _integers(predictions), _integers(labels)
        if len(predict) != len(labels_a) or not len(labels_a):
            raise SmoothAdvError(f"give one label per prediction (and at least one): got {len(predict)} predictions "
                                 f"and {len(labels_a)} labels")
        eps_a = np.broadcast_to(np.asarray(eps, dtype=float), predict.shape).copy()
        correct = ((predict == labels_a) & (predict != ABSTAIN)).astype(np.int64)
        return cls(Path(name), "attack", np.arange(len(labels_a)), labels_a, predict, correct, None, eps_a, None)

    def restricted(self, images: Iterable[int]) -> Results:
        """The rows whose `idx` is among `images`, in the file's order (e.g. the images two runs share, for a
        comparison on the same images)."""
        mask = np.isin(self.idx, np.fromiter(images, dtype=np.int64))

        def cut(column: np.ndarray | None) -> np.ndarray | None:
            return None if column is None else column[mask]

        return replace(self, idx=self.idx[mask], label=self.label[mask], predict=self.predict[mask],
                       correct=self.correct[mask], radius=cut(self.radius), eps=cut(self.eps),
                       seconds=cut(self.seconds), samples=cut(self.samples))

    @property
    def abstain_rate(self) -> float:
        """Fraction of rows where the smoothed classifier abstained."""
        return float(np.mean(self.predict == ABSTAIN))

    @property
    def clean_accuracy(self) -> float:
        """Fraction of rows predicted correctly (for certify files: certified accuracy at radius 0)."""
        return float(np.mean(self.correct))


def parse_seconds(text: str) -> float:
    """Seconds from a timedelta string ('0:00:14.17', '1 day, 2:00:00') or a float ('15.4')."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        match = _TIMEDELTA.match(text)
        if match is None:
            raise ValueError(f"not a duration: {text!r}") from None
        days, hours, minutes, seconds = match.groups()
        value = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if not math.isfinite(value):
        raise ValueError(f"not a duration: {text!r}")
    return value


def recorded_seconds(path: str | Path, column: str = "time") -> float:
    """The time a run's TSV records: the sum of its `column`, in seconds (a training `log.tsv`'s seconds, or an
    evaluation's H:MM:SS.ffffff: `parse_seconds`); 0 when the file does not exist. SmoothAdvError (one line) for
    a file without that column or with a value that is not a duration."""
    if not Path(path).exists():
        return 0.0
    header, rows = read_tsv(path)
    if column not in header.split("\t"):
        raise SmoothAdvError(f"{path} has no {column!r} column")
    at = header.split("\t").index(column)
    try:
        return sum(parse_seconds(row[at]) for row in rows)
    except ValueError as exc:
        raise SmoothAdvError(f"{path}: column {column!r}: {exc}") from None


def _split(line: str) -> list[str]:
    return line.split("\t") if "\t" in line else line.split()


def load_results(path: str | Path) -> Results:
    """Parse one certify, predict or attack TSV (see the module docstring for the formats).

    Raises SmoothAdvError (one line, naming the file and the line) for a missing, empty, headerless
    or malformed file, and for a file with two rows of one example (same idx, and same eps in an
    attack file), which would be counted twice.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SmoothAdvError(f"result file {file} does not exist") from None
    except IsADirectoryError:
        raise SmoothAdvError(f"result file {file} is a directory") from None
    except UnicodeDecodeError:
        raise SmoothAdvError(f"result file {file} is not a text TSV") from None
    except OSError as exc:
        raise SmoothAdvError(f"cannot read result file {file}: {exc.strerror or exc}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise SmoothAdvError(f"result file {file} is empty")
    header = [name.strip() for name in _split(lines[0])]
    missing = [c for c in ("label", "predict", "correct") if c not in header]
    if missing:
        raise SmoothAdvError(f"{file} is not a certify/predict TSV: its header {' '.join(header)!r} lacks "
                             f"{', '.join(missing)}")
    if len(lines) == 1:
        raise SmoothAdvError(f"result file {file} has a header but no rows")
    columns: dict[str, list[str]] = {name: [] for name in header}
    for number, line in enumerate(lines[1:], start=2):
        fields = _split(line)
        if len(fields) != len(header):
            raise SmoothAdvError(f"{file}, line {number}: {len(fields)} fields, the header has {len(header)} "
                                 "(corrupt or truncated file?)")
        for name, value in zip(header, fields):
            columns[name].append(value)
    rows = len(lines) - 1

    def numbers(name: str, kind: type) -> np.ndarray:
        try:
            values = np.array([kind(float(v)) if kind is int else kind(v) for v in columns[name]])
        except (ValueError, OverflowError):
            bad = next(v for v in columns[name] if not _parses(v, kind))
            raise SmoothAdvError(f"{file}: column {name!r} has a non-numeric value {bad!r}") from None
        if kind is float and not np.all(np.isfinite(values)):
            raise SmoothAdvError(f"{file}: column {name!r} has a non-finite value")
        return values

    predict = numbers("predict", int)
    label = numbers("label", int)
    correct = numbers("correct", int)
    if not np.all((correct == 0) | (correct == 1)):
        raise SmoothAdvError(f"{file}: column 'correct' must hold 0 or 1")
    correct = correct * (predict != ABSTAIN)
    idx = numbers("idx", int) if "idx" in columns else np.arange(rows)
    radius = numbers("radius", float) if "radius" in columns else None
    if radius is not None and np.any(radius < 0):
        raise SmoothAdvError(f"{file}: column 'radius' has a negative value")
    eps = None
    if radius is None:
        eps = numbers("eps", float) if "eps" in columns else np.zeros(rows)
    _refuse_repeated_examples(file, idx, eps)
    seconds = None
    if "time" in columns:
        try:
            seconds = np.array([parse_seconds(v) for v in columns["time"]])
        except ValueError as exc:
            raise SmoothAdvError(f"{file}: column 'time': {exc}") from None
    sequential = "mode" in columns and any(v.startswith(("sequential", "betting")) for v in columns["mode"])
    samples_column = "samples" if "samples" in columns else "n" if sequential and "n" in columns else None
    samples = None if samples_column is None else numbers(samples_column, int)
    return Results(file, "certify" if radius is not None else "attack", idx, label, predict, correct, radius, eps,
                   seconds, sequential, samples)


def _refuse_repeated_examples(file: Path, idx: np.ndarray, eps: np.ndarray | None) -> None:
    """SmoothAdvError naming the first example (idx, and eps in an attack file) that has two rows:
    counting it twice would skew every accuracy (a file of one run has each example once)."""
    seen: dict[tuple[int, float], int] = {}
    keys = zip(idx.tolist(), eps.tolist() if eps is not None else [0.0] * len(idx))
    for line, key in enumerate(keys, start=2):
        if key in seen:
            where = f"idx {key[0]}" + (f" at eps {key[1]:g}" if eps is not None and np.any(eps) else "")
            raise SmoothAdvError(f"{file}: {where} has two rows (lines {seen[key]} and {line}); each example must "
                                 "count once: remove the duplicate row")
        seen[key] = line


def _parses(text: str, kind: type) -> bool:
    try:
        value = float(text)
        if kind is int:
            int(value)
        else:
            kind(text)
    except (ValueError, OverflowError):
        return False
    return True


def merge(parts: Sequence[Results]) -> Results:
    """Concatenate the rows of several files of the same kind (e.g. the shards of one certify run). The merged
    `path` names every part ("a.tsv + b.tsv"), so a message about the merged results points at all its files.

    Raises SmoothAdvError if the kinds differ or an example appears twice (at the same eps).
    """
    if not parts:
        raise SmoothAdvError("no result files to merge")
    if len(parts) == 1:
        return parts[0]
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        raise SmoothAdvError(f"cannot merge certify and attack files: {', '.join(str(p.path) for p in parts)}")

    def cat(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    def joined(name: str) -> np.ndarray:  # a column every file has
        return np.concatenate([getattr(p, name) for p in parts])

    merged = Results(Path(" + ".join(str(p.path) for p in parts)), parts[0].kind, joined("idx"), joined("label"),
                     joined("predict"), joined("correct"), cat("radius"), cat("eps"), cat("seconds"),
                     any(p.sequential for p in parts), cat("samples"))
    keys = list(zip(merged.idx.tolist(), (merged.eps if merged.eps is not None else merged.idx * 0).tolist()))
    if len(set(keys)) != len(keys):
        raise SmoothAdvError(f"example indices repeat across {', '.join(str(p.path) for p in parts)}")
    return merged


def certified_curve(results: Results, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """Approximate certified accuracy of a certify file at each radius (abstentions count as wrong)."""
    if results.radius is None:
        raise SmoothAdvError(f"{results.path} has no radius column (is it a predict/attack file?)")
    return certified_accuracy(results.radius, results.correct, radii)


def empirical_curve(results: Results) -> tuple[np.ndarray, np.ndarray]:
    """(eps values, empirical accuracy at each) of an attack/predict file, eps sorted ascending."""
    if results.eps is None:
        raise SmoothAdvError(f"{results.path} is a certify file, not an attack/predict file")
    eps_values = np.unique(results.eps)
    accuracy = np.array([results.correct[results.eps == e].mean() for e in eps_values])
    return eps_values, accuracy


# ------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Row:
    """One table row: accuracy (fraction) at each radius, or None where not measured.

    kind: "certified", "high-prob" (Cohen's corrected lower bound), "empirical" (attack) or
    "envelope" (then `models` / `model_clean` name the chosen model and its clean accuracy per radius).
    `intervals` (certified rows, with `ci`): the (low, high) confidence interval of each value over
    the `count` test images.
    """

    name: str
    kind: str
    values: tuple[float | None, ...]
    count: int
    acr: float | None = None
    abstain: float | None = None
    models: tuple[str, ...] | None = None
    model_clean: tuple[float, ...] | None = None
    intervals: tuple[tuple[float, float], ...] | None = None  # 95% Clopper-Pearson per radius (--ci)
    outside: tuple[bool, ...] | None = None  # published rows: value outside the measured row's interval
    cost: RowCost | None = None  # certified rows with a training cost (--cost)
    sequential: bool = False  # certified rows of a sequential test (radii: where the test stopped)


@dataclass(frozen=True)
class Cost:
    """A method's measured training cost, CPU-seconds per epoch, and optionally its cost model: the cost per
    epoch that model predicts, in units of the baseline's epoch (one row of a `report --cost` TSV)."""

    seconds: float
    model: float | None = None
    formula: str = ""


@dataclass(frozen=True)
class RowCost:
    """The cost columns of a certified row: CPU-s per epoch, the ratio to the baseline (the cost file's first
    method), and that ratio divided by the method's cost model (None without a model)."""

    seconds: float
    ratio: float
    vs_model: float | None


def load_costs(path: str | Path) -> dict[str, Cost]:
    """The training costs of a TSV with a header naming the columns `name` and `cpu_s_per_epoch`, optionally
    `model` (the cost model's prediction, in baseline epochs) and `formula` (its text); other columns are
    ignored. The first row is the baseline that `summarize` divides by. A missing file or column, a repeated
    name, or a value that is not a positive number is a one-line SmoothAdvError."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.startswith("#")]
    except OSError as exc:
        raise SmoothAdvError(f"cannot read the cost file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SmoothAdvError(f"the cost file {path} is not a UTF-8 text TSV") from None
    if not lines:
        raise SmoothAdvError(f"the cost file {path} is empty")
    header = lines[0].split("\t")
    for column in ("name", "cpu_s_per_epoch"):
        if column not in header:
            raise SmoothAdvError(f"the cost file {path} has no {column!r} column (header: {' '.join(header)})")
    costs: dict[str, Cost] = {}

    def positive(text: str, what: str, line: int) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise SmoothAdvError(f"{path} line {line}: {what} must be a positive number, got {text!r}")
        return value

    for number, line in enumerate(lines[1:], start=2):
        cells = dict(zip(header, line.split("\t")))
        name = cells.get("name", "")
        if not name:
            raise SmoothAdvError(f"{path} line {number}: no name")
        if name in costs:
            raise SmoothAdvError(f"{path} line {number}: {name!r} is listed twice")
        model = cells.get("model", "")
        costs[name] = Cost(positive(cells.get("cpu_s_per_epoch", ""), "cpu_s_per_epoch", number),
                           positive(model, "model", number) if model else None, cells.get("formula", ""))
    if not costs:
        raise SmoothAdvError(f"the cost file {path} has a header but no rows")
    return costs


@dataclass(frozen=True)
class Published:
    """Published certified accuracy (fractions) at some radii, and the published ACR: the `[paper]` section of
    a recipe (`configs/**/*.toml`), as compared with a measured certify file by `report --published`."""

    radii: tuple[float, ...]
    certified: tuple[float, ...]
    acr: float | None
    source: str
    #: the published model's name when it is not the recipe's own (e.g. "SmoothAdv T10 m4" published beside a
    #: T2 m1 recipe); the row is then "<label> (published)" instead of "<NAME> (published)"
    label: str | None = None
    #: the noise level the published numbers were certified at (the recipe's), compared with the measurement's
    sigma: float | None = None

    def row_name(self, name: str) -> str:
        """The name of this published row, in the table and the plot, when compared with the certify row `name`."""
        return f"{self.label or name} (published)"

    def at(self, radius: float) -> float | None:
        """The published value at `radius` (None when the paper has no column there)."""
        for r, value in zip(self.radii, self.certified):
            if abs(r - radius) <= 1e-9:
                return value
        return None


def load_published(path: str | Path) -> Published:
    """The `[paper]` section of a recipe: `radii`, `certified` (fractions), optional `acr`, `source` and `label`.
    A file without published numbers, or with malformed ones, is a one-line SmoothAdvError."""

    paper = read_toml(path).get("paper")
    if not isinstance(paper, dict):
        raise SmoothAdvError(f"{path} has no [paper] section with published numbers")
    radii, certified = paper.get("radii"), paper.get("certified")
    if (not isinstance(radii, list) or not isinstance(certified, list) or not radii or len(radii) != len(certified)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*radii, *certified])):
        raise SmoothAdvError(f"{path}: [paper] needs radii and certified, two equally long non-empty lists of numbers")
    if not all(0 <= v <= 1 for v in certified) or not all(r >= 0 for r in radii):
        raise SmoothAdvError(f"{path}: [paper] certified must be fractions in [0, 1] and radii >= 0")
    if not all(math.isfinite(v) for v in [*radii, *certified]):
        raise SmoothAdvError(f"{path}: [paper] radii and certified must be finite numbers")
    acr = paper.get("acr")
    if acr is not None and (isinstance(acr, bool) or not isinstance(acr, (int, float)) or not math.isfinite(acr)
                            or acr < 0):
        raise SmoothAdvError(f"{path}: [paper] acr must be a finite number >= 0, got {acr!r}")
    label = paper.get("label")
    if label is not None and (not isinstance(label, str) or not label.strip()
                              or any(not c.isprintable() for c in label)):
        raise SmoothAdvError(f"{path}: [paper] label must be a non-empty one-line string, got {label!r}")
    sigma = recipe_sigma(path)
    return Published(tuple(float(r) for r in radii), tuple(float(v) for v in certified),
                     None if acr is None else float(acr), str(paper.get("source", path)), label, sigma)


def recipe_sigma(path: str | Path) -> float | None:
    """The noise level a recipe certifies at (`[certify] sigma`, else its training `sigma`), or None."""
    values = read_toml(path)
    certify = values.get("certify")
    sigma = certify.get("sigma") if isinstance(certify, dict) else None
    sigma = values.get("sigma") if sigma is None else sigma
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        return None
    return float(sigma)


@dataclass(frozen=True)
class Table:
    radii: tuple[float, ...]
    rows: tuple[Row, ...]


def envelope(curves: Mapping[str, np.ndarray], clean: Mapping[str, float]) -> tuple[np.ndarray, list[str]]:
    """Best-of-several certified accuracy at each radius and the model that attains it.

    `curves[name][j]` is model `name`'s accuracy at radius j; ties go to the model with the higher
    `clean[name]` (then to the first given), as in Salman et al.'s envelope tables.
    """
    if not curves:
        raise SmoothAdvError("the envelope needs at least one certify file")
    names = list(curves)
    stacked = np.stack([np.asarray(curves[n], dtype=float) for n in names])  # (models, radii)
    best_names: list[str] = []
    for j in range(stacked.shape[1]):
        top = stacked[:, j].max()
        tied = [i for i in range(len(names)) if stacked[i, j] == top]
        best_names.append(names[max(tied, key=lambda i: (clean[names[i]], -i))])
    return stacked.max(axis=0), best_names


def certified_intervals(results: Results, radii: Sequence[float] | np.ndarray,
                        level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson interval (low, high) at `level` of the certified accuracy at each radius, over the
    test images: the count of certified-and-correct images is Binomial(N, p) for N images drawn from the
    test distribution, p the smoothed classifier's true certified accuracy at r (given the certification's
    outcomes)."""
    counts = np.round(certified_curve(results, radii) * len(results)).astype(int)
    return clopper_pearson_interval(counts, len(results), level)


def summarize(certify: Mapping[str, Results], radii: Sequence[float], *,
              attack: Mapping[str, Results] | None = None, include_envelope: bool = False,
              high_prob: bool = False, alpha: float = 0.001, rho: float = 0.001, ci: bool = False,
              published: Mapping[str, Published] | None = None, costs: Mapping[str, Cost] | None = None) -> Table:
    """Build the table: one certified row per certify input (with ACR and abstention rate, and with `ci`
    the 95% Clopper-Pearson interval of each value over the test images), each followed by its published
    row when `published` has one under the same name (the paper's value at those radii it reports; with
    `ci`, `Row.outside` marks values outside the measured row's interval), then optionally Cohen's
    high-probability rows, the envelope row and one empirical row per attack input (its accuracy at
    those radii that equal one of its eps values). A published row without a certify input of its name
    is listed after the certified rows. With `costs` (`load_costs`), each certified row whose name has a cost
    gets its CPU-seconds per epoch, the ratio to the first cost listed (the baseline) and that ratio divided
    by its cost model."""
    radii_a = np.asarray(radii, dtype=float)
    if radii_a.size == 0 or np.any(radii_a < 0) or not np.all(np.isfinite(radii_a)):
        raise SmoothAdvError("radii must be a non-empty list of numbers >= 0")
    rows: list[Row] = []
    curves: dict[str, np.ndarray] = {}
    for name, res in certify.items():
        curves[name] = certified_curve(res, radii_a)
        intervals = None
        if ci:
            low, high = certified_intervals(res, radii_a)
            intervals = tuple((float(lo), float(hi)) for lo, hi in zip(low, high))
        rows.append(Row(name, "certified", tuple(float(v) for v in curves[name]), len(res),
                        average_certified_radius(res.radius, res.correct), res.abstain_rate,  # type: ignore[arg-type]
                        intervals=intervals, cost=_row_cost(costs, name), sequential=res.sequential))
        if published and name in published:
            rows.append(_published_row(name, published[name], radii_a, intervals))
    for name, paper in (published or {}).items():
        if name not in certify:
            rows.append(_published_row(name, paper, radii_a, None))
    if high_prob:
        for name, res in certify.items():
            corrected = high_prob_certified_accuracy(res.radius, res.correct, radii_a, alpha, rho)  # type: ignore[arg-type]
            rows.append(Row(f"{name} (high-prob)", "high-prob", tuple(max(0.0, float(v)) for v in corrected),
                            len(res)))
    if include_envelope:
        clean = {name: res.clean_accuracy for name, res in certify.items()}
        best, chosen = envelope(curves, clean)
        rows.append(Row("envelope", "envelope", tuple(float(v) for v in best), 0,
                        models=tuple(chosen), model_clean=tuple(clean[n] for n in chosen)))
    for name, res in (attack or {}).items():
        eps_values, accuracy = empirical_curve(res)
        values = []
        for r in radii_a:
            hit = np.flatnonzero(np.isclose(eps_values, r, rtol=0, atol=1e-9))
            values.append(float(accuracy[hit[0]]) if hit.size else None)
        rows.append(Row(f"{name} (attack)", "empirical", tuple(values), len(res)))
    return Table(tuple(float(r) for r in radii_a), tuple(rows))


def _row_cost(costs: Mapping[str, Cost] | None, name: str) -> RowCost | None:
    if not costs or name not in costs:
        return None
    cost, baseline = costs[name], next(iter(costs.values()))
    ratio = cost.seconds / baseline.seconds
    return RowCost(cost.seconds, ratio, None if cost.model is None else ratio / cost.model)


def _published_row(name: str, paper: Published, radii: np.ndarray,
                   intervals: tuple[tuple[float, float], ...] | None) -> Row:
    values = tuple(paper.at(float(r)) for r in radii)
    outside = None
    if intervals is not None:
        outside = tuple(v is not None and not lo - 1e-12 <= v <= hi + 1e-12 for v, (lo, hi) in zip(values, intervals))
    return Row(paper.row_name(name), "published", values, 0, paper.acr, outside=outside)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _radius_label(r: float) -> str:
    return f"{r:g}"


def format_table(table: Table, fmt: Format = "markdown") -> str:
    """Render a table as markdown or LaTeX (percentages, one decimal) or CSV (fractions, 6 decimals).

    Envelope rows are followed by a row naming the model chosen at each radius with its clean
    accuracy (in LaTeX also as a superscript on each value, as in Salman et al.'s tables).
    """
    if fmt == "csv":
        return _csv(table)
    if fmt not in FORMATS:
        raise SmoothAdvError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    latex = fmt == "latex"
    text = _latex_escape if latex else _markdown_escape
    dash = "--" if latex else "–"
    head = ["", *[f"$r = {_radius_label(r)}$" if latex else f"r = {_radius_label(r)}" for r in table.radii],
            "ACR", r"abstain (\%)" if latex else "abstain (%)"]
    with_cost = any(row.cost is not None for row in table.rows)
    if with_cost:
        head += ["CPU-s / epoch", "cost ratio", "ratio / cost model"]
    body: list[list[str]] = []
    for row in table.rows:
        cells = [dash if v is None else _pct(v) for v in row.values]
        if row.intervals is not None:
            cells = [f"{c} {{\\scriptsize [{_pct(lo)}, {_pct(hi)}]}}" if latex else f"{c} [{_pct(lo)}, {_pct(hi)}]"
                     for c, (lo, hi) in zip(cells, row.intervals)]
        if row.outside is not None:
            mark = r"$^\dagger$" if latex else " †"
            cells = [f"{c}{mark}" if out else c for c, out in zip(cells, row.outside)]
        if row.kind == "envelope" and latex and row.model_clean:
            cells = [f"{v}$^{{{_pct(c)}}}$" for v, c in zip(cells, row.model_clean)]
        acr = "" if row.acr is None else f"{row.acr:.3f}"
        abstain = "" if row.abstain is None else _pct(row.abstain)
        extra = []
        if with_cost:
            cost = row.cost
            extra = ["", "", ""] if cost is None else [
                f"{cost.seconds:.0f}", f"{cost.ratio:.2f}", dash if cost.vs_model is None else f"{cost.vs_model:.2f}"]
        shown = f"{row.name}{SEQUENTIAL_MARK}" if row.sequential else row.name
        body.append([text(shown), *cells, acr, abstain, *extra])
        if row.kind == "envelope" and row.models:
            body.append([text("envelope model (clean %)"),
                         *[text(f"{m} ({_pct(c)})") for m, c in zip(row.models, row.model_clean or ())], "", "",
                         *([""] * (3 if with_cost else 0))])
    notes = [OUTSIDE_NOTE] if any(row.outside and any(row.outside) for row in table.rows) else []
    if any(row.sequential for row in table.rows):
        notes.append(SEQUENTIAL_NOTE)
    if with_cost:
        notes.append(COST_NOTE)
    return _render(head, body, latex, "\n\n".join(notes) or None)


def _render(head: list[str], body: list[list[str]], latex: bool, note: str | None = None) -> str:
    """A table of text cells (first column left-aligned, the others right-aligned) in markdown or LaTeX,
    with an optional footnote (paragraphs separated by blank lines; comment lines in LaTeX)."""
    if latex:
        lines = [r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(head) + r" \\",
                 r"\midrule", *[" & ".join(cells) + r" \\" for cells in body], r"\bottomrule", r"\end{tabular}"]
        if note:
            lines += ["% " + line.replace("†", "$^\\dagger$") for line in note.split("\n") if line]
        return "\n".join(lines) + "\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


#: the footnote of a table with cost columns (`report --cost`)
COST_NOTE = ("cost ratio: CPU-seconds per training epoch divided by the first method's of the cost file; "
             "ratio / cost model: that ratio divided by the method's cost model (1 = as predicted)")

#: the mark of a sequential row, and its footnote
SEQUENTIAL_MARK = " ‡"
SEQUENTIAL_NOTE = ("‡ sequential test: each radius is the bound where the test stopped, so certified accuracy is the "
                   "test's own decision at the radii it settles (its grid) and a lower bound between them; ACR "
                   "averages stopping bounds and is not comparable with fixed n")

#: the footnote of a table with published rows outside the measured rows' intervals
OUTSIDE_NOTE = "† published value outside the 95% Clopper-Pearson interval of the measured row it follows"


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


def _latex_escape(text: str) -> str:
    out = []
    for char in text:
        out.append({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}.get(char, char))
    return "".join(out)


def _csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    with_ci = any(row.intervals is not None for row in table.rows)
    bounds = [f"{_radius_label(r)} {end}" for r in table.radii for end in ("ci_low", "ci_high")] if with_ci else []
    with_cost = any(row.cost is not None for row in table.rows)
    cost_columns = ["cpu_s_per_epoch", "cost_ratio", "cost_ratio_vs_model"] if with_cost else []
    writer.writerow(["name", "kind", "count", *[_radius_label(r) for r in table.radii], "acr", "abstain_rate",
                     *bounds, *cost_columns])
    for row in table.rows:
        values = ["" if v is None else f"{v:.6f}" for v in row.values]
        limits = [f"{v:.6f}" for pair in row.intervals for v in pair] if row.intervals else [""] * len(bounds)
        cost = [] if not with_cost else ["", "", ""] if row.cost is None else [
            f"{row.cost.seconds:.6g}", f"{row.cost.ratio:.6f}",
            "" if row.cost.vs_model is None else f"{row.cost.vs_model:.6f}"]
        writer.writerow([row.name, row.kind, row.count, *values,
                         "" if row.acr is None else f"{row.acr:.6f}",
                         "" if row.abstain is None else f"{row.abstain:.6f}", *limits, *cost])
        if row.kind == "envelope" and row.models:
            writer.writerow(["envelope model", "envelope-model", "", *row.models, "", ""])
            writer.writerow(["envelope model clean accuracy", "envelope-clean", "",
                             *[f"{c:.6f}" for c in row.model_clean or ()], "", ""])
    return buffer.getvalue()


# ------------------------------------------------------------------ paired comparison


@dataclass(frozen=True)
class Comparison:
    """Two models certified on the same test images, compared image by image (`compare`).

    Per radius: each model's certified accuracy, the discordant counts `only` (images certified at r by
    the first model only, by the second only), the exact McNemar p-value of each radius and the same
    p-values Holm-adjusted over the radii (one family: a difference is `supported` at any radius whose
    adjusted p-value is <= 1 - level; `compare_to_first` widens the family to every model against the
    first, and `family` counts its tests). ACR: each model's and the `acr_difference` (second minus
    first) with its Student t interval at `level` over the images' paired radius differences (not
    adjusted for multiplicity: ACR is the secondary measure).
    """

    names: tuple[str, str]
    count: int
    radii: tuple[float, ...]
    accuracy: tuple[tuple[float, float], ...]
    only: tuple[tuple[int, int], ...]
    pvalues: tuple[float, ...]
    adjusted: tuple[float, ...]
    acr: tuple[float, float]
    acr_difference: tuple[float, float, float]  # (mean, low, high)
    family: int  # how many tests `adjusted` was Holm-adjusted over (`compare`: the radii)
    level: float = 0.95

    def better(self, j: int) -> str | None:
        """The model that certifies more at radius j when the paired test supports a difference, else None."""
        if self.adjusted[j] > 1 - self.level:
            return None
        first, second = self.only[j]
        return self.names[0] if first > second else self.names[1]

    def better_acr(self) -> str | None:
        """The model with the higher ACR when the interval of the difference excludes 0, else None."""
        _, low, high = self.acr_difference
        return self.names[1] if low > 0 else self.names[0] if high < 0 else None


def certified_by_image(results: Results, radii: Sequence[float] | np.ndarray) -> np.ndarray:
    """Booleans (image, radius), the images in increasing idx: whether each image is certified correct at each
    radius (correct and radius >= r; abstentions never are). Two files of the same images give aligned rows."""
    if results.radius is None:
        raise SmoothAdvError(f"{results.path} has no radius column: only certify results have certified images")
    order = np.argsort(results.idx, kind="stable")
    radii_a = np.asarray(radii, dtype=float)
    return results.correct[order].astype(bool)[:, None] & (results.radius[order][:, None] >= radii_a[None, :])


def compare(first: Results, second: Results, radii: Sequence[float], names: tuple[str, str] = ("A", "B"),
            level: float = 0.95) -> Comparison:
    """Compare two certify results on the same test images (`Comparison`).

    The images are matched by idx; SmoothAdvError unless both files hold the same images (the same indices
    with the same labels; `smoothadv report --paired` also compares the recorded data digests). Paired tests
    see what the per-model intervals cannot: most images are certified by both models or by neither,
    and only the images one model certifies and the other does not tell them apart.
    """
    for res in (first, second):
        if res.radius is None:
            raise SmoothAdvError(f"{res.path} has no radius column: only certify results can be compared")
    if sorted(first.idx.tolist()) != sorted(second.idx.tolist()):
        raise SmoothAdvError(f"{first.path} and {second.path} hold different test images: a paired comparison "
                             "needs the same images in both")
    if len(first) < 2:
        raise SmoothAdvError(f"{first.path} and {second.path} share {len(first)} test image: a paired comparison "
                             "needs at least 2")
    radii_a = np.asarray(radii, dtype=float)
    a_order, b_order = np.argsort(first.idx, kind="stable"), np.argsort(second.idx, kind="stable")
    if not np.array_equal(first.label[a_order], second.label[b_order]):
        raise SmoothAdvError(f"{first.path} and {second.path} give different labels to the same test images: they "
                             "were computed on different data, and a paired comparison needs the same images")
    a_radius, a_correct = first.radius[a_order], first.correct[a_order].astype(bool)  # type: ignore[index]
    b_radius, b_correct = second.radius[b_order], second.correct[b_order].astype(bool)  # type: ignore[index]
    accuracy, only, pvalues = [], [], []
    for a_ok, b_ok in zip(certified_by_image(first, radii_a).T, certified_by_image(second, radii_a).T):
        counts = (int(np.sum(a_ok & ~b_ok)), int(np.sum(b_ok & ~a_ok)))
        accuracy.append((float(a_ok.mean()), float(b_ok.mean())))
        only.append(counts)
        pvalues.append(mcnemar_exact(*counts))
    a_certified, b_certified = a_radius * a_correct, b_radius * b_correct
    return Comparison(names, len(first), tuple(float(r) for r in radii_a), tuple(accuracy), tuple(only),
                      tuple(pvalues), tuple(float(p) for p in holm_adjust(pvalues)),
                      (float(a_certified.mean()), float(b_certified.mean())),
                      mean_interval(b_certified - a_certified, level), len(radii_a), level)


def compare_to_first(results: Mapping[str, Results], radii: Sequence[float], level: float = 0.95
                     ) -> list[Comparison]:
    """Every model against the first one (the baseline), on the same test images.

    One `compare` per other model, with the Holm adjustment taken over all (models - 1) x radii
    tests at once, so that the family-wise error of every "certifies more" it supports is at most
    1 - level however many models are compared. With two models this is `compare`.
    """
    names = list(results)
    if len(names) < 2:
        raise SmoothAdvError(f"a paired comparison needs at least two certify inputs, got {len(names)}")
    base = names[0]
    comparisons = [compare(results[base], results[name], radii, (base, name), level) for name in names[1:]]
    adjusted = holm_adjust([p for c in comparisons for p in c.pvalues])
    k = len(comparisons[0].radii)
    return [replace(c, adjusted=tuple(float(p) for p in adjusted[i * k:(i + 1) * k]), family=len(adjusted))
            for i, c in enumerate(comparisons)]


def paired_text(certify: Mapping[str, Results], radii: Sequence[float], fmt: Format = "markdown") -> str:
    """What `smoothadv report --paired` prints after its table: every certify input compared with the first on the
    same images (`compare_to_first`), each comparison's table (`format_comparison`) followed, in markdown, by the
    sentence saying which differences its tests support (`describe_comparison`)."""
    text = ""
    for comparison in compare_to_first(certify, radii):
        text += "\n" + format_comparison(comparison, fmt)
        if fmt == "markdown":
            text += "\n" + describe_comparison(comparison)
    return text


def format_comparison(comparison: Comparison, fmt: Format = "markdown") -> str:
    """The comparison as a table (markdown, LaTeX or CSV): one row per radius, then ACR."""
    a, b = comparison.names
    mean, low, high = comparison.acr_difference
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["radius", a, b, "difference", "difference_low", "difference_high", f"only {a}", f"only {b}",
                         "p", "p_holm", "higher"])
        for j, r in enumerate(comparison.radii):
            first, second = comparison.accuracy[j]
            writer.writerow([_radius_label(r), f"{first:.6f}", f"{second:.6f}", f"{second - first:.6f}", "", "",
                             *comparison.only[j], f"{comparison.pvalues[j]:.6g}", f"{comparison.adjusted[j]:.6g}",
                             comparison.better(j) or ""])
        writer.writerow(["acr", *[f"{v:.6f}" for v in comparison.acr], f"{mean:.6f}", f"{low:.6f}", f"{high:.6f}",
                         "", "", "", "", comparison.better_acr() or ""])
        return buffer.getvalue()
    if fmt not in FORMATS:
        raise SmoothAdvError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")
    latex = fmt == "latex"
    text = _latex_escape if latex else _markdown_escape
    dash = "--" if latex else "–"

    def pvalue(value: float) -> str:
        return ("$<$ 0.0001" if latex else "< 0.0001") if value < 1e-4 else f"{value:.4f}"

    head = ["", text(f"{a} (%)"), text(f"{b} (%)"), text(f"{b} - {a} (pp)"), text(f"only {a}"), text(f"only {b}"),
            "p", "p (Holm)", "higher (supported)"]
    body = []
    for j, r in enumerate(comparison.radii):
        first, second = comparison.accuracy[j]
        body.append([f"$r = {_radius_label(r)}$" if latex else f"r = {_radius_label(r)}", _pct(first), _pct(second),
                     f"{100 * (second - first):+.1f}", *[str(c) for c in comparison.only[j]],
                     pvalue(comparison.pvalues[j]), pvalue(comparison.adjusted[j]), text(comparison.better(j) or dash)])
    body.append(["ACR", *[f"{v:.3f}" for v in comparison.acr], f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]", "", "",
                 "", "", text(comparison.better_acr() or dash)])
    return _render(head, body, latex)


def describe_comparison(comparison: Comparison) -> str:
    """One paragraph saying which differences the paired tests support, and which they do not."""
    a, b = comparison.names
    level = f"{100 * (1 - comparison.level):g}%"
    radii = {name: [_radius_label(r) for j, r in enumerate(comparison.radii) if comparison.better(j) == name]
             for name in (a, b)}
    unsupported = [_radius_label(r) for j, r in enumerate(comparison.radii) if comparison.better(j) is None]
    parts = [f"{name} certifies more than {other} at r = {', '.join(radii[name])}"
             for name, other in ((b, a), (a, b)) if radii[name]]
    mean, low, high = comparison.acr_difference
    unadjusted = "" if comparison.family == len(comparison.radii) else ", not adjusted for multiplicity"
    interval = f"{b} - {a} = {mean:+.3f}, {100 * comparison.level:g}% interval [{low:+.3f}, {high:+.3f}]{unadjusted}"
    acr = (f"the higher ACR is {comparison.better_acr()}'s ({interval})" if comparison.better_acr()
           else f"the ACRs do not differ beyond their uncertainty ({interval})")
    family = (f"the {len(comparison.radii)} radii" if comparison.family == len(comparison.radii) else
              f"all {comparison.family} tests of the models against {a}")
    text = (f"Paired over the same {comparison.count} test images (exact McNemar test on the images one model "
            f"certifies at r and the other does not, Holm-adjusted over {family}, at the "
            f"{level} level): " + ("; ".join(parts) if parts else "no radius shows a supported difference"))
    if parts and unsupported:
        text += f"; at r = {', '.join(unsupported)} the difference is within what these images can tell apart"
    return text + f". {acr[0].upper()}{acr[1:]}.\n"


# ------------------------------------------------------------------ plots


#: plot file formats, named by the file's extension
PLOT_FORMATS = ("png", "pdf", "svg")
#: metadata left out so that the same results give the same file bytes (pdf/svg record a creation date)
_NO_DATE = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}


def plot_format(path: str | Path) -> str:
    """The format a plot file's extension names (png, pdf or svg); any other name is a SmoothAdvError."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise SmoothAdvError(f"cannot tell the plot format of {path}: name the file .png, .pdf or .svg")
    return suffix


def _new_figure(size: tuple[float, float]) -> Any:
    """A matplotlib figure on an Agg canvas (no pyplot), or a one-line error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SmoothAdvError("plotting needs matplotlib: pip install 'smoothadv[plot]'") from None
    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, out: str | Path, kind: str) -> Path:
    """Lay out `fig` and write it to `out` atomically, in format `kind`, without a creation date."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, metadata=_NO_DATE[kind])
    target = Path(out)
    atomic_write_bytes(target, buffer.getvalue())
    return target


def plot_accuracy(certify: Mapping[str, Results], out: str | Path, *, attack: Mapping[str, Results] | None = None,
                  max_radius: float | None = None, include_envelope: bool = False, title: str | None = None,
                  ci: bool = False, published: Mapping[str, Published] | None = None) -> Path:
    """Write a plot: certified accuracy vs radius (solid) per certify input, published values (crosses,
    `published`) and empirical accuracy vs eps (dashed, markers) per attack input, on the same axes as in
    Salman et al.'s figures; inputs with the same name share a colour; with `ci`, a shaded 95%
    Clopper-Pearson band over the test images around each certified curve. The format is the one `out`'s extension names
    (`plot_format`: PNG, PDF or SVG). Needs matplotlib (imported here, Agg canvas, no pyplot)."""
    kind = plot_format(out)
    attack = attack or {}
    if not certify and not attack:
        raise SmoothAdvError("nothing to plot")
    top = max([float(r.radius.max()) for r in certify.values() if r.radius is not None] +
              [float(r.eps.max()) for r in attack.values() if r.eps is not None] + [0.0])
    limit = max_radius if max_radius is not None else max(0.25, math.ceil(top * 1.1 / 0.25) * 0.25)
    grid = np.linspace(0.0, limit, 401)
    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    published = published or {}
    names = list(dict.fromkeys([*certify, *published, *attack]))
    colour = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    curves = {}
    for name, res in certify.items():
        curves[name] = certified_curve(res, grid)
        what = "certified, sequential: exact at its grid radii" if res.sequential else "certified"
        ax.plot(grid, curves[name], color=colour[name], linewidth=2, label=f"{name} ({what})")
        if ci:
            low, high = certified_intervals(res, grid)
            ax.fill_between(grid, low, high, color=colour[name], alpha=0.15, linewidth=0)
    if include_envelope and len(certify) > 1:
        best, _ = envelope(curves, {n: r.clean_accuracy for n, r in certify.items()})
        ax.plot(grid, best, color="black", linewidth=1, linestyle=":", label="envelope (certified)")
    for name, paper in published.items():
        ax.plot(paper.radii, paper.certified, color=colour[name], linestyle="none", marker="x", markersize=7,
                label=paper.row_name(name))
    for name, res in attack.items():
        eps_values, accuracy = empirical_curve(res)
        ax.plot(eps_values, accuracy, color=colour[name], linewidth=1.5, linestyle="--", marker="o", markersize=4,
                label=f"{name} (empirical, attack)")
    ax.set_xlim(0, limit)
    ax.set_ylim(0, 1)
    ax.set_xlabel(r"$\ell_2$ radius")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title)
    return _save_figure(fig, out, kind)


def default_radii(certify: Mapping[str, Results], step: float = 0.25, max_columns: int = 12) -> list[float]:
    """0, step, 2 step, ... up to the largest certified radius in the inputs (at most `max_columns`)."""
    top = max([float(r.radius.max()) for r in certify.values() if r.radius is not None] + [0.0])
    if top / step > max_columns:  # jump close to the step that fits (never a list of every column), then double
        step *= 2.0 ** max(0, math.floor(math.log2(top / (step * max_columns))))
    radii = radius_grid(top, step)
    while len(radii) > max_columns:
        step *= 2
        radii = radius_grid(top, step)
    return radii


def certified_radii(results: Results) -> np.ndarray:
    """Each example's certified radius: its radius when the prediction is correct, -inf when it is wrong or the
    certifier abstained (certified at no radius). Certified accuracy at r is the share of these values >= r."""
    if results.radius is None:
        raise SmoothAdvError(f"{results.path}: not a certify file (no radius column)")
    certified = (results.correct == 1) & (results.predict != ABSTAIN)
    return np.where(certified, results.radius, -np.inf)


def dkw_halfwidth(count: int, level: float = 0.95) -> float:
    """Half-width of the Dvoretzky-Kiefer-Wolfowitz-Massart band: with probability >= `level` the whole empirical
    CDF of `count` independent draws lies within this distance of the true CDF, at every point at once."""
    if count <= 0:
        raise SmoothAdvError("an empirical CDF needs at least one example")
    return math.sqrt(math.log(2.0 / (1.0 - level)) / (2.0 * count))


def plot_radius_cdf(certify: Mapping[str, Results], out: str | Path, *,
                    quantity: Literal["radius", "p_lower"] = "radius", sigma: float | Mapping[str, float] | None = None,
                    max_radius: float | None = None,
                    title: str | None = None) -> Path:
    """Write a two-panel figure per set of certify files: left, certified accuracy against the radius with its 95%
    Clopper-Pearson band over the test images (as `plot_accuracy(ci=True)`); right, the empirical CDF of each
    model's certified radius over the test images (examples certified at no radius, wrong or abstained, sit at the
    left edge), with a 95% Dvoretzky-Kiefer-Wolfowitz-Massart band. The CDF shows the whole distribution that the
    average certified radius (ACR) summarizes in one number, so two models with the same ACR but different shapes
    are told apart; the legend gives the ACR only as a secondary figure (Sun et al., ICML 2025, show that ACR can be
    raised by trading accuracy on hard inputs for radius on easy ones).

    `quantity="p_lower"` draws the CDF of the lower confidence bound p_A = Phi(R / sigma) instead (examples not
    certified at 1/2), which shows how many inputs sit at the sample size's cap; it needs `sigma`, one value or one
    per name. The format is the one `out`'s extension names (PNG, PDF or SVG). Needs matplotlib."""
    from scipy.stats import norm

    kind = plot_format(out)
    if not certify:
        raise SmoothAdvError("nothing to plot")
    if quantity not in ("radius", "p_lower"):
        raise SmoothAdvError(f"quantity must be 'radius' or 'p_lower', not {quantity!r}")
    sigmas: dict[str, float] = {}
    if quantity == "p_lower":
        for name in certify:
            value = sigma.get(name) if isinstance(sigma, Mapping) else sigma
            if value is None or not value > 0:
                raise SmoothAdvError(f"the CDF of p_A needs sigma > 0 for {name!r}")
            sigmas[name] = float(value)
    radii = {name: certified_radii(res) for name, res in certify.items()}
    finite = [float(r[np.isfinite(r)].max()) for r in radii.values() if np.isfinite(r).any()]
    limit = max_radius if max_radius is not None else max(0.25, math.ceil(max(finite + [0.0]) * 1.1 / 0.25) * 0.25)
    grid = np.linspace(0.0, limit, 401)
    fig = _new_figure((11.0, 4.2))
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    for i, (name, res) in enumerate(certify.items()):
        colour = palette[i % len(palette)]
        if res.radius is None:
            raise SmoothAdvError(f"{res.path} has no radius column (a predict/attack file?)")
        acr = average_certified_radius(res.radius, res.correct)
        left.plot(grid, certified_curve(res, grid), color=colour, linewidth=2, label=f"{name} (ACR {acr:.3f})")
        low, high = certified_intervals(res, grid)
        left.fill_between(grid, low, high, color=colour, alpha=0.15, linewidth=0)
        values = radii[name]
        if quantity == "p_lower":
            values = np.where(np.isfinite(values), norm.cdf(np.maximum(values, 0.0) / sigmas[name]), 0.5)
            xs = np.linspace(0.5, 1.0, 401)
        else:
            values = np.where(np.isfinite(values), values, 0.0)
            xs = grid
        ecdf = np.searchsorted(np.sort(values), xs, side="right") / len(values)
        band = dkw_halfwidth(len(values))
        right.step(xs, ecdf, where="post", color=colour, linewidth=2, label=f"{name} ({len(values)} images)")
        right.fill_between(xs, np.clip(ecdf - band, 0, 1), np.clip(ecdf + band, 0, 1), step="post", color=colour,
                           alpha=0.12, linewidth=0)
    left.set_xlim(0, limit)
    left.set_ylim(0, 1)
    left.set_xlabel(r"$\ell_2$ radius $r$")
    left.set_ylabel("certified accuracy at $r$ (95% interval)")
    left.legend(loc="lower left", fontsize=8)
    right.set_ylim(0, 1)
    if quantity == "p_lower":
        right.set_xlim(0.5, 1.0)
        right.set_xlabel(r"lower confidence bound $\underline{p_A}$ (not certified: 1/2)")
    else:
        right.set_xlim(0, limit)
        right.set_xlabel("certified radius (wrong or abstained: 0)")
    right.set_ylabel("share of test images at or below (95% band)")
    right.legend(loc="lower right", fontsize=8)
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out, kind)


# ------------------------------------------------------------------ the demo's report


#: the first line of the report.md `smoothadv demo` writes (the demo knows its own report by it)
DEMO_REPORT_TITLE = "# smoothadv demo:"


def demo_table(certify: Mapping[str, Results], attack: Mapping[str, Results], radii: Sequence[float]) -> str:
    """The demo's table, as `smoothadv report --ci --paired` prints it: certified accuracy at each radius with
    its 95% Clopper-Pearson interval, ACR and abstentions, the attack rows, then the two models compared
    image by image (exact McNemar per radius, Holm-adjusted; the ACR difference with its 95% interval) and
    a sentence saying which differences those tests support."""
    table = format_table(summarize(certify, radii, attack=attack, ci=True), "markdown")
    return table + paired_text(certify, radii)


def write_demo_report(cfg: DemoConfig, out: Path, *, device: str, arch: str,
                      objectives: Mapping[str, Mapping[str, Any]], certify_files: Mapping[str, Path],
                      attack_files: Mapping[str, Path], timings: Mapping[str, tuple[str, float]],
                      log: Callable[[str], None]) -> tuple[str, Path | None]:
    """Write the report of a `smoothadv demo` run into `out` and return (its table, the plot or None without
    matplotlib): report.md first (the packaged template demo_report.md filled in; so an interrupted write leaves the
    demo's own report), then table.md (`demo_table`) and accuracy.png. `objectives` are the models' described
    objectives, `certify_files`/`attack_files` their TSVs by model name, `timings` step -> (status, seconds)."""
    certify = {name: load_results(path) for name, path in certify_files.items()}
    attack = {name: load_results(path) for name, path in attack_files.items()}
    indices = [int(i) for i in next(iter(certify.values())).idx]
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    top = max_certifiable_radius(cfg.n, cfg.alpha, cfg.sigma)
    radii = radius_grid(top, cfg.sigma / 2)
    table = demo_table(certify, attack, radii)
    plot = out / "accuracy.png" if importlib.util.find_spec("matplotlib") is not None else None
    command = " ".join(["smoothadv report", *[f"{name}={r.path}" for name, r in certify.items()],
                        *[f"--attack {name}={r.path}" for name, r in attack.items()], "--radii",
                        *[f"{r:g}" for r in radii], "--ci", "--paired", "--plot", str(out / "accuracy.png")])
    described = "\n".join(f"- **{name}**: `{json.dumps(objective)}`" for name, objective in objectives.items())
    attacked = min(cfg.attack_count, len(indices))
    attack_text = (f"SmoothAdv PGD attack on the smoothed classifier (T = {cfg.attack_steps} steps, m = {cfg.attack_m} "
                   f"noise draws) at eps in {', '.join(f'{e:g}' for e in cfg.eps_values)} on the first {attacked} of "
                   f"those images, then PREDICT (n = {cfg.attack_n}, alpha = {cfg.alpha}) on each adversarial input: "
                   "*empirical* accuracy, an upper bound on the true robust accuracy. At eps = 0 this is plain "
                   "PREDICT, whose abstentions (it uses fewer samples than CERTIFY) also count as wrong: compare the "
                   "dashed curves with their own eps = 0 point."
                   if cfg.attack_count else "No empirical attack was run.")
    written = ("`smoothadv demo --report-only` from the TSVs of the run in this folder" if cfg.report_only
               else "`smoothadv demo`")
    timing_lines = "\n".join(f"| {s} | {status} | {duration(sec)} |" for s, (status, sec) in timings.items())
    total = duration(sum(sec for _, sec in timings.values()))
    picture = f"![certified and empirical accuracy]({plot.name})\n\n" if plot else ""
    template = (Path(__file__).parent / "demo_report.md").read_text(encoding="utf-8")
    atomic_write_text(out / "report.md", template.format(
        title=DEMO_REPORT_TITLE, dataset=cfg.dataset, when=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        written=written, device=device, arch=arch, cfg=cfg, objectives=described, images=len(indices), step=step,
        step2=2 * step, subset=cfg.train_subset or "all", top=top, attack_text=attack_text, attacked=attacked,
        table=table, picture=picture, command=command, timing_lines=timing_lines, total=total))
    atomic_write_text(out / "table.md", table)
    if plot is None:
        log("matplotlib is not installed: no plot (pip install 'smoothadv[plot]')")
    else:
        plot_accuracy(certify, plot, attack=attack, max_radius=max(top, *cfg.eps_values) * 1.05,
                      title=f"{cfg.dataset}, sigma = {cfg.sigma}", ci=True)
    return table, plot


def duration(seconds: float) -> str:
    """Seconds as h:mm:ss (rounded to the second)."""
    return str(datetime.timedelta(seconds=round(seconds)))
