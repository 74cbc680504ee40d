"""smoothadv: randomized smoothing (Cohen et al. 2019) and SmoothAdv (Salman et al. 2019) in PyTorch.

Public API::

    from smoothadv import Smooth, ABSTAIN
    smooth = Smooth(base_classifier, num_classes, sigma)
    prediction = smooth.predict(x, n, alpha, batch_size)
    prediction, radius = smooth.certify(x, n0, n, alpha, batch_size)

Everything listed in `__all__` is importable from the package; the modules (`smoothadv.stats`,
`smoothadv.sequential`, `smoothadv.denoise`, `smoothadv.report`, ...) are attributes of it too.
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
from .models import Normalize, build_model, load_checkpoint, save_checkpoint
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
from .run import run_evaluation
from .sequential import SequentialConfig, certify_sequential
from .settings import CertifySettings, PredictSettings, RunSettings, TrainSettings
from .smoothing import ABSTAIN, Certificate, Smooth, SoftSmoothed
from .stats import certified_radius, clopper_pearson_lower, clopper_pearson_upper
from .train import fit, recipe

__all__ = [
    "ABSTAIN", "CATRS", "DDN", "MACER", "OBJECTIVES", "PGDL2", "BettingConfig", "Certificate", "CertifySettings",
    "Consistency", "DenoisedClassifier", "DnCNN", "GaussianAugmentation", "LossOutput", "Normalize", "Objective",
    "PredictSettings", "RunSettings", "SequentialConfig", "Smooth", "SmoothAdv", "SmoothAdvError", "SmoothMix",
    "SoftSmoothed", "StabilityTraining", "SteinPGDL2", "TrainSettings", "__version__", "attacks", "betting",
    "build_attack", "build_model", "build_objective", "certified_radius", "certify_sequential",
    "clopper_pearson_lower", "clopper_pearson_upper", "data", "denoise", "fit", "load_checkpoint", "models", "noise",
    "objectives", "recipe", "report", "run", "run_evaluation", "save_checkpoint", "sequential", "settings",
    "smoothing", "stats", "train",
]
