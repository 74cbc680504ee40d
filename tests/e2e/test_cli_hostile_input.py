"""Hostile and bad input: property-based tests over the statistics, Smooth's arguments and the CLI argument space,
bad images and labels, empty data, and memory bounded by the batch size (measured) for huge n.

Every bad input must end in a SmoothAdvError (CLI: exit status 2 and one `smoothadv: error:` line, or argparse's
one-line usage error), never another exception or a traceback, and never lose a file already written.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from smoothadv import Smooth, SmoothAdvError
from smoothadv.cli import main
from smoothadv.data import NpzDataset
from smoothadv.run import select_indices
from smoothadv.stats import (
    binom_pvalue,
    certified_radius,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_certifiable_radius,
)
from smoothadv.validity import Problem

FAST = settings(max_examples=60, deadline=None, derandomize=True,  # reproducible: same examples every run
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------ statistics


@st.composite
def counts(draw):
    n = draw(st.integers(1, 10_000))
    return draw(st.integers(0, n)), n


alphas = st.floats(1e-12, 0.5, allow_nan=False)  # above 1/2 a "lower" bound may exceed k/n


@FAST
@given(counts(), alphas)
def test_clopper_pearson_bounds_are_ordered_and_symmetric(kn, alpha) -> None:
    k, n = kn
    lo, hi = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    if k < n:
        assert clopper_pearson_lower(k + 1, n, alpha) >= lo  # monotone in k
        assert hi == pytest.approx(1 - clopper_pearson_lower(n - k, n, alpha), abs=1e-12)
    if alpha < 0.5:
        assert clopper_pearson_lower(k, n, alpha / 2) <= lo + 1e-15  # smaller alpha: wider bound


@FAST
@given(counts(), st.one_of(st.floats(1e-300, 0.5), st.sampled_from([5e-324, 1e-300, 1e-100, 1e-41, 1e-39])))
def test_clopper_pearson_lower_bound_is_valid_even_at_extreme_alpha(kn, alpha) -> None:
    # validity: P(Bin(n, lower) >= k) <= alpha, i.e. the bound never exceeds the exact CP bound (it was NaN or
    # too large from scipy's beta quantile below alpha ~ 1e-50)
    from scipy.stats import binom

    k, n = kn
    lower = clopper_pearson_lower(k, n, alpha)
    assert 0.0 <= lower <= k / n and math.isfinite(lower)
    if 0 < k and lower > 0:
        # (scipy's own logsf is only accurate to ~1e-5 relative near 1e-300; the old failure was off by factors 1e190)
        assert binom.logsf(k - 1, n, lower) <= math.log(alpha) + 1e-4 * abs(math.log(alpha)) + 1e-9


@FAST
@given(counts(), st.floats(0.01, 10, allow_nan=False), alphas)
def test_radius_is_monotone_and_capped(kn, sigma, alpha) -> None:
    k, n = kn
    lo = clopper_pearson_lower(k, n, alpha)
    radius = certified_radius(lo, sigma)
    assert radius >= 0 and (radius == 0) == (lo <= 0.5)
    assert radius <= max_certifiable_radius(n, alpha, sigma) + 1e-12
    if k < n:
        assert certified_radius(clopper_pearson_lower(k + 1, n, alpha), sigma) >= radius


@FAST
@given(counts())
def test_binomial_pvalue_is_a_symmetric_probability(kn) -> None:
    k, n = kn
    p = binom_pvalue(k, n)
    assert 0.0 <= p <= 1.0 + 1e-12
    assert p == pytest.approx(binom_pvalue(n - k, n), rel=1e-9, abs=1e-300)


anything = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.just(10**30))


@FAST
@given(anything, anything, anything)
def test_statistics_reject_bad_numbers_with_value_error(k, n, alpha) -> None:
    for call in (lambda: clopper_pearson_lower(k, n, alpha), lambda: certified_radius(alpha, n)):
        try:
            out = call()
        except (ValueError, TypeError):  # SmoothAdvError is a ValueError
            continue
        assert isinstance(out, float) and out >= 0
        assert math.isfinite(out) or alpha == 1  # radius(p_lower = 1) = inf: certified everywhere


# ------------------------------------------------------------------ Smooth's arguments and images


@pytest.fixture(scope="module")
def linear() -> tuple[nn.Module, torch.Tensor]:
    return Problem("lin", (1, 2, 2), 0.25, (0.0,), 0.2).tensors()


bad_or_small_int = st.one_of(st.integers(-3, 60), st.sampled_from([0.5, 2.0, float("nan"), float("inf"), -1e9]))
bad_or_ok_float = st.one_of(st.floats(-1, 2), st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e-300]))


@FAST
@given(sigma=bad_or_ok_float, n0=bad_or_small_int, n=bad_or_small_int, alpha=bad_or_ok_float,
       batch=bad_or_small_int)
def test_smooth_arguments_at_and_past_their_bounds(linear, sigma, n0, n, alpha, batch) -> None:
    model, x = linear
    try:
        smooth = Smooth(model, 2, sigma)
        cert = smooth.certify(x, n0, n, alpha, batch, generator=torch.Generator().manual_seed(0))
        pred = smooth.predict(x, n, alpha, batch, generator=torch.Generator().manual_seed(0))
    except SmoothAdvError:
        return
    assert cert.prediction in (-1, 0, 1) and cert.radius >= 0 and math.isfinite(cert.radius)
    assert pred in (-1, 0, 1)


def bad_images() -> dict[str, object]:
    ok = torch.full((1, 2, 2), 0.5)
    nan, inf = ok.clone(), ok.clone()
    nan[0, 0, 0] = float("nan")
    inf[0, 1, 1] = float("inf")
    return {
        "nan": nan, "inf": inf, "negative": ok - 1, "above one": ok + 1, "uint8": (ok * 255).to(torch.uint8),
        "bool": ok > 0, "int64": ok.long(), "complex": ok.to(torch.complex64), "batch of one": ok[None],
        "flat": ok.flatten(), "wrong channels": torch.full((3, 2, 2), 0.5), "wrong size": torch.full((1, 3, 3), 0.5),
        "numpy": ok.numpy(), "list": [[[0.5]]], "empty": torch.zeros(1, 0, 2),
    }


@pytest.mark.parametrize("name", list(bad_images()))
def test_bad_images_are_refused_by_every_entry_point(linear, name) -> None:
    from smoothadv.sequential import SequentialConfig, certify_sequential

    model, _ = linear
    image = bad_images()[name]
    smooth = Smooth(model, 2, 0.25)
    calls = {
        "certify": lambda: smooth.certify(image, 10, 50, 0.01, 50),
        "predict": lambda: smooth.predict(image, 50, 0.01, 50),
        "certify_many": lambda: smooth.certify_many([image], 10, 50, 0.01, 50),
        "sample_counts": lambda: smooth.sample_counts(image, 50, 50),
        "sequential": lambda: certify_sequential(smooth, image, SequentialConfig(0.25, 0.01, looks=(20, 40)),
                                                 batch_size=50, n0=10),
    }
    for entry, call in calls.items():
        with pytest.raises(SmoothAdvError) as info:
            call()
        assert "\n" not in str(info.value), entry


def test_bad_model_outputs_are_refused(linear) -> None:
    _, x = linear

    class Wrong(nn.Module):
        def __init__(self, out) -> None:
            super().__init__()
            self.out = out

        def forward(self, batch):
            return self.out(batch)

    for out in (lambda b: torch.zeros(len(b), 3), lambda b: torch.zeros(len(b)), lambda b: torch.zeros(len(b), 2, 2)):
        with pytest.raises(SmoothAdvError, match="returned shape"):
            Smooth(Wrong(out), 2, 0.25).certify(x, 10, 50, 0.01, 50)
    for bad_classes in (1, 0, 2.5, -3):
        with pytest.raises(SmoothAdvError):
            Smooth(Wrong(lambda b: b), bad_classes, 0.25)


def test_labels_images_and_empty_data_files_are_refused(tmp_path) -> None:
    img = np.random.default_rng(0).random((8, 3, 8, 8)).astype(np.float32)
    cases = {
        "label too large": dict(images=img, labels=np.array([0, 1, 2, 9, 0, 1, 2, 3])),
        "negative label": dict(images=img, labels=-np.ones(8, int)),
        "float labels": dict(images=img, labels=np.full(8, 0.5)),
        "2-D labels": dict(images=img, labels=np.zeros((8, 2), int)),
        "string labels": dict(images=img, labels=np.array(["a"] * 8)),
        "length mismatch": dict(images=img, labels=np.zeros(5, int)),
        "nan pixels": dict(images=np.full_like(img, np.nan), labels=np.zeros(8, int)),
        "out of range": dict(images=img * 3, labels=np.zeros(8, int)),
        "empty": dict(images=img[:0], labels=np.zeros(0, int)),
        "wrong shape": dict(images=img[:, :, :4], labels=np.zeros(8, int)),
        "no labels": dict(images=img),
    }
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(SmoothAdvError) as info:
            NpzDataset(path, (3, 8, 8), classes=4)
        assert "\n" not in str(info.value), name
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(SmoothAdvError):
        NpzDataset(tmp_path / "garbage.npz")
    with pytest.raises(SmoothAdvError, match="empty"):
        select_indices(0)


def test_bad_labels_in_training_data_give_one_line_error(tmp_path, capsys) -> None:
    path = tmp_path / "extra.npz"
    np.savez(path, images=np.random.default_rng(0).random((8, 3, 8, 8)).astype(np.float32),
             labels=np.array([0, 1, 2, 9, 0, 1, 2, 3]))
    code = main(["train", "--dataset", "synthetic", "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--train-subset", "16", "--eval-subset", "8", "--unlabelled", str(path), "--no-progress",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "labels must be in [0, 4)" in err


# ------------------------------------------------------------------ memory bounded by the batch size


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_huge_n_with_small_batch_uses_batch_sized_memory() -> None:
    """n = 10^6 noisy 3x8x8 images with batch 100: an n-sized noise tensor would be 768 MB (float32); the measured
    peak resident memory grows by far less, and the model never sees more than `batch` samples at once."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    problem = Problem("lin", (3, 8, 8), 0.25, (0.0,), 0.3)
    model, x = problem.tensors()
    largest = []
    model.register_forward_hook(lambda module, inputs, output: largest.append(len(inputs[0])))
    smooth = Smooth(model, 2, 0.25)
    smooth.sample_counts(x, 1000, 100, generator=torch.Generator().manual_seed(0))  # warm up buffers
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak RSS counter")
    before = _vm_kib("VmHWM")
    counts = smooth.sample_counts(x, 1_000_000, 100, generator=torch.Generator().manual_seed(1))
    growth_mib = (_vm_kib("VmHWM") - before) / 1024
    assert int(counts.sum()) == 1_000_000
    assert max(largest) == 100
    assert growth_mib < 32, f"peak RSS grew by {growth_mib:.1f} MiB for n = 1e6"  # n-sized noise: 768 MiB
    p = problem.p_a  # and the counts are right: Binomial(1e6, p_A) within 5 sd
    assert abs(int(counts[problem.g]) - 1e6 * p) < 5 * math.sqrt(1e6 * p * (1 - p))


# ------------------------------------------------------------------ the CLI argument space

NASTY = ["0", "-1", "1", "2", "3", "0.5", "1e-9", "nan", "inf", "-inf", "1e309", "abc", "", "0/0", "1/2", "3/2",
         "--", "x" * 300, "/nonexistent/dir/file", "\u00e9\u6f22", "1e5000", "0x10", " 1", "1_0"]

CERTIFY_FLAGS = ["--sigma", "--n", "--n0", "--alpha", "--batch", "--skip", "--max", "--split", "--normalization",
                 "--shard", "--seed", "--device", "--precision", "--out"]
TRAIN_FLAGS = ["--sigma", "--epochs", "--batch", "--lr", "--lr-step", "--lr-gamma", "--momentum", "--weight-decay",
               "--normalization", "--workers", "--train-subset", "--eval-subset", "--pretrained", "--seed",
               "--device", "--objective", "--arch", "--unlabelled", "--unlabelled-weight", "--config", "--eps",
               "--attack", "--warmup", "--m", "--steps"]
VALIDITY_FLAGS = ["--trials", "--alpha", "--n", "--n0", "--seed"]
SWITCHES = ["--resume", "--force", "--progress", "--no-progress", "--help-me", "-x"]


@st.composite
def flags(draw, names: list[str], extra_values: list[str]) -> list[str]:
    argv: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 5)) == 0:
            argv.append(draw(st.sampled_from(SWITCHES)))
        else:
            argv += [draw(st.sampled_from(names)), draw(st.sampled_from(NASTY + extra_values))]
    return argv


@contextlib.contextmanager
def working_directory(path: Path | None):
    before = os.getcwd()
    if path is not None:
        os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """Run the CLI in-process (in `cwd`, so relative fuzzed paths land there); return (exit status, stderr).
    Any exception other than SystemExit fails the test."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), \
            working_directory(cwd):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
            code = exc.code if isinstance(exc.code, int) else 2
    return code, err.getvalue()


def assert_clean(code: int, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "error" in lines[0], err  # progress bars are off in these runs


@pytest.fixture(scope="module")
def tiny_checkpoint(toy_checkpoint: Path) -> Path:
    return toy_checkpoint


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["certify", "predict"]), data=st.data())
def test_cli_certify_predict_flags_never_traceback(tiny_checkpoint, tmp_path_factory, command, data) -> None:
    out = tmp_path_factory.mktemp("cli") / "out.tsv"
    argv = [command, str(tiny_checkpoint), "--sigma", "0.25", "--out", str(out), "--n", "20", "--n0", "5",
            "--max", "2", "--batch", "20", "--no-progress", "--device", "cpu"]
    argv += data.draw(flags(CERTIFY_FLAGS, ["cpu", "cuda", "tpu", "bf16", "fp16", "train", "center", str(out)]))
    code, err = run_cli(argv, out.parent)
    assert_clean(code, err)
    if code == 0 and out.exists():  # (a fuzzed --out or --shard may have redirected the rows)
        rows = out.read_text().splitlines()
        assert 1 <= len(rows) - 1 <= 3 and len(set(rows[1:])) == len(rows) - 1


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_cli_train_flags_never_traceback(tmp_path_factory, data) -> None:
    out = tmp_path_factory.mktemp("train")
    argv = ["train", "--dataset", "synthetic", "--out", str(out / "run"), "--epochs", "1", "--train-subset", "8",
            "--eval-subset", "4", "--batch", "8", "--no-progress", "--device", "cpu", "--steps", "1", "--m", "1"]
    argv += data.draw(flags(TRAIN_FLAGS, ["toy_cnn", "fashion_cnn", "cifar_resnet20", "gaussian", "smoothadv",
                                          "pgd", "cpu", "center", str(out / "missing.npz")]))
    code, err = run_cli(argv, out)
    assert_clean(code, err)


@settings(max_examples=20, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(command=st.sampled_from(["validity", "report", "merge", "convert-checkpoint", "bogus", ""]), data=st.data())
def test_cli_other_commands_never_traceback(tmp_path_factory, command, data) -> None:
    where = tmp_path_factory.mktemp("other")
    garbage = where / "garbage.tsv"
    garbage.write_text("idx\tlabel\nnot\ta\trow\n")
    if command == "validity":
        argv = ["validity", "--quick", "--trials", "1", "--n", "3", "--n0", "1"] + data.draw(
            flags(VALIDITY_FLAGS, ["1", "2", "0.9"]))
    else:
        argv = [command, *data.draw(st.lists(st.sampled_from(NASTY + [str(garbage), f"a={garbage}", "--force",
                                                                        str(where / "o.tsv")]), max_size=4))]
    code, err = run_cli(argv, where)
    if command == "validity" and code == 2 and "some validity checks failed" in err:
        code = 0  # 1 trial: the control cannot be "detected"; still a clean one-line outcome
    assert_clean(code, err)
    assert garbage.read_text() == "idx\tlabel\nnot\ta\trow\n"  # nothing already written is touched


def test_cli_bounds_of_sigma_n_alpha(tiny_checkpoint, tmp_path) -> None:
    base = ["certify", str(tiny_checkpoint), "--max", "1", "--batch", "50", "--n0", "5", "--no-progress",
            "--device", "cpu"]
    cases = [  # (flags, expected exit status)
        (["--sigma", "0", "--n", "20"], 2), (["--sigma", "-0.1", "--n", "20"], 2), (["--sigma", "nan"], 2),
        (["--sigma", "1e300", "--n", "20"], 2),  # noise overflows float32: NaN logits, refused
        (["--sigma", "0.25", "--n", "0"], 2), (["--sigma", "0.25", "--n", "1"], 0),
        (["--sigma", "0.25", "--n", "20", "--alpha", "0"], 2), (["--sigma", "0.25", "--n", "20", "--alpha", "1"], 2),
        (["--sigma", "0.25", "--n", "20", "--alpha", "1e-300"], 0),
        (["--sigma", "0.25", "--n", "20", "--alpha", "0.999999"], 0), (["--sigma", "1e-30", "--n", "20"], 0),
    ]
    for i, (extra, expected) in enumerate(cases):
        out = tmp_path / f"{i}.tsv"
        code, err = run_cli([*base, "--out", str(out), *extra], tmp_path)
        assert code == expected, (extra, err)
        assert_clean(code, err)
        if code == 0:
            row = out.read_text().splitlines()[1].split("\t")
            assert float(row[3]) >= 0 and math.isfinite(float(row[3]))

