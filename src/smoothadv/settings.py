"""Typed settings: the data model of every run. The command line and TOML recipes only fill these in.

Each run is described by frozen dataclasses, validated when they are made (a one-line
`SmoothAdvError` naming the setting), so a library user, the command line and a recipe file all
meet the same checks:

- `TrainSettings`: a training run (`train.fit`); the objective is a separate typed object
  (`objectives.build_objective`), whose dataclass fields are its hyperparameters, and so is an
  attack (`attacks.build_attack`): both declare their fields with `setting(...)` too.
- `CertifySettings`, `PredictSettings`, `AttackRunSettings`, `SmoothPredictionSettings`: what a
  durable evaluation run computes; `RunSettings`: where it reads and writes (`run.run_evaluation`).
- `DemoConfig`: `smoothadv demo` (`demo.run_demo`, a recipe over the two above).

Every field is declared with `setting(...)`, which records its help text, its command-line spelling
and whether it can change a result (`rows`). Fields with `rows=False` (paths, devices, progress
bars, resume/force) are the only ones a resumed run, or the shards of one run, may differ in; every
other field is compared (`row_settings`). (A resumed training run may also raise `epochs`, which
only says where it stops: `rundir.compare`, the one rule.) `convert` turns a value from a flag or a recipe into the
field's declared type, strictly: `"false"` is not a bool, `1.5` is not an int, `true` is not a
number. Field names are those of the flags (and of the `args.json` files earlier versions wrote),
so recorded runs stay comparable.

This module is the ground floor of the package: it imports only the standard library and `errors`.
The factories that build objects from settings live beside what they build (`train.recipe`,
`attacks.build_attack`, `objectives.build_objective`, `run.sequential_test`), and the registries whose
names are choices here (datasets, architectures, denoisers) register them (`register_names`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SmoothAdvError

__all__ = [
    "AT_LEAST_ONE", "AttackRunSettings", "BettingSettings", "COUNT", "CertifySettings", "Check", "Choices",
    "DEFAULT_BETS", "DEFAULT_LOOKS", "DEMO_DATASETS", "DENOISER_OBJECTIVES", "DemoConfig", "DenoiserTrainSettings",
    "EvaluationSettings", "FLOAT32_MAX", "MAX_SEED", "NONNEGATIVE", "NONNEGATIVE_FLOAT32", "NORMALIZATIONS", "POLICIES",
    "POSITIVE", "POSITIVE_FLOAT32", "PRECISIONS", "PROBABILITY", "PROGRESS_HELP", "PredictSettings", "RENAMED",
    "RunSettings", "SEED", "SELECTIONS", "SequentialSettings", "SmoothPredictionSettings", "SpendingSettings", "TESTS",
    "TrainSettings", "bookkeeping_fields", "check_fields", "convert", "fields_of", "flag_keys", "flag_name", "make",
    "read_toml", "recipe_key", "register_names", "registered", "row_settings", "setting", "upgraded",
]

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

Check = Callable[[Any], bool]

#: help of every --progress/--no-progress flag (`progress.progress` does what it says)
PROGRESS_HELP = ("progress bars on a terminal (default); with --no-progress, or output to a log file, a plain "
                 "line every 30 s instead")

#: largest seed accepted (torch generators take 64-bit seeds; ours are mixed modulo 2^63 - 1)
MAX_SEED = 2**63 - 1


def _limit(test: Check, what: str) -> tuple[Check, str]:
    return test, what


POSITIVE = _limit(lambda v: v > 0, "a number > 0")
NONNEGATIVE = _limit(lambda v: v >= 0, "a number >= 0")
AT_LEAST_ONE = _limit(lambda v: v >= 1, "an integer >= 1")
COUNT = _limit(lambda v: v >= 0, "an integer >= 0")
PROBABILITY = _limit(lambda v: 0 < v < 1, "a number in (0, 1)")
SEED = _limit(lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
#: largest finite float32: optimizer hyperparameters are multiplied into float32 weights, and torch refuses
#: (with a traceback) a Python float that overflows the parameter's type
FLOAT32_MAX = 3.4028234663852886e38
POSITIVE_FLOAT32 = _limit(lambda v: 0 < v <= FLOAT32_MAX, "a number in (0, 3.4e38] (it multiplies float32 weights)")
NONNEGATIVE_FLOAT32 = _limit(lambda v: 0 <= v <= FLOAT32_MAX, "a number in [0, 3.4e38] (it multiplies float32 "
                             "weights)")


Choices = tuple[str, ...] | Callable[[], tuple[str, ...]]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
            limit: tuple[Check, str] | None = None, choices: Choices | None = None, rows: bool = True,
            positional: bool = False, metavar: str | None = None) -> Any:
    """A dataclass field with what the command line and the checks need to know about it.

    Args:
        default: the value when the setting is not given (omit for a required setting).
        help: one line for `--help`.
        flag: the command-line spelling (default `--name-with-dashes`).
        limit: (test, description) the value must pass, e.g. `POSITIVE`.
        choices: the allowed strings (or a function returning them, read when checked).
        rows: False when the setting cannot change a result (paths, devices, progress output).
        positional: a positional command-line argument.
    """
    metadata = {"help": help, "flag": flag, "limit": limit, "choices": choices, "rows": rows,
                "positional": positional, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings are immutable: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line spelling of a settings field (`--batch` for `batch_size`, ...)."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def recipe_key(field: dataclasses.Field) -> str:
    """The key of a settings field in recipes and `train.recipe` (the flag without dashes: `batch`)."""
    return flag_name(field)[2:].replace("-", "_")


def fields_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type annotation) of a settings dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _choices(field: dataclasses.Field) -> tuple[str, ...] | None:
    choices = field.metadata.get("choices")
    return choices() if callable(choices) else choices


# ------------------------------------------------------------------ strict conversion


def _describe(kind: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if kind in names:
        return names[kind]
    origin = typing.get_origin(kind)
    if origin is tuple:
        return "a list"
    return str(kind)


def _optional(kind: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind):
        args = tuple(a for a in typing.get_args(kind) if a is not type(None))
        return (args[0] if len(args) == 1 else typing.Union[args]), True  # noqa: UP007
    return kind, False


def convert(value: Any, kind: Any, name: str, *, from_text: bool = False) -> Any:
    """`value` as type `kind` (bool, int, float, str, Path, X | None, tuple[X, ...], tuple[X, Y]).

    Strict: a bool is never taken for a number or a string for a bool; an int is taken for a float;
    floats must be finite. With `from_text` (command-line strings) numbers are parsed from text.
    Raises SmoothAdvError naming `name`.
    """
    inner, nullable = _optional(kind)
    members = [a for a in typing.get_args(inner) if a is not type(None)] \
        if typing.get_origin(inner) in (typing.Union, types.UnionType) else []
    if members and value is not None:  # e.g. float | str: the first member the value converts to
        for member in members:
            try:
                return convert(value, member, name, from_text=from_text)
            except SmoothAdvError:
                continue
        raise SmoothAdvError(f"{name} must be {' or '.join(_describe(m) for m in members)}, got {value!r}")
    if value is None or value is dataclasses.MISSING:
        if nullable and value is None:
            return None
        raise SmoothAdvError(f"{name} needs a value ({_describe(inner)})")
    bad = SmoothAdvError(f"{name} must be {_describe(inner)}, got {value!r}")
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(convert(v, items[0], name, from_text=from_text) for v in value)
        if len(value) != len(items):
            raise SmoothAdvError(f"{name} must be a list of {len(items)} values, got {value!r}")
        return tuple(convert(v, k, name, from_text=from_text) for v, k in zip(value, items))
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if inner in (int, float):
        if isinstance(value, bool):
            raise bad
        if from_text and isinstance(value, str):
            try:
                value = inner(value)
            except ValueError:
                raise bad from None
        if inner is int and isinstance(value, int):
            return value
        if inner is float and isinstance(value, (int, float)):
            number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
            if not math.isfinite(number):
                raise SmoothAdvError(f"{name} must be a finite number, got {value!r}")
            return number
        raise bad
    if inner in (str, Path):
        if isinstance(value, (str, Path)) and str(value):
            return inner(value)
        raise bad
    raise TypeError(f"unsupported settings type {kind!r} for {name}")


def check_fields(settings: Any, label: Callable[[dataclasses.Field], str] = flag_name,
                 skip: Callable[[dataclasses.Field], bool] | None = None) -> None:
    """Check every field's type, limit and choices (but those `skip` says to leave), converting a value
    given as another type that converts strictly (an int for a float, a list for a tuple) in place;
    SmoothAdvError (one line, the field shown as `label` gives it) on the first bad one."""
    for name, (field, kind) in fields_of(type(settings)).items():
        if field.metadata.get("nested") or (skip is not None and skip(field)):
            continue  # a nested settings object checks itself
        value = getattr(settings, name)
        shown = label(field)
        converted = convert(value, kind, shown)
        if converted is not value and converted != value:
            object.__setattr__(settings, name, converted)  # e.g. an int given for a float, a list for a tuple
        if converted is None:
            continue
        limit = field.metadata.get("limit")
        values = converted if isinstance(converted, tuple) else (converted,)
        if limit is not None and not all(limit[0](v) for v in values):
            raise SmoothAdvError(f"{shown} must be {limit[1]}, got {value!r}")
        choices = _choices(field)
        if choices is not None and not all(v in choices for v in values):
            raise SmoothAdvError(f"{shown} must be one of {', '.join(choices)}, got {value!r}")


def row_settings(settings: Any) -> dict[str, Any]:
    """The fields of `settings` that can change a result (those declared with rows=True)."""
    return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.metadata.get("rows", True)}


def bookkeeping_fields(*classes: type) -> frozenset[str]:
    """Names of the fields declared rows=False in `classes` (they never change a result)."""
    return frozenset(f.name for cls in classes for f in dataclasses.fields(cls) if not f.metadata.get("rows", True))


def make(cls: type, values: Mapping[str, Any], *, source: str = "") -> Any:
    """Build settings `cls` from `values` keyed by field name, converting each value strictly.

    Unknown keys are refused. `source` prefixes error messages (e.g. a recipe's file name).
    """
    known = fields_of(cls)
    unknown = sorted(set(values) - set(known))
    prefix = f"{source}: " if source else ""
    if unknown:
        raise SmoothAdvError(f"{prefix}unknown setting(s) {', '.join(unknown)}")
    try:
        converted = {k: v if known[k][0].metadata.get("nested") else convert(v, known[k][1], k)
                     for k, v in values.items()}
        return cls(**converted)
    except SmoothAdvError as exc:
        raise SmoothAdvError(f"{prefix}{exc}") from None


# ------------------------------------------------------------------ renamed settings


RENAMED: dict[str, dict[str, str]] = {"SmoothMix": {"alpha": "step_size"}}
"""Fields renamed since earlier versions, by the class that owns them: old name -> new name. Records written
before a rename (a checkpoint's objective, `args.json`) are read with `upgraded`; recipes that use an old name are
refused with the new one (`train.recipe`)."""


def upgraded(record: Mapping[str, Any]) -> dict[str, Any]:
    """A recorded description (`{"name": class, field: value, ...}`) with renamed fields under today's names."""
    renames = RENAMED.get(str(record.get("name")), {})
    return {renames.get(key, key): value for key, value in record.items()}


# ------------------------------------------------------------------ recipes (TOML)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML recipe as a flat dict: keys with - or _, top level and [train] merged; the
    sections [paper] (published numbers) and [certify] are returned under those keys untouched."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SmoothAdvError(f"cannot read config {file}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SmoothAdvError(f"config {file} is not valid UTF-8 TOML: {str(exc).splitlines()[0]}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("paper", "certify"):
            flat[key] = value
        elif isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


# ------------------------------------------------------------------ the settings


_NAME_REGISTRIES: dict[str, Callable[[], tuple[str, ...]]] = {}


def register_names(kind: str, names: Callable[[], tuple[str, ...]]) -> None:
    """Make `names()` the allowed values of settings declared with `choices=registered(kind)`.

    The registries that know the names (`data` for "dataset", `archs` for "arch", `denoise` for
    "denoiser") register themselves when they are imported, so this module, the ground floor, imports
    none of them."""
    _NAME_REGISTRIES[kind] = names


def registered(kind: str) -> Callable[[], tuple[str, ...]]:
    """The lazy choices of a setting whose values are the names registered as `kind` (`register_names`)."""

    def names() -> tuple[str, ...]:
        source = _NAME_REGISTRIES.get(kind)
        if source is None:
            raise SmoothAdvError(f"no {kind} registry is loaded (import smoothadv first)")
        return source()

    names.__name__ = f"{kind}_names"
    return names


_dataset_names = registered("dataset")
_arch_names = registered("arch")


PRECISIONS = ("fp32", "bf16", "fp16")
NORMALIZATIONS = ("normalize", "center", "none")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """A training run (Cohen et al.'s recipe: SGD with momentum and a step learning rate).

    Units: sigma in [0, 1] pixels; lr per batch; epochs counted from 0. The objective (Gaussian
    augmentation, SmoothAdv, ...) is passed to `train.fit` beside these settings.
    """

    dataset: str = setting("fashion_mnist", "dataset to train on", choices=_dataset_names)
    arch: str = setting(help="architecture (default: the dataset's usual one)", choices=_arch_names)
    out_dir: Path = setting(help="run directory (checkpoint.pth.tar, log.tsv, args.json)", flag="--out", rows=False)
    sigma: float = setting(0.25, "training noise level (recorded in the checkpoint)", limit=NONNEGATIVE)
    epochs: int = setting(90, "training epochs", limit=AT_LEAST_ONE)
    batch_size: int = setting(256, "batch size (the global batch under torchrun)", flag="--batch", limit=AT_LEAST_ONE)
    lr: float = setting(0.1, "learning rate", limit=POSITIVE_FLOAT32)
    lr_step: int = setting(30, "decay lr every this many epochs", limit=AT_LEAST_ONE)
    lr_gamma: float = setting(0.1, "lr decay factor", limit=POSITIVE_FLOAT32)
    optimizer: str = setting("sgd", "optimizer of the loop: SGD with momentum (Cohen et al.), or Adam (the denoisers "
                             "of Salman et al. 2020)", choices=("sgd", "adam"))
    momentum: float = setting(0.9, "SGD momentum", limit=NONNEGATIVE_FLOAT32)
    weight_decay: float = setting(1e-4, "weight decay", limit=NONNEGATIVE_FLOAT32)
    normalization: str = setting("normalize", "input layer: mean/std, mean only, or none (raw [0, 1] pixels)",
                                 choices=NORMALIZATIONS)
    seed: int = setting(0, "seed for noise, initialization and data order", limit=SEED)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    workers: int = setting(0, "data loader processes", limit=COUNT, rows=False)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    train_subset: int | None = setting(None, "train on the first N images only", limit=AT_LEAST_ONE)
    eval_subset: int | None = setting(1000, "noisy test accuracy on N test images", limit=AT_LEAST_ONE)
    pretrained: str | None = setting(None, "fine-tune from this checkpoint")
    pretrained_normalization: str | None = setting(None, "input layer of a Cohen/Salman pretrained file",
                                                   choices=("normalize", "center"))
    unlabelled: str | None = setting(None, ".npz of extra pseudo-labelled images (self-training)")
    unlabelled_weight: float = setting(1.0, "loss weight of the extra batches", limit=NONNEGATIVE)
    resume: bool = setting(False, "continue from the run directory's checkpoint", rows=False)
    force: bool = setting(False, "start over even if a checkpoint exists", rows=False)
    progress: bool = setting(True, PROGRESS_HELP, rows=False)
    precision: str = setting("fp32", "mixed precision: autocast forward passes and attacks (fp16: GPU, with loss "
                             "scaling)", choices=PRECISIONS)

    def __post_init__(self) -> None:
        check_fields(self, recipe_key)

    def validate(self) -> None:
        """Checks that need more than one field (the single-field checks ran when it was made; that the
        architecture takes the dataset's images is `train.check_settings`'s, which calls this)."""
        steps = (self.epochs - 1) // self.lr_step  # decays before the last epoch
        if self.lr_gamma > 1 and math.log(self.lr) + steps * math.log(self.lr_gamma) > math.log(FLOAT32_MAX):
            raise SmoothAdvError(f"--lr {self.lr:g} grows by --lr-gamma {self.lr_gamma:g} every {self.lr_step} epochs "
                                 f"beyond float32 range (3.4e38) within {self.epochs} epochs")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Where a durable evaluation run reads and writes. None of these fields changes a row by itself:
    files are compared by content (the SHA-256 digests of the checkpoint and of the denoiser are
    recorded facts, compared on resume and merge), not by path."""

    checkpoint: str = setting(help="model checkpoint (smoothadv, Cohen or Salman format)", positional=True,
                              rows=False)
    denoiser: str | None = setting(None, "denoiser: a checkpoint (denoised smoothing, Salman et al. 2020) or a "
                                   "directory holding a diffusers diffusion model (diffusion denoised smoothing, "
                                   "Carlini et al. 2023); certify f o D, the classifier behind it (its digests are "
                                   "recorded and compared on resume and merge)", rows=False)
    denoiser_steps: int = setting(1, "network evaluations of a diffusion denoiser (--denoiser DIR): 1 is the paper's "
                                  "one-shot step, K > 1 a deterministic DDIM chain from t* (recorded as "
                                  "denoiser_unet_steps, compared on resume and merge)", limit=AT_LEAST_ONE, rows=False)
    out: Path = setting(help="output TSV (one row per example)", rows=False)
    shard: tuple[int, int] | None = setting(None, "run only shard i of k (i/k), writing OUT.shard-i-of-k; then "
                                            "`smoothadv merge OUT`", rows=False, metavar="I/K")
    resume: bool = setting(False, "continue an existing output, skipping finished rows", rows=False)
    force: bool = setting(False, "overwrite an existing output", rows=False)
    device: str = setting("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    progress: bool = setting(True, PROGRESS_HELP, rows=False)
    channels_last: bool = setting(False, "channels_last memory format (GPU speed)", rows=False)
    compile: bool = setting(False, "torch.compile the base classifier", rows=False)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.shard is not None and not (self.shard[1] >= 1 and 0 <= self.shard[0] < self.shard[1]):
            raise SmoothAdvError(f"--shard must be i/k with 0 <= i < k, got {self.shard[0]}/{self.shard[1]}")


DEFAULT_LOOKS: tuple[int, ...] = tuple(1024 * 2**j for j in range(8))
"""1024, 2048, ..., 131072: the default doubling looks of the alpha-spending test (K = 8)."""

DEFAULT_BETS: tuple[tuple[float, float], ...] = (
    (1.0, 0.5),
    (63 / 64, 0.2 / 3), (15 / 16, 0.2 / 3), (3 / 4, 0.2 / 3),
    *((2.0 ** -k, 0.03) for k in range(1, 11)),
)
"""(u, weight) of the betting test's mixed gamblers (`betting` explains the choice)."""

POLICIES = ("grid", "tolerance", "full")
SELECTIONS = ("adaptive", "fixed")


@dataclass(frozen=True, kw_only=True)
class SequentialSettings:
    """What both sequential tests take besides sigma and alpha: when to stop and how to choose the class.

    `sequential.SequentialConfig` (alpha spending) and `betting.BettingConfig` (betting) extend it with
    their own fields and with sigma and alpha; `CertifySettings.sequential` holds one of the two settings
    classes below. Fields are kept as given (the tests resolve defaults such as the grid's radii in their
    `schedule`)."""

    policy: str = setting("grid", "stopping rule: settle certified/not at --radii (grid), stop within "
                          "--tolerance of the best reachable radius (tolerance), or make every look (full)",
                          choices=POLICIES)
    radii: tuple[float, ...] = setting((), "grid policy: the radii to decide (one radius = single-radius mode; "
                                       "default: 0, 0.25, ... up to what the test can certify)", limit=NONNEGATIVE)
    tolerance: float = setting(0.0, "tolerance policy: radius loss accepted", limit=NONNEGATIVE)
    forecast_alpha: float | None = setting(0.05, "level of the upper bound that forecasts the reachable radius "
                                           "(None, 'strict' on the command line: the look's own level)",
                                           limit=PROBABILITY)
    selection: str = setting("adaptive", "how the class is chosen from the selection samples: adaptive (16 at a "
                             "time up to n0, stop when all agree) or fixed (all n0, Cohen's)", choices=SELECTIONS)

    def __post_init__(self) -> None:
        check_fields(self, lambda field: field.name)
        if self.policy == "tolerance" and self.tolerance <= 0:
            raise SmoothAdvError("the tolerance policy needs a tolerance > 0")


@dataclass(frozen=True, kw_only=True)
class SpendingSettings(SequentialSettings):
    """The group-sequential Clopper-Pearson test with alpha spending (`sequential.SequentialConfig`).

    `looks` None: `base` for the tolerance and full policies, and for the grid policy the schedule fitted on
    `base` for its radii; `levels` None: the fitted levels, or alpha / K at each of the K looks."""

    looks: tuple[int, ...] | None = setting(None, "cumulative sample sizes of the looks, fixed before sampling",
                                            limit=AT_LEAST_ONE)
    levels: tuple[float, ...] | None = setting(None, "failure probability spent at each look", limit=PROBABILITY)
    base: tuple[int, ...] = setting(DEFAULT_LOOKS, "doubling looks the grid schedule is fitted on (--looks "
                                    "FIRST:LAST on the command line)", limit=AT_LEAST_ONE)


@dataclass(frozen=True, kw_only=True)
class BettingSettings(SequentialSettings):
    """The anytime-valid betting test (`betting.BettingConfig`): votes per draw at first, the largest number of
    votes (None: `betting.betting_last`), the share of alpha spent on one final Clopper-Pearson bound, and the
    mixture of bets."""

    first: int = setting(64, "votes per draw at first (a multiple of 4)", limit=AT_LEAST_ONE)
    last: int | None = setting(None, "largest number of estimation votes (default: 111,616 at alpha 0.001)",
                               limit=AT_LEAST_ONE)
    final_share: float = setting(0.5, "share of alpha spent on one Clopper-Pearson bound at `last`",
                                 limit=_limit(lambda v: 0 <= v < 1, "a number in [0, 1)"))
    bets: tuple[tuple[float, float], ...] = setting(DEFAULT_BETS, "the mixture: (u, weight) pairs")


TESTS: dict[str, type[SequentialSettings]] = {"spending": SpendingSettings, "betting": BettingSettings}
"""The sequential tests by their `--test` name."""


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings:
    """What every evaluation run shares: the smoothed classifier, the examples and the noise seed."""

    sigma: float = setting(help="noise level of the smoothed classifier", limit=POSITIVE)
    alpha: float = setting(0.001, "failure probability", limit=PROBABILITY)
    batch: int = setting(1000, "noisy samples per forward pass", limit=AT_LEAST_ONE)
    skip: int = setting(1, "use every skip-th example", limit=AT_LEAST_ONE)
    max: int | None = setting(None, "stop after this many examples", limit=AT_LEAST_ONE)
    split: str = setting("test", "dataset split", choices=("test", "train"))
    seed: int = setting(0, "seed of the noise (each example's stream is keyed by (seed, index))", limit=SEED)
    normalization: str | None = setting(None, "input layer for Cohen/Salman checkpoints, which do not record it",
                                        choices=("normalize", "center"))
    precision: str = setting("fp32", "autocast the base classifier's forward passes (fp16: GPU only)",
                             choices=PRECISIONS)
    fold_bn: bool = setting(False, "fold BatchNorm into the convolutions (same function up to float rounding)")

    command = "evaluate"

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True, kw_only=True)
class PredictSettings(EvaluationSettings):
    """PREDICT on each example (Cohen et al., Section 3.2): a class or ABSTAIN."""

    n: int = setting(1000, "Monte Carlo samples", limit=AT_LEAST_ONE)

    command = "predict"


@dataclass(frozen=True, kw_only=True)
class CertifySettings(EvaluationSettings):
    """CERTIFY on each example: Cohen et al.'s fixed-n test, or a sequential test with looks.

    `mode` "fixed" uses `n0` and `n`; "sequential" uses `n0` (selection samples), `class_from` and the
    test in `sequential`: `SpendingSettings` (alpha spending, the default when None) or `BettingSettings`.
    `run.sequential_test(settings)` builds the test; `n` is unused in sequential mode.
    """

    n: int = setting(100_000, "Monte Carlo samples", limit=AT_LEAST_ONE)
    n0: int = setting(100, "selection samples", limit=AT_LEAST_ONE)
    mode: str = setting("fixed", "fixed: Cohen's CERTIFY with n samples; sequential: looks at 1024, 2048, ... "
                        "samples", choices=("fixed", "sequential"))
    class_from: str = setting("selection", "sequential: class from n0 selection samples (Cohen; deployment, "
                              "default) or the known label (evaluation only)", choices=("selection", "label"))
    sequential: SpendingSettings | BettingSettings | None = dataclasses.field(
        default=None, metadata={"help": "the sequential test and its settings", "rows": True, "nested": True})

    command = "certify"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sequential is not None and not isinstance(self.sequential, (SpendingSettings, BettingSettings)):
            raise SmoothAdvError(f"sequential must be SpendingSettings or BettingSettings, got "
                                 f"{type(self.sequential).__name__}")
        if self.mode == "fixed" and (self.sequential is not None or self.class_from != "selection"):
            raise SmoothAdvError("a sequential test (or class_from label) needs mode sequential")

    @property
    def test(self) -> SpendingSettings | BettingSettings:
        """The sequential test's settings: `sequential`, or the alpha-spending test's defaults."""
        return self.sequential if self.sequential is not None else SpendingSettings()


@dataclass(frozen=True, kw_only=True)
class SmoothPredictionSettings(EvaluationSettings):
    """CAT-RS's precomputed smoothed prediction: the base classifier's vote counts on n noisy copies of each
    training example (Jeong, Kim & Shin, AAAI 2023; `evaluate.smooth_prediction_dataset`). The
    published run used n = 10,000 on the training split with a Gaussian-trained model at sigma = 0.25.
    `alpha` is unused (no test is made)."""

    n: int = setting(10_000, "noisy samples per example (CAT-RS: 10,000)", limit=AT_LEAST_ONE)
    split: str = setting("train", "dataset split (CAT-RS trains on the train split's predictions)",
                         choices=("test", "train"))

    command = "smooth-prediction"


@dataclass(frozen=True, kw_only=True)
class AttackRunSettings(EvaluationSettings):
    """Empirical robustness: the SmoothAdv attack on the smoothed classifier at each radius, then PREDICT.

    The run's own fields are its radii `eps`, the noise draws `m` of the attack, the PREDICT samples `n`
    and `base_attack`. The attack is its own settings: `attack` holds its recipe by key, as the command
    line's flags without dashes (`{"attack": "ddn", "steps": 20}`; `attacks.attack_settings` lists the
    keys). The run completes it with `attacks.attack_recipe` (the attack run's defaults: 20 steps; DDN's
    gamma and initial norm by the prediction script's rule at each radius), records it nested, and builds
    the attack of each radius with `attacks.build_attack`.
    """

    eps: tuple[float, ...] = setting(help="attack L2 radius in [0, 1] pixels; several radii make one row per "
                                     "(radius, example)", limit=NONNEGATIVE)
    m: int = setting(1, "noise draws estimating G in the attack (m_test)", limit=AT_LEAST_ONE)
    n: int = setting(1000, "PREDICT samples on the adversarial input", limit=AT_LEAST_ONE)
    base_attack: bool = setting(False, "attack the base classifier f alone (vanilla PGD)")
    attack: Mapping[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "the attack's recipe by key (attacks.attack_settings)", "rows": True,
                                        "nested": True})

    command = "attack"

    def __post_init__(self) -> None:
        if isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool):
            object.__setattr__(self, "eps", (self.eps,))  # one radius given as a number
        super().__post_init__()
        if not isinstance(self.attack, Mapping) or not all(isinstance(key, str) for key in self.attack):
            raise SmoothAdvError(f"attack must be the attack's settings by key, e.g. {{'attack': 'ddn', 'steps': 20}}, "
                                 f"got {self.attack!r}")
        object.__setattr__(self, "attack", dict(self.attack))  # the settings' own copy
        if not self.eps:
            raise SmoothAdvError("--eps needs at least one radius")
        if len(set(self.eps)) != len(self.eps):
            raise SmoothAdvError(f"--eps lists a radius twice: {self.eps}")
        if "eps" in self.attack:
            raise SmoothAdvError("the radii are the run's eps, not a setting of its attack")
        if self.attack.get("gradient_free") and self.base_attack:
            raise SmoothAdvError("--gradient-free estimates the smoothed classifier's gradient; drop --base-attack")


# ------------------------------------------------------------------ the demo


#: the datasets the demo can train on (each has a training split and a small default architecture)
DEMO_DATASETS = ("fashion_mnist", "synthetic", "cifar10")


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Settings of a demo run (checked when made; `smoothadv demo`'s flags are the fields in DEMO_FLAGS).
    Units: sigma and eps in [0, 1] pixels (L2)."""

    out: Path = setting(Path("runs/demo"), "run folder (re-running reuses finished steps)", rows=False)
    dataset: str = setting("fashion_mnist", "a dataset with a training split on this machine", choices=DEMO_DATASETS)
    sigma: float = setting(0.25, "noise level of both models and of certification", limit=POSITIVE)
    epochs: int = setting(4, "training epochs (both models)", limit=AT_LEAST_ONE)
    train_subset: int | None = setting(None, "train on the first N images only; all when not given",
                                       limit=AT_LEAST_ONE)
    batch_size: int = setting(128, "training batch size", limit=AT_LEAST_ONE)
    lr: float = setting(0.1, "SGD learning rate", limit=POSITIVE_FLOAT32)
    eps: float | None = setting(None, "SmoothAdv training eps (default: 2 sigma)", limit=NONNEGATIVE)
    steps: int = setting(2, "SmoothAdv training attack steps T", limit=AT_LEAST_ONE)
    m: int = setting(1, "SmoothAdv training noise draws m", limit=AT_LEAST_ONE)
    warmup: int = setting(1, "epochs over which the SmoothAdv training eps ramps up", limit=AT_LEAST_ONE)
    certify: int = setting(300, "test images to certify, evenly spaced over the test set", limit=AT_LEAST_ONE)
    n0: int = setting(100, "CERTIFY selection samples", limit=AT_LEAST_ONE)
    n: int = setting(2000, "CERTIFY samples", limit=AT_LEAST_ONE)
    alpha: float = setting(0.001, "failure probability of CERTIFY and PREDICT", limit=PROBABILITY)
    batch: int = setting(1000, "noisy samples per forward pass", limit=AT_LEAST_ONE, rows=False)
    attack_count: int = setting(50, "test images to attack, the first of the certified ones; 0: no attack",
                                limit=COUNT)
    attack_eps: tuple[float, ...] = setting((), "attack radii (default: 0, sigma, 2 sigma; eps = 0 is plain "
                                            "PREDICT)", limit=NONNEGATIVE)
    attack_steps: int = setting(20, "attack steps T", limit=AT_LEAST_ONE)
    attack_m: int = setting(16, "attack noise draws m", limit=AT_LEAST_ONE)
    attack_n: int = setting(1000, "PREDICT samples on each adversarial input", limit=AT_LEAST_ONE)
    device: str = setting("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    seed: int = setting(0, "seed for noise and data order", limit=SEED)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    fresh: bool = setting(False, "redo every step instead of reusing finished ones", rows=False)
    force: bool = setting(False, "replace files in --out that the demo did not write", rows=False)
    report_only: bool = setting(False, "rebuild table.md, accuracy.png and report.md from the TSVs of a finished "
                                "run in --out (give the run's flags; nothing is trained or certified)", rows=False)
    progress: bool = setting(True, PROGRESS_HELP, rows=False)

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def eps_values(self) -> tuple[float, ...]:
        return self.attack_eps or (0.0, self.sigma, 2 * self.sigma)


# ------------------------------------------------------------------ a training recipe


def flag_keys(cls: type) -> dict[str, str]:
    """Recipe/flag key -> field name of a settings class (`batch` -> `batch_size`, `out` -> `out_dir`)."""
    return {recipe_key(f): f.name for f in dataclasses.fields(cls)}


# ------------------------------------------------------------------ a denoiser training run


DENOISER_OBJECTIVES = ("mse", "stability", "classification")
"""The denoiser losses of Salman et al. (2020), Section 3.2 (`denoise.MSE`, `Stability`, `Classification`)."""


@dataclass(frozen=True, kw_only=True)
class DenoiserTrainSettings:
    """A denoiser training run of the one loop (`train.run_loop`); defaults are Salman et al.'s code: Adam,
    lr 1e-3, weight decay 1e-4, lr x0.1 every 30 epochs, 90 epochs, batch 256.

    `classifier` lists the classifier checkpoint(s) D is trained through (stability and classification):
    one is full access; several are query access through surrogates, round-robin per batch, with
    `eval_classifier` (the target) only measuring accuracy. `init` fine-tunes a trained denoiser."""

    dataset: str = setting("fashion_mnist", "dataset to train on", choices=registered("dataset"))
    arch: str = setting("dncnn_small", "denoiser size", choices=registered("denoiser"))
    depth: int | None = setting(None, "convolutions (default: the arch's)", limit=(lambda v: v >= 2, "an integer >= 2"))
    width: int | None = setting(None, "channels of the hidden convolutions (default: the arch's)", limit=AT_LEAST_ONE)
    out_dir: Path = setting(help="run directory (denoiser.pth.tar, log.tsv, args.json)", flag="--out", rows=False)
    sigma: float = setting(0.25, "noise level the denoiser removes (recorded; certify refuses another)",
                           limit=POSITIVE)
    objective: str = setting("mse", "mse: against the clean image; stability: f(D(x+delta)) vs f(x); "
                             "classification: f(D(x+delta)) vs the label", choices=DENOISER_OBJECTIVES)
    classifier: tuple[str, ...] | None = setting(None, "classifier checkpoint(s) D is trained through, f frozen "
                                                 "(several: query access, round-robin per batch)")
    eval_classifier: str | None = setting(None, "classifier whose accuracy the log reports (default: the first "
                                          "--classifier; the target under query access)")
    normalization: str | None = setting(None, "input layer of Cohen/Salman classifier checkpoints",
                                        choices=("normalize", "center"))
    init: str | None = setting(None, "fine-tune this denoiser checkpoint (MSE then stability: the paper's best)")
    epochs: int = setting(90, "training epochs", limit=AT_LEAST_ONE)
    batch_size: int = setting(256, "batch size", flag="--batch", limit=AT_LEAST_ONE)
    optimizer: str = setting("adam", "optimizer of the loop", choices=("adam", "sgd"))
    lr: float = setting(1e-3, "learning rate", limit=POSITIVE)
    lr_step: int = setting(30, "decay lr every this many epochs", limit=AT_LEAST_ONE)
    lr_gamma: float = setting(0.1, "lr decay factor", limit=POSITIVE)
    momentum: float = setting(0.9, "SGD momentum", limit=NONNEGATIVE)
    weight_decay: float = setting(1e-4, "weight decay", limit=NONNEGATIVE)
    seed: int = setting(0, "seed for initialization, noise and data order", limit=SEED)
    train_subset: int | None = setting(None, "train on the first N images only", limit=AT_LEAST_ONE)
    eval_subset: int | None = setting(1000, "evaluate on N test images each epoch", limit=AT_LEAST_ONE)
    device: str = setting("cpu", "cpu, cuda, cuda:1, ... (auto: cuda when available)", rows=False)
    data_dir: str | None = setting(None, "data root (default: $SMOOTHADV_DATA or ./data)", rows=False)
    resume: bool = setting(False, "continue from the run directory's checkpoint", rows=False)
    force: bool = setting(False, "start over even if a checkpoint exists", rows=False)
    progress: bool = setting(True, "progress bars", rows=False)

    def __post_init__(self) -> None:
        check_fields(self, recipe_key)
        if self.resume and self.force:
            raise SmoothAdvError("--resume and --force contradict each other; give one")
