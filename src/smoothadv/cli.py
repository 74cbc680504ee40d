"""The `smoothadv` command line: a thin argparse layer over the library.

Each subcommand parses its flags (in natural units: sigma 0.25 means 0.25 in [0, 1] pixels),
builds library objects, calls one library function and says where the output went. Bad input
ends with a one-line `smoothadv: error: ...` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import SmoothAdvError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# ------------------------------------------------------------------ argument types


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")
probability = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def forecast_level(text: str) -> float | str:
    """--forecast-alpha: a probability in (0, 1), or 'strict' (each look's own level)."""
    return "strict" if text == "strict" else probability(text)


def shard_spec(text: str) -> tuple[int, int]:
    try:
        i, k = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/k (e.g. 0/4), got {text!r}") from None
    if k < 1 or not 0 <= i < k:
        raise argparse.ArgumentTypeError(f"expected i/k with 0 <= i < k, got {text!r}")
    return i, k


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (with a pointer to --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_defaults(argv: Sequence[str]) -> dict[str, Any]:
    """Values of a `--config file.toml` recipe: its keys (flag names, - or _) become parser defaults."""
    if "--config" not in argv:
        return {}
    position = list(argv).index("--config")
    if position + 1 >= len(argv):
        raise SmoothAdvError("--config needs a file")
    path = Path(argv[position + 1])
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise SmoothAdvError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SmoothAdvError(f"config {path} is not valid TOML: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("paper", "certify"):  # a recipe's reference numbers and certify settings: not train flags
            continue
        if isinstance(value, dict):  # sections such as [train] are flattened
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    return flat


# ------------------------------------------------------------------ shared flags


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    parser.add_argument("--seed", type=nonneg_int, default=0, help="seed for noise and data order")
    parser.add_argument("--data-dir", default=None, help="data root (default: $SMOOTHADV_DATA or ./data)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def _evaluation(parser: argparse.ArgumentParser, default_n: int) -> None:
    parser.add_argument("checkpoint", help="model checkpoint (smoothadv, Cohen or Salman format)")
    parser.add_argument("--sigma", type=positive_float, required=True, help="noise level of the smoothed classifier")
    parser.add_argument("--out", required=True, help="output TSV (one row per example)")
    parser.add_argument("--n", type=positive_int, default=default_n, help="Monte Carlo samples")
    parser.add_argument("--alpha", type=probability, default=0.001, help="failure probability")
    parser.add_argument("--batch", type=positive_int, default=1000, help="noisy samples per forward pass")
    parser.add_argument("--skip", type=positive_int, default=1, help="use every skip-th example")
    parser.add_argument("--max", type=positive_int, default=None, help="stop after this many examples")
    parser.add_argument("--split", choices=("test", "train"), default="test")
    parser.add_argument("--normalization", choices=("normalize", "center"), default=None,
                        help="input layer for Cohen/Salman checkpoints, which do not record it (see README)")
    parser.add_argument("--shard", type=shard_spec, default=None,
                        help="run only shard i of k (i/k), writing OUT.shard-i-of-k; then `smoothadv merge OUT`")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast the base classifier's forward passes (fp16: GPU only; see README)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU speed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the base classifier")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold BatchNorm into the convolutions (same function up to float rounding; faster)")
    parser.add_argument("--resume", action="store_true", help="continue an existing output, skipping finished rows")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


# ------------------------------------------------------------------ commands


def _train_config(args: argparse.Namespace) -> Any:
    from .data import DEFAULT_ARCH
    from .train import TrainConfig

    arch = args.arch or DEFAULT_ARCH[args.dataset]
    return TrainConfig(
        dataset=args.dataset, arch=arch, out_dir=Path(args.out), sigma=args.sigma, epochs=args.epochs,
        batch_size=args.batch, lr=args.lr, lr_step=args.lr_step, lr_gamma=args.lr_gamma, momentum=args.momentum,
        weight_decay=args.weight_decay, normalization=args.normalization, seed=args.seed, device=args.device,
        workers=args.workers, data_dir=args.data_dir, train_subset=args.train_subset, eval_subset=args.eval_subset,
        pretrained=args.pretrained, pretrained_normalization=args.pretrained_normalization,
        unlabelled=args.unlabelled, unlabelled_weight=args.unlabelled_weight, resume=args.resume, force=args.force,
        progress=args.progress, precision=args.precision,
    )


def build_objective(args: argparse.Namespace) -> Any:
    """The training objective named by --objective, from the parsed flags."""
    from .objectives import OBJECTIVES, GaussianAugmentation

    if args.objective not in OBJECTIVES:
        raise SmoothAdvError(f"unknown objective {args.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if args.objective == "gaussian":
        return GaussianAugmentation(args.sigma)
    return OBJECTIVES[args.objective].from_args(args)  # type: ignore[attr-defined]


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a base classifier (Gaussian augmentation or SmoothAdv)")
    p.add_argument("--config", help="TOML recipe whose keys set these flags' defaults")
    p.add_argument("--dataset", default="fashion_mnist", choices=("fashion_mnist", "cifar10", "imagenet", "synthetic"))
    p.add_argument("--arch", default=None, help="architecture (default: the dataset's usual one)")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pth.tar, log.tsv, args.json)")
    p.add_argument("--objective", default="gaussian", help="gaussian or smoothadv")
    p.add_argument("--sigma", type=nonneg_float, default=0.25, help="training noise level")
    p.add_argument("--epochs", type=positive_int, default=90)
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--lr", type=positive_float, default=0.1)
    p.add_argument("--lr-step", type=positive_int, default=30, help="decay lr every this many epochs")
    p.add_argument("--lr-gamma", type=positive_float, default=0.1)
    p.add_argument("--momentum", type=nonneg_float, default=0.9)
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    p.add_argument("--normalization", choices=("normalize", "center", "none"), default="normalize",
                   help="input layer: mean/std, mean only, or none (raw [0, 1] pixels, as the LeNet recipes)")
    p.add_argument("--workers", type=nonneg_int, default=0, help="data loader processes")
    p.add_argument("--train-subset", type=positive_int, default=None, help="train on the first N images only")
    p.add_argument("--eval-subset", type=positive_int, default=1000, help="noisy test accuracy on N test images")
    p.add_argument("--pretrained", default=None, help="fine-tune from this checkpoint")
    p.add_argument("--pretrained-normalization", choices=("normalize", "center"), default=None)
    p.add_argument("--unlabelled", default=None, help=".npz of extra pseudo-labelled images (self-training)")
    p.add_argument("--unlabelled-weight", type=nonneg_float, default=1.0, help="loss weight of the extra batches")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="mixed precision: autocast forward passes and attacks (fp16: GPU, with loss scaling)")
    p.add_argument("--force", action="store_true", help="start over even if a checkpoint exists")
    a = p.add_argument_group("SmoothAdv (--objective smoothadv; Salman et al. 2019)")
    a.add_argument("--attack", default="pgd", help="pgd or ddn: attack on the smoothed soft classifier")
    a.add_argument("--eps", type=nonneg_float, default=0.5, help="attack L2 radius ([0, 1] pixels), after warm-up")
    a.add_argument("--steps", type=positive_int, default=2, help="attack steps T")
    a.add_argument("--m", type=positive_int, default=1, help="noise draws per input in the attack (m_train)")
    a.add_argument("--multi-noise", action="store_true", help="train on all m noisy copies (m SGD steps per batch)")
    a.add_argument("--warmup", type=positive_int, default=1, help="epochs over which eps ramps linearly to --eps")
    a.add_argument("--random-start", action="store_true", help="PGD: start at a random point of the eps-ball")
    a.add_argument("--gradient-free", action="store_true", help="PGD: Stein gradient estimate (no backprop; weaker)")
    a.add_argument("--ddn-gamma", type=probability, default=0.05, help="DDN norm update factor")
    a.add_argument("--ddn-init-norm", type=positive_float, default=1.0,
                   help="DDN initial norm (replaced by the warm-up eps each epoch, as the original)")
    _common(p)
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    from .distributed import env_world
    from .train import fit

    objective = build_objective(args)
    path = fit(_train_config(args), objective)
    if env_world()[0] == 0:
        print(f"checkpoint: {path}")


def _load_smooth(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    from .accel import prepare_base
    from .data import get_dataset
    from .distributed import env_world, local_device
    from .models import load_checkpoint
    from .smoothing import Smooth
    from .train import resolve_device

    _, world, local_rank = env_world()
    device = local_device(resolve_device(args.device), local_rank, world)  # torchrun: cuda -> cuda:LOCAL_RANK
    model, meta = load_checkpoint(args.checkpoint, device, normalization=args.normalization)
    model = prepare_base(model, device, getattr(args, "precision", "fp32"), getattr(args, "channels_last", False),
                         getattr(args, "compile", False), getattr(args, "fold_bn", False))
    dataset = get_dataset(meta["dataset"], args.split, args.data_dir)
    return Smooth(model, meta["num_classes"], args.sigma), dataset, meta, device


def _run_rows(args: argparse.Namespace, columns: Sequence[str], make_rows: Callable[[list[int]], Any],
              size: int, label: str) -> None:
    from tqdm.auto import tqdm

    from .distributed import env_world
    from .evaluate import row_fields, select_indices, shard_indices
    from .files import OutputLock, TsvLog, check_writable_output, write_provenance
    from .shards import check_resumable, file_sha256, merge_shards, shard_path, shards_complete

    rank, world, _ = env_world()
    if world > 1 and args.shard is not None:
        raise SmoothAdvError("--shard is for separate jobs; under torchrun the ranks already split the examples")
    shard = (rank, world) if world > 1 else args.shard  # torchrun: rank r of k writes OUT.shard-r-of-k
    final = Path(args.out)
    if world > 1:  # the merged output must be writable before any work starts
        check_writable_output(final, resume=args.resume, force=args.force)
    out = check_writable_output(shard_path(final, *shard) if shard else final, resume=args.resume, force=args.force)
    indices = select_indices(size, args.skip, args.max)
    # everything a row depends on; shards (and resumed runs) must agree on it (see shards.IGNORED_SETTINGS)
    settings = {**vars(args), "handler": None, "checkpoint_sha256": file_sha256(args.checkpoint),
                "dataset_size": size, "shard": list(shard) if shard else None}
    if shard is not None:
        indices = shard_indices(indices, *shard)
    with OutputLock(out), TsvLog(out, columns, resume=args.resume, force=args.force) as log:
        if args.resume:
            check_resumable(out, settings)
        todo = [i for i in indices if str(i) not in log.done]
        write_provenance(out.parent, settings, prefix=f"{out.name}.")
        with tqdm(total=len(indices), initial=len(indices) - len(todo), desc=label,
                  disable=not args.progress or rank != 0, dynamic_ncols=True) as bar:
            for row in make_rows(todo):
                log.write(row_fields(row))
                bar.update(1)
    if world > 1:  # the last rank to finish sees every shard complete and merges (merging twice is harmless)
        if shards_complete(final, world, settings):
            rows = merge_shards(final, [shard_path(final, i, world) for i in range(world)], force=True)
            print(f"wrote {final} ({rows} rows, merged from {world} shards)")
    elif shard is not None:
        print(f"wrote {out} ({len(indices)} rows, shard {shard[0]}/{shard[1]}); when all shards are done: "
              f"smoothadv merge {final}")
    else:
        print(f"wrote {out} ({len(indices)} rows)")


def add_certify(sub: Any) -> None:
    p = sub.add_parser("certify", help="CERTIFY each test example: prediction and certified L2 radius")
    _evaluation(p, 100_000)
    p.add_argument("--n0", type=positive_int, default=100, help="selection samples")
    q = p.add_argument_group("sequential certification (--mode sequential; same guarantee, far fewer samples)")
    q.add_argument("--mode", choices=("fixed", "sequential"), default="fixed",
                   help="fixed: Cohen's CERTIFY with n samples; sequential: looks at 1024, 2048, ... samples")
    q.add_argument("--class-from", choices=("selection", "label"), default=None,
                   help="sequential: class from n0 selection samples (Cohen; deployment, default) "
                        "or the known label (evaluation only)")
    q.add_argument("--policy", choices=("grid", "tolerance", "full"), default=None,
                   help="sequential stopping rule: settle certified/not at --radii (default), stop within "
                        "--tolerance of the best reachable radius, or make every look")
    q.add_argument("--radii", type=nonneg_float, nargs="+", default=None,
                   help="grid policy: radii to decide (one radius = single-radius mode; default 0, 0.25, ...)")
    q.add_argument("--tolerance", type=nonneg_float, default=None, help="tolerance policy: radius loss accepted")
    q.add_argument("--looks", default=None,
                   help="sequential doubling looks FIRST:LAST (default 1024:131072), alpha split equally; the grid "
                        "policy fits its schedule to them: the looks below a last look that keeps their cap at "
                        "alpha/2 (111,616 by default), plus a look where unanimous votes first certify the largest "
                        "radius (alpha/4)")
    q.add_argument("--forecast-alpha", type=forecast_level, default=None,
                   help="level of the upper bound that forecasts the reachable radius (default 0.05; 'strict' = "
                        "the look's own level; larger stops boundary inputs sooner; never affects validity)")
    _common(p)
    p.set_defaults(handler=run_certify)


def _sequential_config(args: argparse.Namespace) -> Any:
    from .sequential import DEFAULT_LOOKS, SequentialConfig, doubling_looks

    policy = args.policy or ("tolerance" if args.tolerance is not None else "grid")
    if policy == "tolerance" and args.tolerance is None:
        raise SmoothAdvError("--policy tolerance needs --tolerance")
    if args.radii is not None and policy != "grid":
        raise SmoothAdvError(f"--radii applies to the grid policy, not {policy}")
    base = DEFAULT_LOOKS  # the doubling looks; the grid policy fits its schedule on them
    if args.looks is not None:
        try:
            first, last = (int(part) for part in args.looks.split(":"))
        except ValueError:
            raise SmoothAdvError(f"--looks must be FIRST:LAST (e.g. 1024:131072), got {args.looks!r}") from None
        base = doubling_looks(first, last)
    forecast = {} if args.forecast_alpha is None else {"forecast_alpha": None if args.forecast_alpha == "strict"
                                                        else args.forecast_alpha}
    return SequentialConfig(args.sigma, args.alpha, None, policy, tuple(args.radii or ()), args.tolerance or 0.0,
                            base=base, **forecast)


def run_certify(args: argparse.Namespace) -> None:
    from .evaluate import CERTIFY_COLUMNS, certify_dataset

    if args.mode == "sequential":
        from .sequential import SEQUENTIAL_COLUMNS, certify_sequential_dataset

        config = _sequential_config(args)
        args.class_from = args.class_from or "selection"  # provenance records the resolved test
        args.policy, args.radii, args.looks = config.policy, list(config.radii), list(config.looks)
        args.levels = list(config.levels)  # alpha spent at each look (provenance; they sum to at most alpha)
        args.forecast_alpha = "strict" if config.forecast_alpha is None else config.forecast_alpha
        args.n = None  # unused: the looks set the sample sizes
        smooth, dataset, _, device = _load_smooth(args)
        _run_rows(args, SEQUENTIAL_COLUMNS,
                  lambda todo: certify_sequential_dataset(smooth, dataset, todo, config=config,
                                                          class_from=args.class_from, n0=args.n0,
                                                          batch_size=args.batch, seed=args.seed, device=device),
                  len(dataset), "certify")
        return
    class_from = None if args.class_from == "selection" else args.class_from  # fixed mode is Cohen's selection
    given = [flag for flag, value in (("--class-from", class_from), ("--policy", args.policy),
                                      ("--radii", args.radii), ("--tolerance", args.tolerance),
                                      ("--looks", args.looks), ("--forecast-alpha", args.forecast_alpha))
             if value is not None]
    if given:
        raise SmoothAdvError(f"{', '.join(given)} need --mode sequential")
    smooth, dataset, _, device = _load_smooth(args)
    _run_rows(args, CERTIFY_COLUMNS,
              lambda todo: certify_dataset(smooth, dataset, todo, n0=args.n0, n=args.n, alpha=args.alpha,
                                           batch_size=args.batch, seed=args.seed, device=device),
              len(dataset), "certify")


def add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="PREDICT each test example with the smoothed classifier (or abstain)")
    _evaluation(p, 1000)
    _common(p)
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> None:
    from .evaluate import PREDICT_COLUMNS, predict_dataset

    smooth, dataset, _, device = _load_smooth(args)
    _run_rows(args, PREDICT_COLUMNS,
              lambda todo: predict_dataset(smooth, dataset, todo, n=args.n, alpha=args.alpha,
                                           batch_size=args.batch, seed=args.seed, device=device),
              len(dataset), "predict")


def add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge shard TSVs (--shard i/k jobs or torchrun ranks) into one TSV")
    p.add_argument("out", help="merged output TSV; its shards are OUT.shard-i-of-k unless listed")
    p.add_argument("shards", nargs="*", help="shard files (default: every OUT.shard-*-of-* next to OUT)")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    p.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> None:
    from .shards import merge_shards

    rows = merge_shards(args.out, args.shards or None, force=args.force)
    print(f"wrote {args.out} ({rows} rows)")


def add_convert(sub: Any) -> None:
    p = sub.add_parser("convert-checkpoint", help="re-save a TRUSTED legacy checkpoint as a weights-only file")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--trust", action="store_true", help="confirm that you trust SRC (loading it can run its code)")
    p.set_defaults(handler=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from .models import convert_trusted_checkpoint

    if not args.trust:
        raise SmoothAdvError("converting unpickles the file, which can run code from it; pass --trust if you trust it")
    convert_trusted_checkpoint(args.src, args.dst)
    print(f"wrote {args.dst}")


def _named_path(text: str) -> tuple[str, str]:
    """NAME=path (or a bare path, named after its file stem)."""
    if "=" not in text or Path(text).exists():
        return Path(text).stem, text
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=path, got {text!r}")
    return name, path


def add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="certified-accuracy table and plot from certify (and attack) TSVs")
    p.add_argument("results", nargs="*", type=_named_path, metavar="NAME=path",
                   help="certify TSVs (ours, Cohen's or Salman's); repeating a NAME merges files (shards)")
    p.add_argument("--attack", action="append", type=_named_path, default=[], metavar="NAME=path",
                   help="attack/predict TSV: empirical accuracy vs eps (dashed); repeat a NAME for several eps")
    p.add_argument("--radii", type=nonneg_float, nargs="+", default=None,
                   help="table columns (default: 0, 0.25, ... up to the largest certified radius)")
    p.add_argument("--format", choices=("markdown", "latex", "csv"), default="markdown")
    p.add_argument("--out", default=None, help="write the table to this file (default: print it)")
    p.add_argument("--plot", default=None, help="write a PNG of accuracy vs radius (needs matplotlib)")
    p.add_argument("--max-radius", type=positive_float, default=None, help="x-axis limit of the plot")
    p.add_argument("--envelope", action="store_true", help="add the best-of-all-inputs row (and model used)")
    p.add_argument("--high-prob", action="store_true", help="add Cohen's high-probability corrected rows")
    p.add_argument("--alpha", type=probability, default=0.001, help="certification failure probability (high-prob)")
    p.add_argument("--rho", type=probability, default=0.001, help="high-prob: failure probability of the bound")
    p.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> None:
    from .files import atomic_write_text
    from .report import default_radii, format_table, load_results, merge, plot_accuracy, summarize

    def grouped(pairs: list[tuple[str, str]]) -> dict[str, Any]:
        files: dict[str, list[Any]] = {}
        for name, path in pairs:
            files.setdefault(name, []).append(load_results(path))
        return {name: merge(parts) for name, parts in files.items()}

    certify, attack = grouped(args.results), grouped(args.attack)
    if not certify and not attack:
        raise SmoothAdvError("give at least one certify TSV (NAME=path) or --attack NAME=path")
    for res in certify.values():
        if res.kind != "certify":
            raise SmoothAdvError(f"{res.path} has no radius column (a predict/attack file?): pass it with --attack")
    for res in attack.values():
        if res.kind != "attack":
            raise SmoothAdvError(f"{res.path} is a certify file (it has a radius column): pass it without --attack")
    table = summarize(certify, args.radii or default_radii(certify), attack=attack, include_envelope=args.envelope,
                      high_prob=args.high_prob, alpha=args.alpha, rho=args.rho)
    text = format_table(table, args.format)
    if args.out:
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    if args.plot:
        plot = plot_accuracy(certify, args.plot, attack=attack, max_radius=args.max_radius,
                             include_envelope=args.envelope)
        print(f"wrote {plot}")


def add_validity(sub: Any) -> None:
    p = sub.add_parser("validity", help="measure the rate of invalid certificates on classifiers with exact answers")
    p.add_argument("--trials", type=positive_int, default=2000, help="independent runs per (input, mode)")
    p.add_argument("--alpha", type=probability, default=0.1, help="failure probability (large, so failures show)")
    p.add_argument("--n", type=positive_int, default=100, help="estimation samples of fixed-n CERTIFY and PREDICT")
    p.add_argument("--n0", type=positive_int, default=10, help="selection samples")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer inputs (the test-suite version)")
    p.add_argument("--json", default=None, help="also write all results as JSON to this file")
    p.set_defaults(handler=run_validity)


def run_validity(args: argparse.Namespace) -> None:
    from .files import atomic_write_text
    from .validity import format_summary, format_table, results_json, run_suite

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


def add_attack(sub: Any) -> None:
    p = sub.add_parser("attack", help="empirical robustness: SmoothAdv attack on the smoothed classifier, then PREDICT")
    _evaluation(p, 1000)
    p.add_argument("--eps", type=nonneg_float, required=True, help="attack L2 radius in [0, 1] pixels")
    p.add_argument("--attack", default="pgd", help="pgd or ddn")
    p.add_argument("--steps", type=positive_int, default=20, help="attack steps T")
    p.add_argument("--m", type=positive_int, default=1, help="noise draws estimating G in the attack (m_test)")
    p.add_argument("--base-attack", action="store_true", help="attack the base classifier f alone (vanilla PGD)")
    p.add_argument("--random-start", action="store_true", help="PGD: start at a random point of the eps-ball")
    p.add_argument("--gradient-free", action="store_true", help="PGD: Stein gradient estimate (no backprop)")
    _common(p)
    p.set_defaults(handler=run_attack)


def run_attack(args: argparse.Namespace) -> None:
    from .attacks import DDN, PGDL2, SteinPGDL2, get_attack
    from .evaluate import ATTACK_COLUMNS, attack_dataset

    if args.gradient_free and args.base_attack:
        raise SmoothAdvError("--gradient-free estimates the smoothed classifier's gradient; drop --base-attack")
    cls = get_attack(args.attack)
    if cls is DDN:  # the original predict.py: the norm can shrink from eps to ~3/510 in T steps
        gamma = 1 - (3 / 510 / args.eps) ** (1 / args.steps) if args.eps > 3 / 510 else 0.05
        attack = DDN(args.eps, args.steps, gamma=gamma, init_norm=max(args.eps, 1e-3))
    else:
        attack = (SteinPGDL2 if args.gradient_free else PGDL2)(args.eps, args.steps, random_start=args.random_start)
    smooth, dataset, _, device = _load_smooth(args)
    _run_rows(args, ATTACK_COLUMNS,
              lambda todo: attack_dataset(smooth, attack, dataset, todo, m=args.m, n=args.n, alpha=args.alpha,
                                          batch_size=args.batch, seed=args.seed, device=device,
                                          base_attack=args.base_attack),
              len(dataset), "attack")


def add_pseudo_label(sub: Any) -> None:
    p = sub.add_parser("pseudo-label", help="label an unlabelled .npz with a model (for train --unlabelled)")
    p.add_argument("checkpoint", help="the labelling model's checkpoint")
    p.add_argument("--images", required=True, help=".npz with an `images` array (labels, if any, are ignored)")
    p.add_argument("--out", required=True, help="output .npz: the same `images` plus predicted `labels`")
    p.add_argument("--batch", type=positive_int, default=1000)
    p.add_argument("--normalization", choices=("normalize", "center"), default=None)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    p.set_defaults(handler=run_pseudo_label)


def run_pseudo_label(args: argparse.Namespace) -> None:
    from .pseudo import pseudo_label

    count = pseudo_label(args.checkpoint, args.images, args.out, batch_size=args.batch, device=args.device,
                         normalization=args.normalization, force=args.force)
    print(f"wrote {args.out} ({count} pseudo-labelled images)")


def add_demo(sub: Any) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="Gaussian vs SmoothAdv end to end: train, certify, attack, report (CPU minutes)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute run (fewer epochs, images and samples)")
    p.add_argument("--out", default=str(d.out), help="run folder (re-running reuses finished steps)")
    p.add_argument("--dataset", default=d.dataset, choices=("fashion_mnist", "synthetic", "cifar10"))
    p.add_argument("--sigma", type=positive_float, default=d.sigma, help="noise level of both models")
    p.add_argument("--epochs", type=positive_int, default=None, help=f"training epochs (default {d.epochs})")
    p.add_argument("--train-subset", type=positive_int, default=None, help="train on the first N images only")
    p.add_argument("--eps", type=nonneg_float, default=None, help="SmoothAdv training eps (default 2 sigma)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="SmoothAdv training attack steps T")
    p.add_argument("--m", type=positive_int, default=d.m, help="SmoothAdv training noise draws m")
    p.add_argument("--certify", type=positive_int, default=None, help=f"test images to certify (default {d.certify})")
    p.add_argument("--n", type=positive_int, default=None, help=f"CERTIFY samples (default {d.n})")
    p.add_argument("--attack-count", type=nonneg_int, default=None,
                   help=f"test images to attack (default {d.attack_count}; 0: no attack)")
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    _common(p)
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from .demo import QUICK, DemoConfig, run_demo

    values: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.dataset == "synthetic":
        values["train_subset"] = None
    for name in ("epochs", "train_subset", "eps", "certify", "n", "attack_count"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    run_demo(DemoConfig(out=Path(args.out), dataset=args.dataset, sigma=args.sigma, steps=args.steps, m=args.m,
                        device=args.device, seed=args.seed, data_dir=args.data_dir, fresh=args.fresh,
                        progress=args.progress, **values))


COMMANDS: list[Callable[[Any], None]] = [add_train, add_certify, add_predict, add_merge, add_convert, add_report,
                                         add_validity, add_attack, add_pseudo_label, add_demo]


def build_parser(defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    parser = Parser(prog="smoothadv", description="Randomized smoothing and SmoothAdv: certified L2 robustness.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"smoothadv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for add in COMMANDS:
        add(sub)
    if defaults:
        for action in sub.choices.values():
            known = {a.dest for a in action._actions}
            unknown = set(defaults) - known
            if action.prog.endswith(" train") and unknown:
                raise SmoothAdvError(f"config has unknown keys: {', '.join(sorted(unknown))}")
            action.set_defaults(**{k: v for k, v in defaults.items() if k in known})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `smoothadv` console script and `python -m smoothadv`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(_config_defaults(argv))
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
    except OSError as exc:
        print(f"smoothadv: error: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
