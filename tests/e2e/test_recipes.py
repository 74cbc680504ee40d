"""The paper-reproduction recipes (configs/**/*.toml) parse, match EXPERIMENTS.md, and train on synthetic data.

Each Gaussian and SmoothAdv recipe is run through `smoothadv train --config` for one epoch on the
synthetic dataset (dataset, architecture, epochs, warm-up, subset and workers overridden), and the
checkpoint must record the recipe's objective settings, so a renamed flag or a broken objective cannot
leave a recipe stale. The recipes of the later methods are many and differ per sigma only in
numbers: each is parsed into its typed settings and objective (every value type-checked), and one per
method and dataset is trained the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from smoothadv.attacks import attack_settings
from smoothadv.cli import build_parser, main
from smoothadv.evaluate import SMOOTH_PREDICTION_COLUMNS
from smoothadv.models import read_checkpoint
from smoothadv.objectives import OBJECTIVES, has_attack, hyperparameters
from smoothadv.settings import read_toml
from smoothadv.train import recipe as train_recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").rglob("*.toml"))
OVERRIDES = ["--dataset", "synthetic", "--arch", "toy_cnn", "--epochs", "1", "--train-subset", "4",
             "--eval-subset", "4", "--batch", "4", "--workers", "0", "--device", "cpu", "--no-progress"]


def load(recipe: Path) -> dict:
    with open(recipe, "rb") as handle:
        return tomllib.load(handle)


def later_method(recipe: Path) -> bool:
    """A recipe of the methods after SmoothAdv, SmoothAdv + consistency included."""
    data = load(recipe)
    return data["objective"] not in ("gaussian", "smoothadv") or bool(data.get("consistency"))


# the recipes that train: all but diffusion denoised smoothing's (configs/cifar10/dds_*.toml certify a pretrained
# diffusion model and classifier; tests/e2e/test_cli_diffusion_denoiser.py runs them)
TRAINING_RECIPES = [p for p in RECIPES if "objective" in load(p)]
FIRST_RECIPES = [p for p in TRAINING_RECIPES if not later_method(p)]
LATER_RECIPES = [p for p in TRAINING_RECIPES if later_method(p)]
# one trained recipe per method (the smoke run overrides dataset and architecture, so the datasets' recipes of a
# method differ there in numbers only): the Fashion-MNIST sigma = 0.25 one
TRAINED_LATER = {p for p in LATER_RECIPES if p.parent.name == "fashion_mnist" and p.stem.endswith("_s0.25")
                 and p.stem != "catrs_prior_gaussian_s0.25"}


def test_recipes_cover_the_papers_tables() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in RECIPES}
    for sigma in ("0.12", "0.25", "0.5", "1.0"):
        assert f"cifar10/cohen_gaussian_s{sigma}" in names
    for sigma in ("0.25", "0.5", "1.0"):
        assert f"imagenet/cohen_gaussian_s{sigma}" in names
    smoothadv_cifar = [load(p)["paper"] for p in RECIPES if p.parent.name == "cifar10" and "smoothadv" in p.stem]
    covered = sorted(r for paper in smoothadv_cifar for r in paper["radii"])
    assert covered == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]  # Table 2's "SmoothAdv" row
    smoothadv_imagenet = [load(p)["paper"] for p in RECIPES if p.parent.name == "imagenet" and "smoothadv" in p.stem]
    assert sorted(r for paper in smoothadv_imagenet for r in paper["radii"]) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]


def test_experiments_md_lists_every_recipe() -> None:
    text = (ROOT / "EXPERIMENTS.md").read_text()
    for recipe in RECIPES:
        assert f"configs/{recipe.parent.name}/{recipe.name}" in text, recipe


@pytest.mark.parametrize("recipe", FIRST_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_runs_its_first_steps(recipe: Path, tmp_path: Path) -> None:
    data = load(recipe)
    paper, certify = data["paper"], data["certify"]
    assert len(paper["radii"]) == len(paper["certified"])
    assert all(0 <= v <= 1 for v in paper["certified"])
    assert certify["sigma"] == data["sigma"]

    # the certify command the recipe documents parses with the current CLI
    certify_argv = ["certify", "ckpt.pth.tar", "--out", "x.tsv", *[f"--{k.replace('_', '-')}={v}"
                                                                     for k, v in certify.items()]]
    parsed = build_parser().parse_args(certify_argv)
    assert (parsed.n, parsed.n0, parsed.alpha, parsed.skip) == (certify["n"], certify["n0"], certify["alpha"],
                                                                  certify["skip"])

    # the recipe's keys are train settings, and they reach the typed settings and the objective
    values = {k: v for k, v in read_toml(recipe).items() if k not in ("paper", "certify")}
    settings, objective = train_recipe({**values, "out": str(tmp_path / "run")}, source=str(recipe))
    for key, field in (("sigma", "sigma"), ("lr", "lr"), ("lr_step", "lr_step"), ("normalization", "normalization"),
                       ("momentum", "momentum"), ("batch", "batch_size"), ("epochs", "epochs"), ("arch", "arch")):
        if key in data:
            assert getattr(settings, field) == data[key], key
    assert objective.describe()["name"] == {"gaussian": "GaussianAugmentation", "smoothadv": "SmoothAdv"}[
        data["objective"]]
    warmup = ["--warmup", "1"] if "warmup" in data else []  # only objectives with a warm-up have the flag
    argv = ["train", "--config", str(recipe), "--out", str(tmp_path / "run"), *OVERRIDES, *warmup]

    assert main(argv) == 0
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    assert state["sigma"] == data["sigma"] and state["epoch"] == 1
    objective = state["objective"]
    if data["objective"] == "gaussian":
        assert objective == {"name": "GaussianAugmentation", "sigma": data["sigma"]}
    else:
        assert objective["name"] == "SmoothAdv"
        assert (objective["m"], objective["multi_noise"]) == (data["m"], data.get("multi_noise", False))
        attack = objective["attack"]  # the attack's fields, e.g. {"name": "PGDL2", "eps": 0.5, "steps": 2, ...}
        assert attack["name"] == {"pgd": "PGDL2", "ddn": "DDN"}[data["attack"]]
        assert attack["eps"] == data["eps"]  # warm-up 1: the full eps in the first epoch
        assert attack["steps"] == data["steps"]


def test_later_methods_have_recipes_per_sigma_on_both_datasets() -> None:
    names = {f"{p.parent.name}/{p.stem}" for p in LATER_RECIPES}
    for dataset in ("cifar10", "fashion_mnist"):
        for method in ("stability", "consistency", "consistency_adv", "macer", "smoothmix", "catrs"):
            for sigma in ("0.25", "0.5", "1.0"):
                assert f"{dataset}/{method}_s{sigma}" in names
    # the Fashion-MNIST table's seven methods, each with the published numbers at every sigma
    for method in ("cohen_gaussian", "stability", "smoothadv_pgd_t10_m4_e1.0", "macer", "consistency", "smoothmix",
                   "catrs"):
        for sigma in ("0.25", "0.5", "1.0"):
            paper = load(ROOT / "configs" / "fashion_mnist" / f"{method}_s{sigma}.toml")["paper"]
            assert len(paper["radii"]) == 10 and paper["certified"][0] == paper["clean"]


def _smooth_prediction_table(tmp_path: Path) -> Path:
    """A smoothed prediction for the 4 synthetic training images the smoke runs use (uniform elsewhere)."""
    table = tmp_path / "pi.tsv"
    rows = [f"{i}\t{i % 4}\t{i % 4}\t1\t{','.join('7' if c == i % 4 else '1' for c in range(4))}\t0:00:01"
            for i in range(4)]
    table.write_text("\n".join(["\t".join(SMOOTH_PREDICTION_COLUMNS), *rows]) + "\n")
    return table


@pytest.mark.parametrize("recipe", LATER_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_later_method_recipe(recipe: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("smoothadv.files.git_revision", lambda: None)  # provenance's git calls: slow, tested elsewhere
    data = load(recipe)
    paper, certify = data["paper"], data["certify"]
    assert len(paper["radii"]) == len(paper["certified"]) and paper["source"]
    assert all(0 <= v <= 1 for v in paper["certified"])
    assert certify["sigma"] == data["sigma"]
    parsed = build_parser().parse_args(["certify", "ckpt.pth.tar", "--out", "x.tsv",
                                        *[f"--{k.replace('_', '-')}={v}" for k, v in certify.items()]])
    assert (parsed.n, parsed.n0, parsed.alpha, parsed.skip) == (certify["n"], certify["n0"], certify["alpha"],
                                                                  certify["skip"])
    table = _smooth_prediction_table(tmp_path)
    values = {k: v for k, v in read_toml(recipe).items() if k not in ("paper", "certify")}
    extra = {"smoothed_prediction": str(table)} if data["objective"] == "catrs" else {}
    settings, objective = train_recipe({**values, **extra, "out": str(tmp_path / "run")}, source=str(recipe))
    for key, field in (("sigma", "sigma"), ("lr", "lr"), ("lr_step", "lr_step"), ("normalization", "normalization"),
                       ("batch", "batch_size"), ("epochs", "epochs"), ("arch", "arch")):
        assert getattr(settings, field) == data[key], key
    described = objective.describe()
    assert described["name"] == OBJECTIVES[data["objective"]].__name__
    own = {k: v for k, v in data.items() if k in described and k not in ("sigma", "attack", "paper", "certify")}
    assert own and all(described[k] == (extra.get(k, v)) for k, v in own.items()), (own, described)
    if "attack" in described:  # SmoothAdv + consistency: the attack's fields
        assert (described["attack"]["eps"], described["attack"]["steps"]) == (data["eps"], data["steps"])
    if recipe not in TRAINED_LATER:
        return
    own_flags = {*hyperparameters(data["objective"]), *(attack_settings() if has_attack(data["objective"]) else ())}
    short = [flag for key, flag in (("steps", ["--steps", "1"]), ("warmup", ["--warmup", "1"])) if key in own_flags]
    argv = ["train", "--config", str(recipe), "--out", str(tmp_path / "run"), *OVERRIDES, *sum(short, []),
            *(["--smoothed-prediction", str(table)] if extra else [])]
    assert main(argv) == 0
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pth.tar")
    assert state["sigma"] == data["sigma"] and state["epoch"] == 1
    recorded = state["objective"]
    assert recorded["name"] == described["name"]
    for key, value in own.items():
        if key in ("warmup", "steps") or (key == "lbd" and data.get("deferred")):  # overridden / off in epoch 1
            continue
        assert recorded[key] == extra.get(key, value), key
