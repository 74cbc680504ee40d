"""What `from smoothadv import ...` offers a researcher, and every module's declared public names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import smoothadv

PACKAGE = Path(smoothadv.__file__).resolve().parent

#: what a researcher reaches for in their own code, importable from the package itself
RESEARCHER = [
    "Smooth", "SoftSmoothed", "Certificate", "ABSTAIN", "SmoothAdvError",
    "SmoothAdv", "Consistency", "MACER", "SmoothMix", "CATRS", "GaussianAugmentation", "StabilityTraining", "Objective",
    "PGDL2", "DDN", "SteinPGDL2",
    "certify_sequential", "SequentialConfig", "SequentialCertificate", "BettingConfig",
    "DenoisedClassifier", "DnCNN", "load_denoiser",
    "Normalize", "build_model", "save_checkpoint", "load_checkpoint", "load_weights",
    "certified_radius", "clopper_pearson_lower", "clopper_pearson_upper", "clopper_pearson_interval",
    "certified_accuracy", "average_certified_radius", "max_certifiable_radius",
    "Results", "load_results", "summarize", "format_table", "plot_accuracy", "plot_radius_cdf",
    "example_generator",
]


def test_a_researcher_imports_everything_from_the_package() -> None:
    namespace: dict[str, object] = {}
    exec(f"from smoothadv import {', '.join(RESEARCHER)}", namespace)  # noqa: S102 - the import a user writes
    missing = [name for name in RESEARCHER if name not in smoothadv.__all__]
    assert not missing, f"not in smoothadv.__all__: {missing}"


def test_the_modules_are_attributes_after_import_smoothadv() -> None:
    for name in ("sequential", "denoise", "report", "stats", "smoothing", "attacks", "objectives", "seeds", "noise"):
        assert getattr(smoothadv, name).__name__ == f"smoothadv.{name}"


def test_the_package_all_names_exist() -> None:
    assert len(set(smoothadv.__all__)) == len(smoothadv.__all__)
    assert [name for name in smoothadv.__all__ if not hasattr(smoothadv, name)] == []


def test_every_module_declares_all_and_its_names_exist() -> None:
    undeclared, absent = [], {}
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        declared = any(isinstance(node, (ast.Assign, ast.AnnAssign)) and "__all__" in ast.unparse(node).split("=")[0]
                       for node in tree.body)
        if not declared:
            undeclared.append(path.name)
            continue
        if path.stem == "__main__":
            continue  # importing it runs the command line
        module = importlib.import_module(f"smoothadv.{path.stem}" if path.stem != "__init__" else "smoothadv")
        gone = [name for name in module.__all__ if not hasattr(module, name)]
        if gone:
            absent[path.name] = gone
    assert not undeclared, f"modules without __all__: {undeclared}"
    assert not absent, f"__all__ names that do not exist: {absent}"
