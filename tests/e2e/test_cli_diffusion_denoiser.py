"""Diffusion denoised smoothing (Carlini et al., ICLR 2023) through the command line: `--denoiser DIR` with a
diffusers directory, on every evaluation path (fixed, sequential and betting certify, predict, attack, shards and
merge, resume, report), the model's digests in the run's provenance, and one-line refusals.

A tiny random UNet for the synthetic dataset's 3x8x8 images is saved with diffusers' save_pretrained into a tmp
directory; the classifier is the suite's toy checkpoint. Skipped without the optional dependency diffusers.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import certify_single_and_sharded, result_rows, save_tiny_ddpm

pytest.importorskip("diffusers")

from smoothadv.cli import main  # noqa: E402
from smoothadv.diffusion import load_diffusion, model_digest  # noqa: E402
from smoothadv.errors import SmoothAdvError  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EVAL = ["--sigma", "0.25", "--batch", "100", "--device", "cpu", "--no-progress", "--seed", "4"]


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
    """One thread for these tiny tensors; provenance's git calls are slow and tested elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr("smoothadv.files.git_revision", lambda: None)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory) -> Path:
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "model", seed=0)


@pytest.fixture(scope="module")
def other_ddpm(tmp_path_factory) -> Path:
    return save_tiny_ddpm(tmp_path_factory.mktemp("ddpm") / "other", seed=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(capsys, argv: list[str], *match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("smoothadv: error: "), err
    for part in match:
        assert part in err, err


EVALUATIONS = {
    "fixed": ["certify", "--n0", "20", "--n", "200", "--max", "3"],
    "sequential": ["certify", "--mode", "sequential", "--looks", "64:512", "--max", "2"],
    "betting": ["certify", "--mode", "sequential", "--test", "betting", "--looks", "64:512", "--max", "2"],
    "predict": ["predict", "--n", "200", "--max", "3"],
    "attack": ["attack", "--eps", "0.25", "--steps", "2", "--m", "2", "--n", "100", "--max", "2"],
}


@pytest.mark.parametrize("command", list(EVALUATIONS))
def test_every_evaluation_runs_through_a_diffusion_model(command, toy_checkpoint, ddpm, tmp_path) -> None:
    argv = [EVALUATIONS[command][0], str(toy_checkpoint), *EVALUATIONS[command][1:], *EVAL, "--denoiser", str(ddpm)]
    assert main([*argv, "--out", str(tmp_path / "out.tsv")]) == 0
    rows = result_rows(tmp_path / "out.tsv")
    assert len(rows) == 1 + int(EVALUATIONS[command][-1])
    recorded = json.loads((tmp_path / "out.tsv.args.json").read_text())
    provenance = load_diffusion(ddpm).provenance()
    weights = ddpm / "unet" / "diffusion_pytorch_model.safetensors"
    assert recorded["denoiser_weights_sha256"] == {"unet/diffusion_pytorch_model.safetensors": _sha(weights)}
    assert recorded["denoiser_schedule_sha256"] == _sha(ddpm / "scheduler" / "scheduler_config.json")
    assert recorded["denoiser_sha256"] == model_digest(provenance)
    assert (recorded["denoiser_sigma"], recorded["denoiser_t_star"], recorded["denoiser_unet_steps"]) == (0.25, 145, 1)
    assert recorded["denoiser_arch"].startswith("diffusion UNet2DModel (")
    assert recorded["checkpoint_sha256"] == _sha(toy_checkpoint)
    # the same run again gives the same rows (the noise is seeded per example; the denoiser is deterministic)
    assert main([*argv, "--out", str(tmp_path / "again.tsv")]) == 0
    assert result_rows(tmp_path / "again.tsv") == rows


def test_the_diffusion_model_changes_the_rows(toy_checkpoint, ddpm, tmp_path) -> None:
    """f o D is not f: without the denoiser the same votes come out differently (so the model is really used)."""
    argv = ["predict", str(toy_checkpoint), "--n", "200", "--max", "3", *EVAL]
    assert main([*argv, "--out", str(tmp_path / "f.tsv")]) == 0
    assert main([*argv, "--out", str(tmp_path / "fd.tsv"), "--denoiser", str(ddpm)]) == 0
    assert result_rows(tmp_path / "f.tsv") != result_rows(tmp_path / "fd.tsv")


def test_shards_merge_resume_and_report(toy_checkpoint, ddpm, other_ddpm, tmp_path, capsys) -> None:
    flags = [str(toy_checkpoint), "--denoiser", str(ddpm), "--n0", "20", "--n", "200", "--max", "4", *EVAL]
    single, sharded = certify_single_and_sharded(flags, tmp_path)
    merged = json.loads((tmp_path / "sharded.tsv.args.json").read_text())
    assert merged["denoiser_sha256"] == json.loads((tmp_path / "one.tsv.args.json").read_text())["denoiser_sha256"]
    # a copy of the same model in another directory is the same model: its digests agree, so it resumes
    copy = tmp_path / "copy"
    copy.mkdir()
    for part in ("unet", "scheduler"):
        (copy / part).mkdir()
        for file in (ddpm / part).iterdir():
            (copy / part / file.name).write_bytes(file.read_bytes())
    lines = single.read_text().splitlines()
    single.write_text("\n".join(lines[:3]) + "\n")  # killed after two rows
    moved = [str(copy) if f == str(ddpm) else f for f in flags]
    # another diffusion model changes every row: resuming with it is refused, the file untouched
    others = [str(other_ddpm) if f == str(ddpm) else f for f in flags]
    _one_line_error(capsys, ["certify", *others, "--out", str(single), "--resume"], "cannot resume",
                    "denoiser_sha256", "denoiser_weights_sha256")
    assert single.read_text().splitlines() == lines[:3]
    # and so is a shard of another model at merge
    assert main(["certify", *others, "--out", str(tmp_path / "mixed.tsv"), "--shard", "0/2"]) == 0
    assert main(["certify", *flags, "--out", str(tmp_path / "mixed.tsv"), "--shard", "1/2"]) == 0
    _one_line_error(capsys, ["merge", str(tmp_path / "mixed.tsv")], "different settings", "denoiser_sha256")
    assert main(["certify", *moved, "--out", str(single), "--resume"]) == 0
    assert result_rows(single) == result_rows(sharded)
    capsys.readouterr()
    assert main(["report", f"DDS={single}", "--radii", "0", "0.25"]) == 0
    assert "DDS" in capsys.readouterr().out


def test_bad_directories_and_sigmas_are_one_line_errors(toy_checkpoint, ddpm, tmp_path, capsys, monkeypatch) -> None:
    base = ["certify", str(toy_checkpoint), "--n", "100", "--max", "2", *EVAL]
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "a.tsv"), "--denoiser", str(empty)],
                    f"diffusion model {empty}: no UNet config")
    (empty / "denoiser.pth.tar").write_bytes(b"")  # a train-denoiser run directory given instead of its checkpoint
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "a.tsv"), "--denoiser", str(empty)],
                    "no UNet config", f"a denoiser checkpoint is a file: --denoiser {empty / 'denoiser.pth.tar'}")
    gray = save_tiny_ddpm(tmp_path / "gray", seed=2, channels=1)
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "b.tsv"), "--denoiser", str(gray)],
                    "denoises 1x8x8 images, but the classifier's are 3x8x8")
    _one_line_error(capsys, [*base[:-len(EVAL)], *EVAL[2:], "--sigma", "100", "--out", str(tmp_path / "c.tsv"),
                             "--denoiser", str(ddpm)], "sigma 100 is beyond the noise schedule")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "d.tsv"), "--denoiser", str(broken)], "not a JSON file")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "e.tsv"), "--denoiser", str(ddpm)],
                    "pip install 'smoothadv[diffusion]'")
    assert not any((tmp_path / f"{name}.tsv").exists() for name in "abcde")


def test_speed_flags_run_with_a_diffusion_model(toy_checkpoint, ddpm, tmp_path) -> None:
    """--fold-bn folds the classifier's BatchNorm only (torch.fx cannot trace the UNet); --channels-last and bf16
    autocast wrap f o D as they wrap any base classifier."""
    argv = ["predict", str(toy_checkpoint), "--n", "100", "--max", "2", *EVAL, "--denoiser", str(ddpm)]
    assert main([*argv, "--out", str(tmp_path / "plain.tsv")]) == 0
    assert main([*argv, "--fold-bn", "--channels-last", "--out", str(tmp_path / "fast.tsv")]) == 0
    assert ([row[:3] for row in result_rows(tmp_path / "fast.tsv")]
            == [row[:3] for row in result_rows(tmp_path / "plain.tsv")])
    assert main([*argv, "--precision", "bf16", "--out", str(tmp_path / "bf16.tsv")]) == 0


def test_multi_step_denoising_is_recorded_and_compared(toy_checkpoint, ddpm, tmp_path, capsys) -> None:
    """`denoiser_steps` (the RunSettings field behind --denoiser-steps, rows=False like every run setting) reaches the
    denoiser and the record's fact `denoiser_unet_steps`, compared on resume; through the library and a subclass of
    RunSettings here, so that it runs whether or not the field exists yet."""
    import dataclasses

    from smoothadv.run import run_evaluation
    from smoothadv.settings import AT_LEAST_ONE, PredictSettings, RunSettings, setting

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithSteps(RunSettings):
        denoiser_steps: int = setting(1, "network evaluations of a diffusion denoiser", limit=AT_LEAST_ONE,
                                      rows=False)

    def run(steps: int, out: str, resume: bool = False) -> dict:
        settings = WithSteps(checkpoint=str(toy_checkpoint), denoiser=str(ddpm), out=Path(tmp_path / out),
                             device="cpu", progress=False, denoiser_steps=steps, resume=resume)
        run_evaluation(settings, PredictSettings(sigma=0.25, n=100, max=2, batch=100, seed=4), log=None)
        return json.loads((tmp_path / f"{out}.args.json").read_text())

    assert run(1, "one.tsv")["denoiser_unet_steps"] == 1
    record = run(3, "three.tsv")
    assert (record["denoiser_unet_steps"], record["denoiser_t_star"]) == (3, 145)
    with pytest.raises(SmoothAdvError, match="denoiser_unet_steps: 3 != 1"):
        run(1, "three.tsv", resume=True)


RECIPES = sorted((ROOT / "configs" / "cifar10").glob("dds_s*.toml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_certifies_with_a_tiny_model_substituted(recipe, toy_checkpoint, ddpm, tmp_path) -> None:
    """The recipe's certify commands (fixed n and sequential) parse and run on 2 images, with the tiny UNet and the
    toy classifier standing in for the user's CIFAR-10 models and n shrunk; its published numbers are the paper's."""
    data = tomllib.loads(recipe.read_text())
    paper = data["paper"]
    assert paper["source"] and len(paper["radii"]) == len(paper["certified"])
    assert all(0 <= v <= 1 for v in paper["certified"])
    stand_in = {"denoiser": str(ddpm), "n": 200, "batch": 100, "max": 2, "skip": 1, "device": "cpu"}
    for section, looks in (("certify", []), ("sequential", ["--looks", "64:512"])):
        values = data[section]
        assert values["sigma"] == data["sigma"]
        assert values["denoiser"] == data["denoiser"]
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**values, **stand_in}.items()
                 if not (section == "sequential" and k == "n")]
        out = tmp_path / f"{section}.tsv"
        assert main(["certify", str(toy_checkpoint), *flags, *looks, "--no-progress", "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 3
        recorded = json.loads((tmp_path / f"{section}.tsv.args.json").read_text())
        assert recorded["sigma"] == data["sigma"] and recorded["denoiser_unet_steps"] == 1
    assert data["certify"]["n"] == 100_000 and data["sequential"]["mode"] == "sequential"
