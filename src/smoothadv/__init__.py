"""smoothadv: randomized smoothing (Cohen et al. 2019) and SmoothAdv (Salman et al. 2019) in PyTorch.

Public API::

    from smoothadv import Smooth, ABSTAIN
    smooth = Smooth(base_classifier, num_classes, sigma)
    prediction = smooth.predict(x, n, alpha, batch_size)
    prediction, radius = smooth.certify(x, n0, n, alpha, batch_size)

Everything listed in `__all__` is importable from the package; the modules (`smoothadv.stats`,
`smoothadv.sequential`, `smoothadv.denoise`, `smoothadv.report`, ...) are attributes of it too.
What a researcher's own code reaches for (docs/own-code.md goes through it end to end):

- smoothing and certification: `Smooth` (with `domain=` for inputs other than [0, 1] images), `SoftSmoothed`,
  `Certificate`, `certify_sequential`, `SequentialConfig`, `BettingConfig`;
- training objectives for your own loop: `SmoothAdv`, `Consistency`, `MACER`, `SmoothMix`, `CATRS`,
  `GaussianAugmentation`, `StabilityTraining` (the contract: `Objective`); attacks: `PGDL2`, `DDN`, `SteinPGDL2`;
- models and checkpoints: `Normalize`, `DenoisedClassifier`, `DnCNN`, `save_checkpoint`, `load_weights`,
  `load_checkpoint`, `load_denoiser`;
- statistics and reports: `certified_radius`, `clopper_pearson_lower` / `_upper` / `_interval`,
  `certified_accuracy`, `average_certified_radius`, `Results`, `summarize`, `format_table`, `plot_accuracy`,
  `plot_radius_cdf`;
- randomness: `generator=` per call, `generators=` per input, `seed=` for dataset drivers (`smoothadv.seeds`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import (
    attacks,
    betting,
    data,
    denoise,
    models,
    noise,
    objectives,
    report,
    run,
    seeds,
    sequential,
    settings,
    smoothing,
    stats,
    train,
)
from .attacks import DDN, PGDL2, SteinPGDL2, build_attack
from .betting import BettingConfig
from .denoise import DenoisedClassifier, DnCNN
from .errors import SmoothAdvError
from .models import Normalize, build_model, load_checkpoint, load_denoiser, load_weights, save_checkpoint
from .objectives import (
    CATRS,
    MACER,
    OBJECTIVES,
    Consistency,
    GaussianAugmentation,
    LossOutput,
    Objective,
    SmoothAdv,
    SmoothMix,
    StabilityTraining,
    build_objective,
)
from .report import Results, format_table, load_results, plot_accuracy, plot_radius_cdf, summarize
from .run import run_evaluation
from .seeds import example_generator
from .sequential import SequentialCertificate, SequentialConfig, certify_sequential
from .settings import CertifySettings, PredictSettings, RunSettings, TrainSettings
from .smoothing import ABSTAIN, Certificate, Smooth, SoftSmoothed
from .stats import (
    average_certified_radius,
    certified_accuracy,
    certified_radius,
    clopper_pearson_interval,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_certifiable_radius,
)
from .train import fit, recipe

__all__ = [
    "ABSTAIN", "BettingConfig", "CATRS", "Certificate", "CertifySettings", "Consistency", "DDN",
    "DenoisedClassifier", "DnCNN", "GaussianAugmentation", "LossOutput", "MACER", "Normalize", "OBJECTIVES",
    "Objective", "PGDL2", "PredictSettings", "Results", "RunSettings", "SequentialCertificate", "SequentialConfig",
    "Smooth", "SmoothAdv", "SmoothAdvError", "SmoothMix", "SoftSmoothed", "StabilityTraining", "SteinPGDL2",
    "TrainSettings", "__version__", "attacks", "average_certified_radius", "betting", "build_attack", "build_model",
    "build_objective", "certified_accuracy", "certified_radius", "certify_sequential", "clopper_pearson_interval",
    "clopper_pearson_lower", "clopper_pearson_upper", "data", "denoise", "example_generator", "fit", "format_table",
    "load_checkpoint", "load_denoiser", "load_results", "load_weights", "max_certifiable_radius", "models", "noise",
    "objectives", "plot_accuracy", "plot_radius_cdf", "recipe", "report", "run", "run_evaluation",
    "save_checkpoint", "seeds", "sequential", "settings", "smoothing", "stats", "summarize", "train",
]
