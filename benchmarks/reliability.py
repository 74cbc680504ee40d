"""Reliability figures for the README: guarantee measured, crash drills, hostile input.

    OMP_NUM_THREADS=1 python benchmarks/reliability.py                 # about 10 minutes on 1 CPU core
    OMP_NUM_THREADS=1 python benchmarks/reliability.py --quick         # about 2 minutes
    OMP_NUM_THREADS=1 python benchmarks/reliability.py --from-json results/reliability/validity_*.json
                                      # reuse a benchmarks/validity.py run for part 1

1. Validity: `smoothadv.validity.run_suite` (every certification mode on classifiers whose
   smoothed classifier is known exactly): trials, invalid-certificate rate versus alpha.
2. Certify crash drills: `smoothadv certify` on a toy model is SIGKILLed 1-3 times per drill at
   random rows (before a row, after a row, or half-way through writing one), then resumed with
   `--resume`; the result is compared row by row with an uninterrupted run: rows lost,
   duplicated or changed.
3. Training crash drills: `fit` is SIGKILLed at a random batch of a random epoch or half-way
   through writing a checkpoint, then resumed; the final weights, optimizer, scheduler and RNG
   states are compared bitwise with an uninterrupted run.
4. Fuzzing: random CLI command lines (nasty flag values), random `Smooth` arguments and bad
   images: inputs tried, and how many ended in anything but success or a one-line error.

Kills use os.fork + SIGKILL (Linux/macOS). Everything runs on CPU with one thread, so floating
point is bitwise reproducible.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import smoothadv.files as files_module
import smoothadv.train as train_module
from smoothadv import Smooth, SmoothAdvError
from smoothadv.cli import main as cli_main
from smoothadv.files import TsvLog
from smoothadv.models import build_model, normalization_spec, read_checkpoint, save_checkpoint
from smoothadv.objectives import GaussianAugmentation
from smoothadv.settings import TrainSettings
from smoothadv.train import fit
from smoothadv.validity import Problem, Result, format_summary, run_suite, summarize

# ------------------------------------------------------------------ helpers


def run_killed(work: Callable[[], None]) -> bool:
    """Run `work` in a forked child; True if it died by SIGKILL (False if it finished or failed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
                work()
        except BaseException:  # noqa: BLE001
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def quiet_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


# ------------------------------------------------------------------ certify crash drills


def certify_drills(work: Path, drills: int, rows: int, rng: np.random.Generator) -> dict[str, int]:
    ckpt = work / "toy.pth.tar"
    torch.manual_seed(0)
    save_checkpoint(ckpt, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)

    def args(out: Path) -> list[str]:
        return ["certify", str(ckpt), "--sigma", "0.25", "--out", str(out), "--n", "200", "--n0", "10", "--batch",
                "100", "--max", str(rows), "--alpha", "0.01", "--no-progress", "--device", "cpu"]

    def table(path: Path) -> list[list[str]]:
        return [line.split("\t")[:-1] for line in path.read_text().splitlines()[1:]]

    reference = work / "reference.tsv"
    assert quiet_cli(args(reference))[0] == 0
    expected = table(reference)
    totals = {"drills": 0, "kills": 0, "rows_expected": 0, "rows_lost": 0, "rows_duplicated": 0, "rows_changed": 0,
              "resume_failures": 0}
    real_write = TsvLog.write
    for d in range(drills):
        out = work / f"drill{d}.tsv"
        for _ in range(int(rng.integers(1, 4))):
            done = len(table(out)) if out.exists() else 0
            if done >= rows - 1:
                break
            at = int(rng.integers(done, rows - 1))  # die while writing row number `at` (0-based, whole file)
            how = str(rng.choice(["before", "torn", "after"]))

            def dying_write(self, values, at=at, how=how):
                if len(self.done) == at:
                    if how == "torn":
                        line = "\t".join(str(v) for v in values)
                        self._handle.write(line[: max(1, len(line) // 2)])
                        self._handle.flush()
                        os.fsync(self._handle.fileno())
                    elif how == "after":
                        real_write(self, values)
                    die()
                real_write(self, values)

            def child(out=out, dying_write=dying_write):
                TsvLog.write = dying_write
                cli_main(args(out) + (["--resume"] if out.exists() else []))

            totals["kills"] += run_killed(child)
        code, err = quiet_cli(args(out) + (["--resume"] if out.exists() else []))
        totals["drills"] += 1
        totals["resume_failures"] += code != 0
        got = table(out)
        totals["rows_expected"] += len(expected)
        got_idx = [r[0] for r in got]
        totals["rows_duplicated"] += len(got_idx) - len(set(got_idx))
        totals["rows_lost"] += len({r[0] for r in expected} - set(got_idx))
        by_idx = {r[0]: r for r in got}
        totals["rows_changed"] += sum(by_idx.get(r[0], r) != r for r in expected)
    return totals


# ------------------------------------------------------------------ training crash drills

TRAIN: dict[str, Any] = dict(dataset="synthetic", arch="toy_cnn", sigma=0.25, epochs=3, batch_size=64, lr=0.05,
                             lr_step=1, lr_gamma=0.5, seed=3, train_subset=256, eval_subset=32, progress=False)


def same_state(a: dict, b: dict) -> bool:
    if a["epoch"] != b["epoch"] or a["scheduler"] != b["scheduler"]:
        return False
    if any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]):
        return False
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        if not torch.equal(x["momentum_buffer"], y["momentum_buffer"]):
            return False
    return all(torch.equal(a["rng"][k], b["rng"][k]) for k in ("noise", "shuffle", "torch"))


def training_drills(work: Path, drills: int, rng: np.random.Generator) -> dict[str, int]:
    reference = read_checkpoint(fit(TrainSettings(out_dir=work / "train-ref", **TRAIN), GaussianAugmentation(0.25)))
    totals = {"drills": 0, "kills": 0, "identical": 0}
    for d in range(drills):
        out = work / f"train{d}"
        epoch = int(rng.integers(1, TRAIN["epochs"] + 1))
        where = str(rng.choice(["batch", "checkpoint"]))
        batch = int(rng.integers(0, 4))

        def child(out=out, epoch=epoch, where=where, batch=batch):
            if where == "batch":
                real = train_module.train_epoch
                calls = []

                def dying(model, objective, optimizer, labelled, *a, **k):
                    calls.append(1)

                    def gen():
                        for i, item in enumerate(labelled):
                            if len(calls) == epoch and i == batch:
                                die()
                            yield item
                    return real(model, objective, optimizer, gen(), *a, **k)
                train_module.train_epoch = dying
            else:
                real_replace = files_module.os.replace
                seen = []

                def dying_replace(src, dst, *a, **k):
                    if str(dst).endswith("checkpoint.pth.tar"):
                        seen.append(1)
                        if len(seen) == epoch:
                            with open(src, "r+b") as handle:
                                handle.truncate(os.path.getsize(src) // 2)
                            die()
                    return real_replace(src, dst, *a, **k)
                files_module.os.replace = dying_replace
            fit(TrainSettings(out_dir=out, **TRAIN), GaussianAugmentation(0.25))

        totals["kills"] += run_killed(child)
        final = fit(TrainSettings(out_dir=out, resume=True, **TRAIN), GaussianAugmentation(0.25))
        totals["drills"] += 1
        totals["identical"] += same_state(read_checkpoint(final), reference)
    return totals


# ------------------------------------------------------------------ fuzzing

NASTY = ["0", "-1", "1", "2", "3", "0.5", "1e-9", "nan", "inf", "-inf", "1e309", "abc", "", "0/0", "1/2", "3/2",
         "--", "x" * 300, "/nonexistent/dir/file", "\u00e9\u6f22", "1e5000", "0x10", " 1", "1_0", "cpu", "cuda",
         "bf16", "fp16", "center", "train", "toy_cnn", "fashion_cnn", "smoothadv", "gaussian"]
FLAGS = {
    "certify": ["--sigma", "--n", "--n0", "--alpha", "--batch", "--skip", "--max", "--split", "--normalization",
                "--shard", "--seed", "--device", "--precision", "--out"],
    "predict": ["--sigma", "--n", "--alpha", "--batch", "--skip", "--max", "--split", "--shard", "--seed", "--out"],
    "train": ["--sigma", "--epochs", "--batch", "--lr", "--lr-step", "--lr-gamma", "--momentum", "--weight-decay",
              "--normalization", "--workers", "--train-subset", "--eval-subset", "--pretrained", "--seed", "--device",
              "--objective", "--arch", "--unlabelled", "--unlabelled-weight", "--config", "--eps", "--steps", "--m"],
    "validity": ["--trials", "--alpha", "--n", "--n0", "--seed"],
}
SWITCHES = ["--resume", "--force", "--no-progress", "--help-me", "-x"]


def fuzz(work: Path, count: int, rng: np.random.Generator) -> dict[str, Any]:
    ckpt = work / "toy.pth.tar"
    bad: list[str] = []
    tried = 0

    def check(code: int, err: str, what: str) -> None:
        lines = [line for line in err.splitlines() if line.strip()]
        if code not in (0, 2) or "Traceback" in err or (code == 2 and len(lines) != 1):
            bad.append(f"{what}: exit {code}: {err[-300:]}")

    cwd = os.getcwd()
    os.chdir(work)  # fuzzed relative paths land in the scratch directory
    try:
        for i in range(count):
            command = str(rng.choice(["certify", "predict", "train", "validity", "report", "merge",
                                      "convert-checkpoint", "bogus"]))
            out = work / f"fuzz{i}"
            if command in ("certify", "predict"):
                argv = [command, str(ckpt), "--sigma", "0.25", "--out", f"{out}.tsv", "--n", "20", "--n0", "5",
                        "--max", "2", "--batch", "20", "--no-progress", "--device", "cpu"]
            elif command == "train":
                argv = ["train", "--dataset", "synthetic", "--out", str(out), "--epochs", "1", "--train-subset", "8",
                        "--eval-subset", "4", "--batch", "8", "--no-progress", "--device", "cpu", "--steps", "1",
                        "--m", "1"]
            elif command == "validity":
                argv = ["validity", "--quick", "--trials", "1", "--n", "3", "--n0", "1"]
            else:
                argv = [command]
            names = FLAGS.get(command, [])
            for _ in range(int(rng.integers(0, 5))):
                if not names or rng.integers(0, 6) == 0:
                    argv.append(str(rng.choice(SWITCHES + NASTY)))
                else:
                    argv += [str(rng.choice(names)), str(rng.choice(NASTY))]
            code, err = quiet_cli(argv)
            if command == "validity" and code == 2 and "validity checks failed" in err:
                code = 0  # one trial cannot catch the control: a clean, expected outcome
            try:
                check(code, err, " ".join(argv)[:200])
            except Exception as exc:  # noqa: BLE001
                bad.append(f"{argv}: {exc!r}")
            tried += 1
    finally:
        os.chdir(cwd)

    # the library API: random arguments and images
    model, x = Problem("lin", (1, 2, 2), 0.25, (0.0,), 0.2).tensors()
    numbers = [0, -1, 1, 2, 7, 50, 0.5, 2.5, float("nan"), float("inf"), -float("inf"), 1e-300, 1.0, 1e300, True]
    for _ in range(count):
        sigma, n0, n, alpha, batch = (numbers[int(rng.integers(len(numbers)))] for _ in range(5))
        image = x.clone()
        trick = int(rng.integers(0, 8))
        if trick == 1:
            image[0, 0, 0] = float(rng.choice([np.nan, np.inf, -np.inf, -0.5, 1.5]))
        elif trick == 2:
            dtypes = [torch.int64, torch.bool, torch.uint8, torch.float16, torch.float64, torch.complex64]
            image = image.to(dtypes[int(rng.integers(len(dtypes)))])
        elif trick == 3:
            image = image.reshape(-1) if rng.integers(2) else image[None]
        elif trick == 4:
            image = torch.full((int(rng.integers(0, 4)), 2, 2), 0.5)
        try:
            smooth = Smooth(model, 2, sigma)
            if n is True or (isinstance(n, (int, float)) and math.isfinite(n) and n > 50):
                n = 50
            smooth.certify(image, n0 if not (isinstance(n0, float) and n0 > 50) else 50, n,  # type: ignore[arg-type]
                           alpha, batch,  # type: ignore[arg-type]  # hostile types on purpose
                           generator=torch.Generator().manual_seed(0))
        except SmoothAdvError:
            pass
        except Exception as exc:  # noqa: BLE001
            bad.append(f"Smooth(sigma={sigma}).certify(n0={n0}, n={n}, alpha={alpha}, batch={batch}, "
                       f"trick {trick}): {exc!r}")
        tried += 1
    return {"inputs": tried, "unclean": len(bad), "examples": bad[:5]}


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller validity suite, fewer drills and inputs")
    parser.add_argument("--trials", type=int, default=None, help="validity trials per (input, mode)")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-json", default=None,
                        help="reuse the validity results written by benchmarks/validity.py instead of rerunning them")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trials = args.trials or (300 if args.quick else 1000)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    if args.from_json:
        results = [Result(**{"delta": 1e-3, **r}) for r in json.loads(Path(args.from_json).read_text())["results"]]
        trials = results[0].trials
        args.alpha = results[0].alpha
    else:
        print("validity suite ...", file=sys.stderr, flush=True)
        results = run_suite(trials=trials, alpha=args.alpha, n=100, n0=10, seed=args.seed, quick=args.quick)
    summary = summarize(results)
    with tempfile.TemporaryDirectory(prefix="smoothadv-reliability-") as tmp:
        work = Path(tmp)
        print("certify crash drills ...", file=sys.stderr, flush=True)
        certify = certify_drills(work, 5 if args.quick else 20, 24, rng)
        print("training crash drills ...", file=sys.stderr, flush=True)
        training = training_drills(work, 3 if args.quick else 10, rng)
        print("fuzzing ...", file=sys.stderr, flush=True)
        fuzzed = fuzz(work, 100 if args.quick else 400, rng)
    sound = [r for r in results if not r.control]
    invalid = sum(r.invalid for r in sound if r.kind == "certify")
    certify_trials = sum(r.trials for r in sound if r.kind == "certify")
    predict_wrong = sum(r.invalid for r in sound if r.kind == "predict")
    predict_trials = sum(r.trials for r in sound if r.kind == "predict")
    worst = max(r.checked / r.trials for r in sound)
    lines = [
        "| reliability figure | value |",
        "|---|---|",
        f"| certificates checked against the exact smoothed classifier | {certify_trials:,} "
        f"({len({r.mode for r in sound if r.kind == 'certify'})} modes, "
        f"{len({r.problem for r in sound if r.kind == 'certify'})} inputs) |",
        f"| invalid certificates (wrong class or radius > true radius) | {invalid:,} "
        f"(rate {invalid / certify_trials:.4f}; alpha = {args.alpha}) |",
        f"| worst single input, rate of radius > sigma Phi^-1(p_A) | {worst:.4f} (alpha = {args.alpha}) |",
        f"| PREDICT: wrong class returned | {predict_wrong} of {predict_trials:,} (rate "
        f"{predict_wrong / predict_trials:.4f}; alpha = {args.alpha}) |",
        f"| checks within alpha and consistent with the exact rate (binomial tests, Bonferroni over all checks) | "
        f"{summary['passed']}/{summary['checks']} |",
        f"| unsound control (point estimate) detected | {summary['controls_detected']}/{summary['controls']} |",
        f"| certify runs SIGKILLed and resumed | {certify['drills']} drills, {certify['kills']} kills |",
        f"| rows lost / duplicated / changed | {certify['rows_lost']} / {certify['rows_duplicated']} / "
        f"{certify['rows_changed']} (of {certify['rows_expected']}) |",
        f"| training runs SIGKILLed (mid-epoch or mid-checkpoint) and resumed | {training['drills']} drills, "
        f"{training['kills']} kills; bitwise-identical final state: {training['identical']}/{training['drills']} |",
        f"| hostile inputs tried (CLI command lines, API arguments, images) | {fuzzed['inputs']:,}; "
        f"tracebacks or unclear errors: {fuzzed['unclean']} |",
    ]
    print("\n".join(lines))
    print()
    print(format_summary(results))
    print(f"\n({time.time() - started:.0f} s; trials per input and mode: {trials}; seed {args.seed})")
    for example in fuzzed["examples"]:
        print("UNCLEAN:", example)
    ok = (summary["passed"] == summary["checks"] and certify["rows_lost"] == certify["rows_duplicated"]
          == certify["rows_changed"] == certify["resume_failures"] == 0 and training["identical"] == training["drills"]
          and fuzzed["unclean"] == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
