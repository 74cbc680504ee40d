"""smoothadv: randomized smoothing (Cohen et al. 2019) and SmoothAdv (Salman et al. 2019) in PyTorch.

Public API::

    from smoothadv import Smooth, ABSTAIN
    smooth = Smooth(base_classifier, num_classes, sigma)
    prediction = smooth.predict(x, n, alpha, batch_size)
    prediction, radius = smooth.certify(x, n0, n, alpha, batch_size)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import SmoothAdvError
from .models import build_model, load_checkpoint, save_checkpoint
from .objectives import OBJECTIVES, GaussianAugmentation, LossOutput, Objective
from .smoothing import ABSTAIN, Certificate, Smooth, SoftSmoothed

__all__ = [
    "ABSTAIN", "Certificate", "Smooth", "SoftSmoothed", "SmoothAdvError", "build_model", "load_checkpoint",
    "save_checkpoint", "OBJECTIVES", "GaussianAugmentation", "LossOutput", "Objective", "__version__",
]
