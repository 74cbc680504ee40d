"""Typed settings: strict conversion, one-line errors, recipes and the factory.

Through the command line (a bad recipe, the durable run as a library call): tests/e2e/test_cli_settings.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smoothadv
from smoothadv import SmoothAdvError
from smoothadv.attacks import DDN, PGDL2, attack_recipe, build_attack
from smoothadv.objectives import OBJECTIVES, GaussianAugmentation, SmoothAdv, build_objective
from smoothadv.run import (
    ATTACK_RUN_DEFAULTS,
    IGNORED_SETTINGS,
    normalize_record,
    record,
    resume_differences,
    run_attack_recipe,
)
from smoothadv.settings import (
    AttackRunSettings,
    CertifySettings,
    PredictSettings,
    RunSettings,
    SpendingSettings,
    TrainSettings,
    convert,
    read_toml,
    row_settings,
)
from smoothadv.train import recipe as train_recipe

PACKAGE = Path(smoothadv.__file__).parent


def test_the_library_never_imports_argparse() -> None:
    """Only the command line knows argparse: every other module receives typed settings."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert "argparse" not in imported, path.name
        assert "Namespace" not in path.read_text(), path.name


@pytest.mark.parametrize(("value", "kind", "expected"), [
    (3, int, 3), (3, float, 3.0), (2.5, float, 2.5), (True, bool, True), ("a", str, "a"), (None, int | None, None),
    ([1, 2], tuple[float, ...], (1.0, 2.0)), ("0.5", float, 0.5), (0.2, float | str, 0.2), ("strict", float | str,
                                                                                                  "strict"),
])
def test_convert_accepts_exactly_the_declared_type(value, kind, expected) -> None:
    got = convert(value, kind, "x", from_text=isinstance(value, str) and kind is float)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("value", "kind"), [
    ("false", bool), (1, bool), (1.5, int), (True, int), (True, float), ([1, 2], int), ("3", int),
    (float("nan"), float), (float("inf"), float), (None, int), (10**400, float), ([1, "a"], tuple[float, ...]),
])
def test_convert_refuses_anything_else_with_one_line(value, kind) -> None:
    with pytest.raises(SmoothAdvError) as info:
        convert(value, kind, "epochs")
    assert "epochs" in str(info.value) and "\n" not in str(info.value)


def test_settings_are_frozen_and_checked_when_made(tmp_path) -> None:
    settings = TrainSettings(dataset="synthetic", arch="toy_cnn", out_dir=tmp_path, epochs=3)
    with pytest.raises(AttributeError):
        settings.epochs = 4  # type: ignore[misc]
    for bad, message in [({"epochs": 0}, "epochs must be an integer >= 1"), ({"sigma": -1}, "sigma must be"),
                         ({"dataset": "mnist"}, "dataset must be one of"), ({"seed": 2**64}, "seed must be"),
                         ({"lr": float("nan")}, "lr must be a finite number"), ({"epochs": 1.5}, "epochs must be"),
                         ({"precision": "fp8"}, "precision must be one of"), ({"arch": "nope"}, "arch must be")]:
        with pytest.raises(SmoothAdvError, match=message):
            TrainSettings(**{"dataset": "synthetic", "arch": "toy_cnn", "out_dir": tmp_path, **bad})
    assert CertifySettings(sigma=0.5).n == 100_000
    with pytest.raises(SmoothAdvError, match="needs mode sequential"):
        CertifySettings(sigma=0.5, sequential=SpendingSettings(policy="grid"))
    with pytest.raises(SmoothAdvError, match="the tolerance policy needs a tolerance > 0"):
        SpendingSettings(policy="tolerance")
    with pytest.raises(SmoothAdvError, match="--sigma must be a number > 0"):
        PredictSettings(sigma=0)
    with pytest.raises(SmoothAdvError, match="--shard must be i/k"):
        RunSettings(checkpoint="c", out=Path("o"), shard=(3, 2))
    with pytest.raises(SmoothAdvError, match="gradient_free is a variant of PGD"):
        build_attack("ddn", gradient_free=True)
    with pytest.raises(SmoothAdvError, match="gradient_free is a variant of PGD"):
        attack_recipe({"attack": "ddn", "gradient_free": True})
    with pytest.raises(SmoothAdvError, match="--gradient-free estimates the smoothed classifier's gradient"):
        AttackRunSettings(sigma=0.25, eps=0.5, attack={"gradient_free": True}, base_attack=True)
    with pytest.raises(SmoothAdvError, match="attack must be the attack's settings by key"):
        AttackRunSettings(sigma=0.25, eps=0.5, attack="ddn")  # type: ignore[arg-type]
    with pytest.raises(SmoothAdvError, match="the radii are the run's eps"):
        AttackRunSettings(sigma=0.25, eps=0.5, attack={"eps": 0.5})
    assert AttackRunSettings(sigma=0.25, eps=0.5).eps == (0.5,)  # one radius given as a number


def test_an_attack_run_holds_its_attack_as_one_recipe_completed_by_the_attack_module() -> None:
    given = {"steps": 3}
    settings = AttackRunSettings(sigma=0.25, eps=(0.25, 0.5), attack=given)
    given["steps"] = 4  # the settings keep their own copy
    assert settings.attack == {"steps": 3}
    assert attack_recipe(settings.attack, ATTACK_RUN_DEFAULTS) == {
        "attack": "pgd", "gradient_free": False, "steps": 3, "step_size": None, "random_start": False}
    assert run_attack_recipe(AttackRunSettings(sigma=0.25, eps=0.5)) == {
        "attack": "pgd", "gradient_free": False, "steps": 20, "step_size": None, "random_start": False}
    ddn = attack_recipe({"attack": "DDN", "random_start": False, "ddn_levels": 16}, ATTACK_RUN_DEFAULTS)
    assert ddn == {"attack": "ddn", "steps": 20, "ddn_gamma": None, "ddn_init_norm": None, "ddn_quantize": True,
                   "ddn_levels": 16}
    built = build_attack(eps=0.5, **ddn)  # the prediction script's rule at this radius
    assert isinstance(built, DDN) and built.levels == 16 and built.init_norm == 0.5
    assert built.gamma == pytest.approx(1 - (3 / 510 / 0.5) ** (1 / 20), rel=1e-15)
    for bad, message in [({"attack": "ddn", "random_start": True}, "random_start is not a setting of the ddn"),
                         ({"steps": 0}, "steps must be an integer >= 1"), ({"attack": "fgsm"}, "attack must be one"),
                         ({"steps": 1.5}, "steps must be an integer"), ({"step_size": -1.0}, "step_size must be"),
                         ({"eps": 0.5}, "eps is the attack run's radii")]:
        with pytest.raises(SmoothAdvError, match=message):
            attack_recipe(bad)


def test_attack_records_written_flat_by_earlier_versions_read_as_one_nested_recipe() -> None:
    earlier = {"command": "attack", "eps": 0.5, "m": 1, "attack": "ddn", "steps": 20, "random_start": True,
               "gradient_free": False, "n": 100}
    assert normalize_record(earlier) == {
        "command": "attack", "eps": 0.5, "m": 1, "n": 100, "attack": {
            "attack": "ddn", "steps": 20, "ddn_gamma": None, "ddn_init_norm": None, "ddn_quantize": True,
            "ddn_levels": 256}}  # the random start DDN never used is dropped
    now = record(RunSettings(checkpoint="c", out=Path("o.tsv")),
                 AttackRunSettings(sigma=0.25, eps=0.5, n=100, attack={"attack": "ddn"}))
    assert now["attack"] == normalize_record(earlier)["attack"]
    assert resume_differences({**now, "attack": "ddn", "steps": 20, "random_start": False, "gradient_free": False},
                              now) == ([], [])
    refused, _ = resume_differences({**now, "attack": "pgd", "steps": 20, "random_start": False,
                                     "gradient_free": False}, now)
    assert [line.split(":")[0] for line in refused] == ["attack"]
    assert normalize_record({"command": "attack", "attack": "cw"})["attack"] == "cw"  # unreadable: kept as written


def test_row_settings_leave_out_only_what_cannot_change_a_row() -> None:
    run = RunSettings(checkpoint="c.pth", out=Path("o.tsv"))
    assert row_settings(run) == {}
    assert IGNORED_SETTINGS >= {"out", "resume", "force", "progress", "device", "data_dir", "shard", "checkpoint",
                                "channels_last", "compile"}
    assert set(row_settings(CertifySettings(sigma=0.25))) >= {"sigma", "n", "n0", "alpha", "seed", "batch", "skip",
                                                             "max", "split", "precision", "fold_bn", "mode"}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("line", "message"), [
    ('multi_noise = "false"', "multi_noise must be true or false, got 'false'"),
    ("epochs = true", "epochs must be an integer, got True"),
    ("epochs = 1.5", "epochs must be an integer, got 1.5"),
    ("epochs = [1, 2]", "epochs must be an integer, got [1, 2]"),
    ("sigma = -1", "sigma must be a number >= 0, got -1"),
    ('dataset = "mnist"', "dataset must be one of"),
    ("seed = 99999999999999999999", "seed must be an integer in [0, 9223372036854775807]"),
    ("seed = 9223372036854775807", None),
    ("lr_stepp = 3", "lr_stepp: not a setting of training or of the smoothadv objective"),
    ('objective = "nope"', "objective must be one of gaussian, smoothadv"),
    ('attack = "cw"', "attack must be one of pgd, ddn"),
])
def test_recipe_values_are_type_checked(tmp_path, line, message) -> None:
    path = write(tmp_path, f'{line}\n')
    values = {"dataset": "synthetic", "objective": "smoothadv", **read_toml(path), "out": str(tmp_path / "run")}
    if message is None:
        settings, _ = train_recipe(values, source=str(path))
        assert settings.seed == 2**63 - 1
        return
    with pytest.raises(SmoothAdvError) as info:
        train_recipe(values, source=str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_flags_override_the_recipe_and_the_dataset_gives_the_architecture(tmp_path) -> None:
    path = write(tmp_path, 'dataset = "synthetic"\nobjective = "smoothadv"\neps = 0.5\nsteps = 3\nm = 2\n'
                           "multi_noise = true\nepochs = 4\nbatch = 32\n[paper]\nradii = [0.5]\n")
    values = {k: v for k, v in read_toml(path).items() if k != "paper"}
    settings, objective = train_recipe({**values, "steps": 5, "out": "run"})
    assert (settings.arch, settings.batch_size, settings.epochs) == ("toy_cnn", 32, 4)
    assert isinstance(objective, SmoothAdv) and objective.attack == PGDL2(0.5, 5)
    assert (objective.m, objective.multi_noise) == (2, True)
    with pytest.raises(SmoothAdvError, match="warm-up \\(5 epochs\\) is longer than training \\(4 epochs\\)"):
        train_recipe({**values, "warmup": 5, "out": "run"})


def test_one_factory_builds_every_objective_and_attack() -> None:
    assert set(OBJECTIVES) >= {"gaussian", "smoothadv"}  # the later methods: test_objectives_later_methods.py
    assert build_objective("gaussian", 0.25) == GaussianAugmentation(0.25)
    # every key means one thing: a hyperparameter of another objective is refused
    with pytest.raises(SmoothAdvError, match="m is not a setting of the gaussian objective"):
        build_objective("gaussian", 0.25, {"m": 4})
    with pytest.raises(SmoothAdvError, match="m must be an integer"):
        build_objective("smoothadv", 0.25, {"m": "4"}, PGDL2(0.5, 2))
    with pytest.raises(SmoothAdvError, match="needs an attack"):
        build_objective("smoothadv", 0.25)
    smoothadv_objective = build_objective("smoothadv", 0.5, {"m": 4, "multi_noise": True, "warmup": 10},
                                          build_attack("ddn", 1.0, 4, ddn_gamma=0.05, ddn_init_norm=1.0))
    assert smoothadv_objective == SmoothAdv(0.5, DDN(1.0, 4, gamma=0.05, init_norm=1.0), m=4, multi_noise=True,
                                            warmup=10)
    # DDN for evaluation: Salman et al.'s prediction script shrinks the norm from eps to 3/510 in T steps
    ddn = build_attack("ddn", eps=0.5, steps=20)
    assert ddn.init_norm == 0.5 and ddn.gamma == pytest.approx(1 - (3 / 510 / 0.5) ** (1 / 20), rel=1e-15)
    assert 0.5 * (1 - ddn.gamma) ** 20 == pytest.approx(3 / 510)
