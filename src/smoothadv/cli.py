"""The `smoothadv` command line: flags mapped onto the library's typed settings, one library call each.

`train`, `certify`, `predict` and `attack` generate their flags from the settings dataclasses
(`settings.TrainSettings`, `CertifySettings`, ..., and each objective's own fields), so a flag, its
type, its limits, its help and its default are declared once, next to the setting. A flag that is
not given is not passed on: the dataclass's default applies (shown in --help). `--config recipe.toml`
fills the same settings from a file, type-checked the same way; flags given on the command line win.
Bad input ends with a one-line `smoothadv: error: ...` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from .errors import SmoothAdvError
from .sequential import doubling_looks
from .settings import (
    TESTS,
    AttackRunSettings,
    BettingSettings,
    CertifySettings,
    PredictSettings,
    RunSettings,
    SequentialSettings,
    SmoothPredictionSettings,
    SpendingSettings,
    TrainSettings,
    convert,
    fields_of,
    flag_keys,
    flag_name,
    make,
    recipe_key,
)

if TYPE_CHECKING:
    # What `add_subparsers` returns, to which each command adds its parser; and what flags are added to (a parser or
    # one of its argument groups).
    Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"
    ArgumentContainer: TypeAlias = argparse.ArgumentParser | argparse._ArgumentGroup

__all__ = [
    "COMMANDS", "EVALUATIONS", "PAIRS", "Parser", "SEQUENTIAL_FLAGS", "add_attack", "add_certify", "add_convert",
    "add_demo", "add_field", "add_merge", "add_predict", "add_pseudo_label", "add_report", "add_settings",
    "add_smooth_prediction", "add_train", "add_train_denoiser", "add_validity", "build_parser", "check_same_run",
    "main", "nonneg_float", "nonneg_int", "positive_float", "positive_int", "probability", "run_convert", "run_demo",
    "run_evaluation_command", "run_merge", "run_pseudo_label", "run_report", "run_train", "run_train_denoiser",
    "run_validity", "train_argv",
]

# ------------------------------------------------------------------ argument types


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text, kind, what, from_text=True)
        except SmoothAdvError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
probability = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def _pair(separator: str, example: str, check: Callable[[int, int], bool], rule: str) -> Callable[[str], Any]:
    def parse(text: str) -> tuple[int, int]:
        try:
            a, b = (int(part) for part in text.split(separator))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}") from None
        if not check(a, b):
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return a, b

    return parse


#: command-line spellings of the settings that are pairs
PAIRS = {"shard": _pair("/", "i/k (e.g. 0/4)", lambda i, k: k >= 1 and 0 <= i < k, "i/k with 0 <= i < k"),
         "looks": _pair(":", "FIRST:LAST (e.g. 1024:131072)", lambda a, b: 1 <= a <= b,
                        "FIRST:LAST with 1 <= FIRST <= LAST")}


def _field_type(field: dataclasses.Field, kind: Any) -> Callable[[str], Any]:
    """argparse `type` for one value of a settings field: strict conversion, then its limit."""
    flag = flag_name(field)
    limit = field.metadata.get("limit")
    scalar = kind
    args = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
    if len(args) == 1:  # X | None
        scalar = args[0]
        args = list(getattr(scalar, "__args__", ()))
    if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: nargs="+" of X
        scalar = args[0]

    def parse(text: str) -> Any:
        try:
            value = convert(text, scalar, flag, from_text=True)
        except SmoothAdvError as exc:
            raise argparse.ArgumentTypeError(str(exc).replace(f"{flag} must be", "expected")) from None
        if limit is not None and not isinstance(value, str) and not limit[0](value):
            raise argparse.ArgumentTypeError(f"expected {limit[1]}, got {text!r}")
        return value

    parse.__name__ = flag
    return parse


def add_settings(parser: ArgumentContainer, cls: type, *, skip: Sequence[str] = (),
                 defaults: dict[str, Any] | None = None, only: Sequence[str] | None = None,
                 notes: dict[str, str] | None = None) -> None:
    """Add one flag per field of the settings dataclass `cls` (its spelling, type, limit, choices, help).

    Flags default to argparse.SUPPRESS: only the flags given reach the settings, whose own defaults
    (or `defaults`, this command's) apply otherwise and are shown in --help, followed by the field's
    entry in `notes` if any (`(default: 4; --quick: 1)`).
    """
    defaults, notes = defaults or {}, notes or {}
    for name, (field, kind) in fields_of(cls).items():
        if name in skip or (only is not None and name not in only) or field.metadata.get("nested"):
            continue
        add_field(parser, field, kind, defaults.get(name, field.default), notes.get(name))


def add_field(parser: ArgumentContainer, field: dataclasses.Field, kind: Any, default: Any,
              note: str | None = None) -> None:
    """Add the flag of one settings field (see `add_settings`); its value reaches `args` under its recipe key."""
    meta = field.metadata
    shown = _shown(default)
    if note:
        shown = f"{shown[:-1]}; {note})" if shown else f" ({note})"
    choices = meta.get("choices")
    choices = choices() if callable(choices) else choices
    if meta.get("positional"):
        parser.add_argument(field.name, help=meta.get("help"))
        return
    options: dict[str, Any] = {"dest": recipe_key(field), "default": argparse.SUPPRESS,
                               "help": meta.get("help", "") + shown}
    if kind is bool and default is True:
        options["action"] = argparse.BooleanOptionalAction
    elif kind is bool:
        options["action"] = "store_true"
    else:
        options["type"] = PAIRS.get(field.name) or _field_type(field, kind)
        inner = [a for a in getattr(kind, "__args__", ()) if a is not type(None)]
        if getattr(inner[0] if len(inner) == 1 else kind, "__args__", (None, None))[-1] is Ellipsis:
            options["nargs"] = "+"
        if choices is not None:
            options["choices"] = choices
        if choices is None:
            options["metavar"] = meta.get("metavar") or flag_name(field)[2:].upper().replace("-", "_")
        options["required"] = default is dataclasses.MISSING
    parser.add_argument(flag_name(field), **options)


def _shown(default: Any) -> str:
    """' (default: X)' for --help, or nothing when there is no telling default."""
    if default is dataclasses.MISSING or default is None or isinstance(default, bool) or default == ():
        return ""
    return f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (with a pointer to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _split(values: dict[str, Any], *classes: type) -> list[dict[str, Any]]:
    """The given flag values, one dict per settings class (by field name)."""
    parts: list[dict[str, Any]] = []
    for cls in classes:
        keys = flag_keys(cls)
        parts.append({keys[k]: v for k, v in values.items() if k in keys})
    return parts


# ------------------------------------------------------------------ train


def _train_flags(parser: ArgumentContainer) -> None:
    """The flags every `train` command has: --config and the training settings."""
    parser.add_argument("--config", help="TOML recipe whose keys set these flags (flags given here win)")
    add_settings(parser, TrainSettings, defaults={"device": "auto", "arch": None, "out_dir": None})


def add_train(sub: Subcommands) -> None:
    from .attacks import attack_settings
    from .objectives import OBJECTIVES, has_attack, hyperparameters
    from .train import TRAINING_ATTACK_DEFAULTS

    p = sub.add_parser("train", help="train a base classifier: smoothadv train [OBJECTIVE] [flags] (default "
                       "objective: gaussian; `smoothadv train OBJECTIVE --help` lists its own flags)")
    _train_flags(p)
    objectives = p.add_subparsers(dest="objective", metavar="OBJECTIVE", parser_class=Parser,
                                  help=f"training method, one of {', '.join(OBJECTIVES)} (default: gaussian)")
    for name, cls in OBJECTIVES.items():
        summary = (cls.__doc__ or name).strip().splitlines()[0]
        q = objectives.add_parser(name, help=summary, description=summary)
        _train_flags(q)
        own = q.add_argument_group(f"{name} hyperparameters")
        for field, kind in hyperparameters(name).values():
            add_field(own, field, kind, field.default)
        if has_attack(name):
            group = q.add_argument_group("attack on the smoothed soft classifier (Salman et al. 2019, Section 3)")
            for key, (field, kind, owners) in attack_settings().items():
                default = TRAINING_ATTACK_DEFAULTS.get(key, field.default)
                note = f"{'/'.join(owners)} only" if len(owners) < 2 and key != "attack" else None
                add_field(group, field, kind, default, note)
        q.set_defaults(handler=run_train)
    p.set_defaults(handler=run_train)


def train_argv(argv: list[str]) -> list[str]:
    """`smoothadv train` arguments with the objective as the subcommand after `train`: `--objective NAME` (the
    older spelling) becomes `train NAME ...`, and without either, a `--config` recipe's objective is used, so that
    its own flags (`--m`, `--eps`, ...) can be given on the command line."""
    if not argv or argv[0] != "train":
        return argv  # other commands pay no import here
    from .objectives import OBJECTIVES

    rest = argv[1:]
    named = [i for i, a in enumerate(rest) if a == "--objective" or a.startswith("--objective=")]
    if named:
        i = named[0]
        name = rest[i].split("=", 1)[1] if "=" in rest[i] else (rest[i + 1] if i + 1 < len(rest) else "")
        del rest[i:i + (1 if "=" in rest[i] else 2)]
        if rest and rest[0] in OBJECTIVES and rest[0] != name:
            raise SmoothAdvError(f"--objective {name} and the objective {rest[0]} disagree; give one")
        return ["train", *([] if rest and rest[0] == name else [name]), *rest]
    if rest and rest[0] in OBJECTIVES:
        return argv
    config = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--config"] + \
        [a.split("=", 1)[1] for a in rest if a.startswith("--config=")]
    if config and "-h" not in rest and "--help" not in rest:
        from .settings import read_toml

        name = read_toml(config[0]).get("objective", "gaussian")
        if isinstance(name, str) and name in OBJECTIVES:
            return ["train", name, *rest]
    return argv


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line (others are absent: their settings' defaults apply)."""
    return {k: v for k, v in vars(args).items() if k not in ("handler", "command")}


def run_train(args: argparse.Namespace) -> None:
    from .distributed import env_world
    from .settings import read_toml
    from .train import fit, recipe

    values = _given(args)
    config = values.pop("config", None)
    named = values.pop("objective", None)
    file = {k: v for k, v in read_toml(config).items() if k not in ("paper", "certify")} if config else {}
    for key in ("force", "resume"):
        if key in file:
            raise SmoothAdvError(f"{config}: {key} cannot be set in a recipe (a recipe describes a run; replacing or "
                                 f"continuing one is for the command line): remove it and pass --{key}")
    if named is not None and file.get("objective", named) != named:
        raise SmoothAdvError(f"{config} trains the {file['objective']} objective, not {named}")
    settings, objective = recipe({"device": "auto", **file, **({"objective": named} if named else {}), **values},
                                 source=config or "")
    path = fit(settings, objective)
    if env_world()[0] == 0:
        print(f"checkpoint: {path}")


# ------------------------------------------------------------------ train-denoiser


def add_train_denoiser(sub: Subcommands) -> None:
    from .settings import DenoiserTrainSettings

    p = sub.add_parser("train-denoiser", help="train a denoiser D for a classifier you cannot retrain (denoised "
                       "smoothing: certify f o D with certify --denoiser)")
    add_settings(p, DenoiserTrainSettings, defaults={"device": "auto"})
    p.set_defaults(handler=run_train_denoiser)


def run_train_denoiser(args: argparse.Namespace) -> None:
    from .data import dataset_info, input_shape
    from .denoise import build_denoiser
    from .models import build_model, cost_summary, load_checkpoint
    from .settings import DenoiserTrainSettings
    from .train import train_denoiser

    values = _given(args)
    settings = make(DenoiserTrainSettings, {flag_keys(DenoiserTrainSettings)[k]: v for k, v in values.items()})
    shape = input_shape(settings.dataset)
    denoiser = build_denoiser(settings.arch, shape[0], settings.depth, settings.width)
    if settings.classifier:
        classifier, meta = load_checkpoint(settings.classifier[0], normalization=settings.normalization)
        arch = meta["arch"]
    else:
        arch = dataset_info(settings.dataset).default_arch
        classifier = build_model(arch, settings.dataset)
    print(f"cost: {cost_summary(denoiser, classifier, shape)} ({settings.arch} in front of {arch})")
    print(f"denoiser: {train_denoiser(settings)}")


# ------------------------------------------------------------------ train-diffusion


def add_train_diffusion(sub: Subcommands) -> None:
    from .diffusion import DiffusionTrainSettings

    p = sub.add_parser("train-diffusion", help="train a small DDPM (Ho et al. 2020; resumable) to use as a diffusion "
                       "denoiser (Carlini et al. 2023): certify --denoiser OUT/model")
    add_settings(p, DiffusionTrainSettings)
    p.set_defaults(handler=run_train_diffusion)


def run_train_diffusion(args: argparse.Namespace) -> None:
    from .diffusion import DiffusionTrainSettings, train_ddpm

    values = _given(args)
    settings = make(DiffusionTrainSettings, {flag_keys(DiffusionTrainSettings)[k]: v for k, v in values.items()})
    print(f"model: {train_ddpm(settings)}")


# ------------------------------------------------------------------ certify, predict, attack


EVALUATIONS: dict[str, type] = {"certify": CertifySettings, "predict": PredictSettings, "attack": AttackRunSettings,
                                "smooth-prediction": SmoothPredictionSettings}


def _add_evaluation(sub: Subcommands, command: str, help: str) -> None:
    p = sub.add_parser(command, help=help)
    add_settings(p, RunSettings)
    add_settings(p, EVALUATIONS[command])
    p.set_defaults(handler=run_evaluation_command)


def _forecast(text: str) -> float | None:
    """--forecast-alpha: a probability, or 'strict' (None: the look's own level)."""
    if text == "strict":
        return None
    return probability(text)


def add_certify(sub: Subcommands) -> None:
    _add_evaluation(sub, "certify", "CERTIFY each test example: prediction and certified L2 radius")
    p = sub.choices["certify"]
    g = p.add_argument_group("sequential test (--mode sequential; settings.SpendingSettings / BettingSettings)")
    g.add_argument("--test", choices=tuple(TESTS), default=argparse.SUPPRESS,
                   help="spending: group-sequential Clopper-Pearson with alpha spending (default); betting: "
                   "anytime-valid betting confidence sequence")
    g.add_argument("--looks", type=PAIRS["looks"], metavar="FIRST:LAST", default=argparse.SUPPRESS,
                   help="spending: the doubling looks FIRST, 2 FIRST, ... LAST the grid schedule is fitted on (default "
                   "1024:131072); betting: the first draw and the largest number of samples (default 64 and 111,616 "
                   "at alpha 0.001)")
    for name in ("policy", "radii", "tolerance", "selection"):
        field, kind = fields_of(SequentialSettings)[name]
        add_field(g, field, kind, field.default)
    g.add_argument("--forecast-alpha", type=_forecast, default=argparse.SUPPRESS, metavar="ALPHA|strict",
                   help="level of the upper bound that forecasts the reachable radius (default 0.05; 'strict' = "
                   "the look's own level)")


SEQUENTIAL_FLAGS = ("test", "looks", "policy", "radii", "tolerance", "selection", "forecast_alpha")


def _sequential_settings(values: dict[str, Any]) -> SpendingSettings | BettingSettings | None:
    """The sequential test the certify flags describe (popped from `values`), or None when none is given; a
    tolerance alone means the tolerance policy (as it always did on the command line)."""
    given = {key: values.pop(key) for key in SEQUENTIAL_FLAGS if key in values}
    mode = values.get("mode", "fixed")
    if mode != "sequential":
        flags = [f"--{key.replace('_', '-')}" for key in given]
        if values.get("class_from", "selection") != "selection":
            flags.insert(0, "--class-from")
        if flags:
            raise SmoothAdvError(f"{', '.join(flags)} need --mode sequential")
        return None
    test = TESTS[given.pop("test", "spending")]
    looks = given.pop("looks", None)
    if looks is not None:
        given.update(first=looks[0], last=looks[1]) if test is BettingSettings else given.update(
            base=doubling_looks(*looks))
    if "tolerance" in given and "policy" not in given:
        given["policy"] = "tolerance"
    if given.get("policy") == "tolerance" and "tolerance" not in given:
        raise SmoothAdvError("--policy tolerance needs --tolerance")
    if "radii" in given and given.get("policy", "grid") != "grid":
        raise SmoothAdvError(f"--radii applies to the grid policy, not {given['policy']}")
    return make(test, given)


def _attack_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """The attack's settings among the attack command's flags (popped from `values`), by recipe key."""
    from .attacks import attack_settings

    return {key: values.pop(key) for key in attack_settings() if key != "eps" and key in values}


def add_predict(sub: Subcommands) -> None:
    _add_evaluation(sub, "predict", "PREDICT each test example with the smoothed classifier (or abstain)")


def add_attack(sub: Subcommands) -> None:
    from .attacks import DDN_RULE_KEYS, attack_settings
    from .run import ATTACK_RUN_DEFAULTS

    _add_evaluation(sub, "attack", "empirical robustness: SmoothAdv attack on the smoothed classifier, then PREDICT")
    group = sub.choices["attack"].add_argument_group(
        "the attack (settings.AttackRunSettings.attack; attacks.attack_recipe)",
        "DDN's gamma and initial norm default to Salman et al.'s predict.py rule at each radius: gamma = 1 - "
        "(3/510/eps)^(1/T), starting at norm max(eps, 1e-3) (predict.py starts at 1.0 whatever eps: a deliberate "
        "deviation, since its gamma rule assumes a start at eps; --ddn-init-norm 1.0 gives the script's)")
    for key, (field, kind, owners) in attack_settings().items():
        if key == "eps":
            continue  # the run's radii (--eps, several allowed)
        rule = "predict.py's rule at each eps" if key in DDN_RULE_KEYS else None
        note = "/".join(owners) + " only" if len(owners) < 2 and key != "attack" else None
        add_field(group, field, kind, None if rule else ATTACK_RUN_DEFAULTS.get(key, field.default),
                  "; ".join(part for part in (rule, note) if part) or None)


def add_smooth_prediction(sub: Subcommands) -> None:
    _add_evaluation(sub, "smooth-prediction", "CAT-RS's smoothed prediction: vote counts on n noisy copies of each "
                    "training example (resumable, --shard), the target of `train --objective catrs`")


def run_evaluation_command(args: argparse.Namespace) -> None:
    from .run import run_evaluation

    command = args.command
    given = _given(args)
    sequential = _sequential_settings(given) if command == "certify" else None
    attack = _attack_recipe(given) if command == "attack" else None
    run_values, values = _split(given, RunSettings, EVALUATIONS[command])
    if sequential is not None:
        values["sequential"] = sequential
    if attack is not None:
        values["attack"] = attack
    run_evaluation(make(RunSettings, run_values), make(EVALUATIONS[command], values))


def add_merge(sub: Subcommands) -> None:
    p = sub.add_parser("merge", help="merge shard TSVs (--shard i/k jobs or torchrun ranks) into one TSV")
    p.add_argument("out", help="merged output TSV; its shards are OUT.shard-i-of-k unless listed")
    p.add_argument("shards", nargs="*", help="shard files (default: every OUT.shard-*-of-* next to OUT)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT (default: refuse)")
    p.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> None:
    from .run import merge_shards

    rows = merge_shards(args.out, args.shards or None, force=args.force)
    print(f"wrote {args.out} ({rows} rows)")


def add_convert(sub: Subcommands) -> None:
    p = sub.add_parser("convert-checkpoint", help="re-save a TRUSTED legacy checkpoint as a weights-only file")
    p.add_argument("src", help="the legacy checkpoint (a full pickle)")
    p.add_argument("dst", help="the weights-only checkpoint to write")
    p.add_argument("--trust", action="store_true", help="confirm that you trust SRC (loading it can run its code; "
                   "default: refuse)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from .models import convert_trusted_checkpoint

    if not args.trust:
        raise SmoothAdvError("converting unpickles the file, which can run code from it; pass --trust if you trust it")
    convert_trusted_checkpoint(args.src, args.dst, force=args.force)
    print(f"wrote {args.dst}")


def _named_path(text: str) -> tuple[str, str]:
    """NAME=path (or a bare path, named after its file stem)."""
    if "=" not in text or Path(text).exists():
        return Path(text).stem, text
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=path, got {text!r}")
    return name, path


def add_report(sub: Subcommands) -> None:
    p = sub.add_parser("report", help="certified-accuracy table and plot from certify (and attack) TSVs")
    p.add_argument("results", nargs="*", type=_named_path, metavar="NAME=path",
                   help="certify TSVs (ours, Cohen's or Salman's); repeating a NAME merges files (shards)")
    p.add_argument("--attack", action="append", type=_named_path, default=[], metavar="NAME=path",
                   help="attack/predict TSV: empirical accuracy vs eps (dashed); repeat a NAME for several eps")
    p.add_argument("--radii", type=nonneg_float, nargs="+", default=None,
                   help="table columns (default: 0, 0.25, ... up to the largest certified radius)")
    p.add_argument("--format", choices=("markdown", "latex", "csv"), default="markdown",
                   help="table format (default: markdown)")
    p.add_argument("--out", default=None, help="write the table to this file (default: print it)")
    p.add_argument("--plot", default=None, help="write a plot of accuracy vs radius; the extension names the format: "
                   ".png, .pdf or .svg (needs matplotlib; default: no plot)")
    p.add_argument("--max-radius", type=positive_float, default=None,
                   help="x-axis limit of the plot (default: 1.1 x the largest radius, in steps of 0.25)")
    p.add_argument("--envelope", action="store_true", help="add the best-of-all-inputs row (and model used)")
    p.add_argument("--high-prob", action="store_true",
                   help="add Cohen's high-probability corrected rows, acc(r) - alpha - sqrt(alpha (1 - alpha) "
                   "ln(1/rho) / N) - ln(1/rho) / (3 N), clipped at 0 (Cohen's analyze.py prints the raw value, which "
                   "can be negative; a negative lower bound on an accuracy says nothing more than 0)")
    p.add_argument("--ci", action="store_true",
                   help="add a 95%% Clopper-Pearson interval over the test images to each certified accuracy "
                        "(and a band to the plot)")
    p.add_argument("--paired", action="store_true",
                   help="compare every certify input with the first one on their common test images, after the "
                        "table: at each radius an exact McNemar test on the images only one model certifies "
                        "(Holm-adjusted over all radii and comparisons), and the ACR difference with its 95%% "
                        "interval")
    p.add_argument("--alpha", type=probability, default=0.001,
                   help="certification failure probability (high-prob; default: 0.001)")
    p.add_argument("--rho", type=probability, default=0.001,
                   help="high-prob: failure probability of the bound (default: 0.001)")
    p.add_argument("--published", action="append", type=_named_path, default=[], metavar="NAME=recipe.toml",
                   help="add the published row of a recipe's [paper] section under the certify row NAME (with --ci, "
                        "a dagger marks published values outside the measured interval; crosses in the plot)")
    p.add_argument("--cost", default=None, metavar="TSV",
                   help="add training-cost columns to the certified rows named in this TSV (columns name, "
                        "cpu_s_per_epoch, optional model = the cost model's prediction in units of the first row's "
                        "epoch; benchmarks/method_cost.py --tsv writes one): CPU-s per epoch, the ratio to the first "
                        "row, and that ratio divided by the cost model")
    p.add_argument("--radius-cdf", default=None, metavar="FILE",
                   help="write certified accuracy with its 95%% band beside the empirical CDF of each model's "
                   "certified radius (95%% DKW band); the extension names the format (.png, .pdf, .svg)")
    p.add_argument("--cdf-of", choices=("radius", "p_lower"), default="radius",
                   help="--radius-cdf: the distribution of the certified radius (default) or of the lower bound "
                   "p_A = Phi(R / sigma) (needs --sigma)")
    p.add_argument("--sigma", type=positive_float, default=None, help="--cdf-of p_lower: the noise level")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out, --plot or --radius-cdf file "
                   "(never an input)")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> None:
    from .files import atomic_write_text, check_new_output
    from .report import (
        Results,
        default_radii,
        format_table,
        load_costs,
        load_published,
        load_results,
        merge,
        paired_text,
        plot_accuracy,
        plot_format,
        plot_radius_cdf,
        summarize,
    )

    inputs = [path for _, path in [*args.results, *args.attack, *args.published]] + ([args.cost] if args.cost else [])
    targets = (("--out", args.out), ("--plot", args.plot), ("--radius-cdf", args.radius_cdf))
    for flag, target in targets:
        if target:
            check_new_output(target, force=args.force, inputs=inputs, flag=flag)
    named = [(flag, Path(target).resolve()) for flag, target in targets if target]
    for i, (flag, path) in enumerate(named):
        for other, again in named[i + 1:]:
            if path == again:
                raise SmoothAdvError(f"{flag} and {other} name the same file {path}; give two files")
    if args.cdf_of == "p_lower" and args.sigma is None:
        raise SmoothAdvError("--cdf-of p_lower needs --sigma (p_A = Phi(R / sigma))")
    if args.radius_cdf:
        plot_format(args.radius_cdf)

    def grouped(pairs: list[tuple[str, str]]) -> dict[str, Results]:
        files: dict[str, list[str]] = {}
        for name, path in pairs:
            files.setdefault(name, []).append(path)
        for name, paths in files.items():
            if len(paths) > 1:
                check_same_run(name, paths)
        return {name: merge([load_results(path) for path in paths]) for name, paths in files.items()}

    if args.plot:
        plot_format(args.plot)  # an unknown extension is refused before anything is read, printed or written
    certify, attack = grouped(args.results), grouped(args.attack)
    if not certify and not attack:
        raise SmoothAdvError("give at least one certify TSV (NAME=path) or --attack NAME=path")
    for res in certify.values():
        if res.kind != "certify":
            raise SmoothAdvError(f"{res.path} has no radius column (a predict/attack file?): pass it with --attack")
    for res in attack.values():
        if res.kind != "attack":
            raise SmoothAdvError(f"{res.path} is a certify file (it has a radius column): pass it without --attack")
    published = {}
    for name, path in args.published:
        if name in published:
            raise SmoothAdvError(f"--published {name}= is given twice")
        published[name] = load_published(path)
        measured = {sigma for n, p in args.results if n == name and (sigma := _recorded_sigma(p)) is not None}
        if published[name].sigma is not None and measured and measured != {published[name].sigma}:
            raise SmoothAdvError(f"--published {name}={path} was certified at sigma {published[name].sigma:g}, the "
                                 f"measured {name} at sigma {', '.join(f'{v:g}' for v in sorted(measured))}: compare "
                                 "rows of one sigma")
    costs = load_costs(args.cost) if args.cost else None
    table = summarize(certify, args.radii or default_radii(certify), attack=attack, include_envelope=args.envelope,
                      high_prob=args.high_prob, alpha=args.alpha, rho=args.rho, ci=args.ci, published=published,
                      costs=costs)
    text = format_table(table, args.format)
    if args.paired:
        if len(certify) < 2:
            raise SmoothAdvError(f"--paired compares certify inputs with the first one, got {len(certify)} input")
        check_same_data([path for _, path in args.results])
        text += paired_text(certify, table.radii, args.format)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    if args.plot:
        plot = plot_accuracy(certify, args.plot, attack=attack, max_radius=args.max_radius,
                             include_envelope=args.envelope, ci=args.ci, published=published)
        print(f"wrote {plot}")
    if args.radius_cdf:
        if not certify:
            raise SmoothAdvError("--radius-cdf needs certify inputs (NAME=path)")
        figure = plot_radius_cdf(certify, args.radius_cdf, quantity=args.cdf_of, sigma=args.sigma,
                                 max_radius=args.max_radius)
        print(f"wrote {figure}")


def _recorded_sigma(path: str) -> float | None:
    """The sigma recorded next to a result file (its `.args.json`), or None without one."""
    from .rundir import read_settings

    recorded = read_settings(path)
    sigma = recorded.get("sigma") if recorded else None
    return float(sigma) if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) else None


def check_same_run(name: str, paths: Sequence[str]) -> None:
    """Refuse (one line) to merge under one NAME result files whose recorded settings differ in anything but
    where they were computed (the rule of `smoothadv merge`: shards of one run, at any batch size)."""
    from .run import BATCH_SETTINGS, normalize_record, setting_differences
    from .rundir import read_settings

    recorded = [(path, read_settings(path)) for path in paths]
    known = [(path, settings) for path, settings in recorded if settings is not None]
    for path, settings in known[1:]:
        differences = setting_differences(normalize_record(known[0][1]), normalize_record(settings),
                                          BATCH_SETTINGS | {"max"})
        if differences:
            raise SmoothAdvError(f"{name}: {path} and {known[0][0]} were run with different settings "
                                 f"({'; '.join(differences)}); give them different names")


#: what selects a run's examples (an evaluation's sidecar records no dataset name, only its size): two outputs
#: recording the same values selected the same examples, so the digest of those examples (`data_sha256`) must be
#: the same when they were read from the same data
SELECTION_KEYS = ("split", "dataset_size", "skip", "max")


def check_same_data(paths: Sequence[str]) -> None:
    """Refuse (one line) a paired comparison of result files that selected the same examples (`SELECTION_KEYS`
    recorded alike) but recorded other digests of them (`data_sha256`): another dataset or --data-dir. Files
    without a settings sidecar or a digest are not compared (their labels still are, `report.compare`)."""
    from .rundir import read_settings

    seen: dict[tuple[Any, ...], tuple[str, Any]] = {}
    for path in paths:
        recorded = read_settings(path)
        if recorded is None or not isinstance(recorded.get("data_sha256"), str):
            continue
        key = tuple(json.dumps(recorded.get(name)) for name in SELECTION_KEYS)
        first, digest = seen.setdefault(key, (path, recorded["data_sha256"]))
        if digest != recorded["data_sha256"]:
            raise SmoothAdvError(f"{path} and {first} select the same test images but were computed on different "
                                 "data (data_sha256 differs): a paired comparison needs the same images")


def add_validity(sub: Subcommands) -> None:
    p = sub.add_parser("validity", help="measure the rate of invalid certificates on classifiers with exact answers")
    p.add_argument("--trials", type=positive_int, default=2000, help="independent runs per (input, mode) "
                   "(default: 2000)")
    p.add_argument("--alpha", type=probability, default=0.1, help="failure probability (large, so failures show; "
                   "default: 0.1)")
    p.add_argument("--n", type=positive_int, default=100, help="estimation samples of fixed-n CERTIFY and PREDICT "
                   "(default: 100)")
    p.add_argument("--n0", type=positive_int, default=10, help="selection samples (default: 10)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--quick", action="store_true", help="fewer inputs (the test-suite version)")
    p.add_argument("--json", default=None, help="also write all results as JSON to this file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    p.set_defaults(handler=run_validity)


def run_validity(args: argparse.Namespace) -> None:
    from .files import atomic_write_text, check_new_output
    from .validity import format_summary, format_table, results_json, run_suite

    if args.json:
        check_new_output(args.json, force=args.force, flag="--json")
    results = run_suite(trials=args.trials, alpha=args.alpha, n=args.n, n0=args.n0, seed=args.seed,
                        quick=args.quick, progress=lambda r: print(f"  {r.problem:<34} {r.mode:<34} "
                                                                   f"{r.checked}/{r.trials}", file=sys.stderr))
    print(format_table(results))
    print()
    print(format_summary(results))
    if args.json:
        atomic_write_text(args.json, results_json(results) + "\n")
    if not all(r.passed for r in results):
        raise SmoothAdvError("some validity checks failed (see the table)")


def add_pseudo_label(sub: Subcommands) -> None:
    p = sub.add_parser("pseudo-label", help="label an unlabelled .npz with a model (for train --unlabelled)")
    p.add_argument("checkpoint", help="the labelling model's checkpoint")
    p.add_argument("--images", required=True, help=".npz with an `images` array (labels, if any, are ignored)")
    p.add_argument("--out", required=True, help="output .npz: the same `images` plus predicted `labels`")
    p.add_argument("--batch", type=positive_int, default=1000, help="images per forward pass (default: 1000)")
    p.add_argument("--normalization", choices=("normalize", "center"), default=None,
                   help="input layer of a Cohen/Salman checkpoint, which does not record it (default: the "
                   "checkpoint's own)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output (default: refuse)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto, cuda when available)")
    p.set_defaults(handler=run_pseudo_label)


def run_pseudo_label(args: argparse.Namespace) -> None:
    from .pseudo import pseudo_label

    count = pseudo_label(args.checkpoint, args.images, args.out, batch_size=args.batch, device=args.device,
                         normalization=args.normalization, force=args.force)
    print(f"wrote {args.out} ({count} pseudo-labelled images)")


def add_demo(sub: Subcommands) -> None:
    from .demo import DEMO_FLAGS, QUICK, DemoConfig

    p = sub.add_parser("demo", help="Gaussian vs SmoothAdv end to end: train, certify, attack, report (CPU minutes)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute run (fewer epochs, images and samples)")
    add_settings(p, DemoConfig, only=DEMO_FLAGS, notes={name: f"--quick: {value}" for name, value in QUICK.items()})
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import QUICK, DemoConfig, run_demo

    values = _given(args)
    preset: dict[str, Any] = dict(QUICK) if values.pop("quick") else {}
    if values.get("dataset") == "synthetic":
        preset["train_subset"] = None  # the synthetic set is small
    run_demo(make(DemoConfig, {**preset, **values}))


COMMANDS: list[Callable[[Subcommands], None]] = [add_train, add_train_denoiser, add_certify, add_predict, add_merge,
                                         add_convert, add_report, add_validity, add_attack, add_pseudo_label, add_demo,
                                         add_smooth_prediction, add_train_diffusion]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="smoothadv", description="Randomized smoothing and SmoothAdv: certified L2 robustness.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"smoothadv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `smoothadv` console script and `python -m smoothadv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = train_argv(argv)
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error already printed by argparse
            return int(exc.code or 0)
        args.handler(args)
    except SmoothAdvError as exc:
        print(f"smoothadv: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smoothadv: interrupted (finished rows and checkpoints are kept; rerun with --resume)", file=sys.stderr)
        return 130
    except OSError as exc:  # the library names its files in SmoothAdvErrors; this is the last resort
        where = getattr(exc, "filename", None)
        print(f"smoothadv: error: {exc.strerror or exc}" + (f": {where}" if where else ""), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
