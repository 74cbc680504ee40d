"""Shared test helpers: linear base classifiers whose smoothed classifier is known in closed form, checkpoints
whose unpickling would run code (for the unsafe-loading tests of the library and of the command line), the
hand-made certify TSVs of the report tests, tiny diffusers models and the helpers of the diffusion tests, and a
certify-shard-merge run of the command line.

Test files import the constants and plain helpers (`from conftest import NAME`); pytest finds the fixtures."""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class LinearBinary(nn.Module):
    """f(x) = 1 if <w, x> + b > 0 else 0, with ||w||_2 = 1.

    Under x + N(0, sigma^2 I), P(f = 1) = Phi(margin / sigma) with margin = <w, x> + b, so the smoothed
    classifier predicts sign(margin) and its exact certified L2 radius is |margin| (distance to the hyperplane).
    """

    def __init__(self, w: Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w / w.norm(), requires_grad=False)
        self.b = b

    def margin(self, x: Tensor) -> Tensor:
        return (x.flatten(1) * self.w.flatten()).sum(1) + self.b

    def forward(self, x: Tensor) -> Tensor:
        m = self.margin(x)
        return torch.stack([torch.zeros_like(m), m], dim=1)


@pytest.fixture
def linear_model() -> LinearBinary:
    w = torch.zeros(1, 4, 4)
    w[0, 0, 0] = 1.0
    return LinearBinary(w, -0.5)  # margin = x[0,0,0] - 0.5


def image_with_margin(margin: float) -> Tensor:
    x = torch.full((1, 4, 4), 0.5)
    x[0, 0, 0] = 0.5 + margin
    return x


@pytest.fixture(scope="session")
def toy_checkpoint(tmp_path_factory) -> Path:
    """A toy_cnn checkpoint for the synthetic data with fixed random weights (seed 0); treat it as read-only."""
    from smoothadv.models import build_model, normalization_spec, save_checkpoint

    path = tmp_path_factory.mktemp("toy") / "toy.pth.tar"
    torch.manual_seed(0)
    save_checkpoint(path, build_model("toy_cnn", "synthetic"), arch="toy_cnn", dataset="synthetic",
                    normalization=normalization_spec("synthetic"), sigma=0.25)
    return path


def run_command(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of one in-process `smoothadv` command (arguments as str); a failure must be one clean
    `smoothadv: error:` line and never a traceback."""
    from smoothadv.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("smoothadv: error: "), err
    return code, err


# ------------------------------------------------------------------ checkpoints that run code when unpickled


class Payload:
    """Unpickling this object calls open(marker, "w"), i.e. creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _toy_state() -> dict:
    from smoothadv.models import build_model

    return {k: v.clone() for k, v in build_model("toy_cnn", "synthetic").state_dict().items()}


def craft(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-{kind}"
    path = tmp_path / f"evil-{kind}.pth.tar"
    evil = Payload(marker)
    if kind == "zip":
        torch.save({"arch": "toy_cnn", "state_dict": _toy_state(), "extra": evil}, path)
    elif kind == "legacy":
        torch.save({"arch": "toy_cnn", "state_dict": _toy_state(), "extra": evil}, path,
                   _use_new_zipfile_serialization=False)
    elif kind == "in_state_dict":
        state = _toy_state()
        state["1.fc.weight"] = evil  # type: ignore[assignment]
        torch.save({"arch": "toy_cnn", "state_dict": state}, path)
    elif kind == "raw_pickle":
        with open(path, "wb") as handle:
            pickle.dump({"arch": "toy_cnn", "state_dict": {}, "extra": evil}, handle)
    else:
        raise ValueError(kind)
    assert not marker.exists()
    return path, marker


# ------------------------------------------------------------------ one-line errors of the library


def one_line_error(call, *match: str) -> str:
    """The message of the SmoothAdvError that `call()` raises: one line, holding each of `match`."""
    from smoothadv.errors import SmoothAdvError

    with pytest.raises(SmoothAdvError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    for part in match:
        assert part in text, text
    return text


# ------------------------------------------------------------------ hand-made certify TSVs of the report tests
# (tests/unit/test_report*.py test the library calls behind `smoothadv report`, tests/e2e/test_cli_report*.py the
# command: both read these files, whose numbers are known)

CERTIFY_HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
# Ours / Cohen's scripts: timedelta times. Rows: correct r=0.5, correct r=0.1, abstain, wrong r=0.8, correct r=0.3.
A_ROWS = ["0\t1\t1\t0.5\t1\t0:00:14.172309", "1\t2\t2\t0.1\t1\t0:00:01", "2\t3\t-1\t0.0\t0\t0:00:01",
          "3\t4\t5\t0.8\t0\t1 day, 0:00:01", "4\t0\t0\t0.3\t1\t0:00:01.5"]
# Cohen's released data files: float seconds.
B_ROWS = ["0\t1\t1\t1.2\t1\t15.4", "1\t2\t2\t0.05\t1\t15.4", "2\t3\t-1\t0.0\t0\t15.4", "3\t4\t4\t0.6\t1\t15.4"]
# Salman's logs: 4-decimal radii; one correct row with a large radius, three abstentions.
C_ROWS = ["0\t1\t1\t2.0000\t1\t0:00:25.1", "1\t2\t-1\t0.0000\t0\t0:00:25.1", "2\t3\t-1\t0.0000\t0\t0:00:25.1",
          "3\t4\t-1\t0.0000\t0\t0:00:25.1"]


def write_rows(path: Path, header: str, rows: list[str]) -> Path:
    """Write `header` (one line, with its newline) and then each of `rows` as a line to `path`; return `path`."""
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


@pytest.fixture
def report_files(tmp_path: Path) -> dict[str, Path]:
    """Three certify TSVs in tmp_path, "A" (A_ROWS), "B" (B_ROWS) and "C" (C_ROWS): the three time formats."""
    return {"A": write_rows(tmp_path / "a.tsv", CERTIFY_HEADER, A_ROWS),
            "B": write_rows(tmp_path / "b.tsv", CERTIFY_HEADER, B_ROWS),
            "C": write_rows(tmp_path / "c.tsv", CERTIFY_HEADER, C_ROWS)}


# Certify rows of the radius-distribution figure (`report.plot_radius_cdf`, `report --radius-cdf`), as tuples
# (idx, label, predict, radius, correct): a correct, a wrong, an abstained, two correct at larger radii
CDF_ROWS = [(0, 3, 3, 0.10, 1), (1, 2, 5, 0.40, 0), (2, 1, -1, 0.0, 0), (3, 0, 0, 0.55, 1), (4, 7, 7, 0.30, 1)]


def write_cdf_tsv(path: Path, rows: list[tuple[int, int, int, float, int]] = CDF_ROWS) -> Path:
    """A certify TSV at `path` with `rows` (tuples as CDF_ROWS), each timed 0:00:01; return `path`."""
    return write_rows(path, CERTIFY_HEADER, [f"{i}\t{y}\t{p}\t{r}\t{c}\t0:00:01.000000" for i, y, p, r, c in rows])


# A/B pair of `report --paired` (report.compare) on the same 5 images, where counts, p-values and intervals are known.
# A: correct at radius 0.5, 0.1, 0.3 (idx 0, 1, 4), abstains on 2, wrong on 3 -> 3 of 5 at r = 0, 1 of 5 at 0.5
PAIRED_A = ["0\t1\t1\t0.5\t1\t0:00:01", "1\t2\t2\t0.1\t1\t0:00:01", "2\t3\t-1\t0.0\t0\t0:00:01",
            "3\t4\t5\t0.8\t0\t0:00:01", "4\t0\t0\t0.3\t1\t0:00:01"]
# B: correct at radius 0.6 on idx 0-3, wrong on 4 -> 4 of 5 at r = 0 and at 0.5 (rows in another order)
PAIRED_B = ["3\t4\t4\t0.6\t1\t0:00:01", "0\t1\t1\t0.6\t1\t0:00:01", "1\t2\t2\t0.6\t1\t0:00:01",
            "2\t3\t3\t0.6\t1\t0:00:01", "4\t0\t7\t0.6\t0\t0:00:01"]


@pytest.fixture
def paired_files(tmp_path: Path) -> tuple[Path, Path]:
    """The paired certify TSVs (PAIRED_A, PAIRED_B) written to tmp_path as a.tsv and b.tsv."""
    return (write_rows(tmp_path / "a.tsv", CERTIFY_HEADER, PAIRED_A),
            write_rows(tmp_path / "b.tsv", CERTIFY_HEADER, PAIRED_B))


# Training costs of `report --cost`: gaussian is the baseline (30 s); macer 600 s = 20 x, against its model m = 16:
# 1.25; stability has no model; smoothmix has a cost but no certify file
COST_ROWS = "0\t1\t1\t0.5\t1\t0:00:01\n1\t2\t2\t0.1\t1\t0:00:01\n"
COSTS = ("# measured with benchmarks/method_cost.py\n"
         "name\trecipe\tcpu_s_per_epoch\tmodel\tformula\n"
         "gaussian\tg.toml\t30\t1\t1\n"
         "macer\tm.toml\t600\t16\tm\n"
         "stability\ts.toml\t66\t\t\n"
         "smoothmix\tx.toml\t700\t20\tm (T + 2)\n")


def cost_inputs(tmp_path: Path) -> tuple[dict, Path]:
    """Certify TSVs (COST_ROWS) for gaussian, macer, stability and other (which has no cost), and the cost file
    (COSTS), in tmp_path: ({name: path}, cost file)."""
    paths = {}
    for name in ("gaussian", "macer", "stability", "other"):
        paths[name] = tmp_path / f"{name}.tsv"
        paths[name].write_text(CERTIFY_HEADER + COST_ROWS)
    cost = tmp_path / "cost.tsv"
    cost.write_text(COSTS)
    return paths, cost


# ------------------------------------------------------------------ tiny diffusers models and diffusion training
# (the optional dependency diffusers is imported inside the helpers; their test files skip without it)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread costs the least CPU time (restored for the rest of the suite). A test module uses it
    for all its tests with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0, channels: int = 1) -> nn.Module:
    """A randomly initialised diffusers UNet2DModel for `channels`x8x8 images (seeded by `seed`), in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    with torch.no_grad():  # larger random weights than the initialization, so that the predicted noise is not ~0
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


def ddpm_scheduler(beta_end: float = 0.02, **extra) -> object:
    """diffusers' DDPMScheduler with DDPM's linear schedule of 1000 steps (beta from 1e-4 to `beta_end`)."""
    import diffusers

    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=beta_end,
                                   beta_schedule="linear", **extra)


def save_tiny_ddpm(path: Path, seed: int = 0, channels: int = 3, beta_end: float = 0.02) -> Path:
    """A DDPMPipeline directory (unet/, scheduler/, model_index.json) at `path` holding tiny_unet(seed, channels) and
    ddpm_scheduler(beta_end); returns `path`."""
    import diffusers

    diffusers.DDPMPipeline(unet=tiny_unet(seed, channels), scheduler=ddpm_scheduler(beta_end)).save_pretrained(path)
    return path


def ddpm_train_settings(out: Path, **extra):
    """DiffusionTrainSettings of a tiny DDPM training run on the synthetic data into `out` (2 epochs of 3 steps),
    with `extra` fields replaced."""
    from smoothadv.diffusion import DiffusionTrainSettings

    values = dict(dataset="synthetic", channels=(8, 16), attention_levels=(1,), norm_groups=8, epochs=2,
                  batch_size=8, train_subset=24, warmup_steps=2, log_every=2, save_every=2, seed=3)
    return DiffusionTrainSettings(out_dir=out, **{**values, **extra})


def ddpm_checkpoint(path: Path) -> dict:
    """The training checkpoint (checkpoint.pt) of the DDPM training run in directory `path`."""
    return torch.load(path / "checkpoint.pt", weights_only=True)


# ------------------------------------------------------------------ result TSVs of the command line (tests/e2e only)


def result_rows(path: Path) -> list[list[str]]:
    """Every line of a result TSV without its time column."""
    lines = path.read_text().splitlines()
    header = lines[0].split("\t")
    return [[f for name, f in zip(header, line.split("\t")) if name != "time"] for line in lines]


def certify_single_and_sharded(flags: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """Run `smoothadv certify *flags` once into tmp_path/one.tsv and as shards 1/2 then 0/2 into
    tmp_path/sharded.tsv, merge the shards, and check that every command succeeds and that the merged rows equal the
    single run's; returns (one.tsv, sharded.tsv). Drives the command line: for tests/e2e only."""
    from smoothadv.cli import main

    single, sharded = tmp_path / "one.tsv", tmp_path / "sharded.tsv"
    assert main(["certify", *flags, "--out", str(single)]) == 0
    for i in (1, 0):
        assert main(["certify", *flags, "--out", str(sharded), "--shard", f"{i}/2"]) == 0
    assert main(["merge", str(sharded)]) == 0
    assert result_rows(sharded) == result_rows(single)
    return single, sharded


def toy_train_settings(**changes: object):
    """TrainSettings of a toy_cnn on the synthetic data into `run` (never written), with `changes`: what the run
    directory's resume rule is checked against."""
    from smoothadv.settings import TrainSettings

    return TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=Path("run"), **changes)  # type: ignore[arg-type]


def load_script(path: Path) -> ModuleType:
    """A script of benchmarks/ or experiments/ imported as a module named after its file (registered in
    sys.modules, so its dataclasses and pickles resolve), as `python path` would run it minus `__main__`."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
