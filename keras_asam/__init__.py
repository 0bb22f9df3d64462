"""Adaptive Sharpness-Aware Minimization (ASAM) for Keras 3.

Reference: Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks", ICML 2021,
https://arxiv.org/abs/2102.11600
"""

from keras_asam import (
    callbacks,
    custom_loop,
    directions,
    perturbation,
    schedules,
    variants,
)
from keras_asam.model import ASAMModel, SAMModel
from keras_asam.sample_index import indexed
from keras_asam.sharpness import sharpness

__version__ = "0.3.0"

__all__ = [
    "ASAMModel",
    "SAMModel",
    "callbacks",
    "custom_loop",
    "directions",
    "indexed",
    "perturbation",
    "schedules",
    "sharpness",
    "variants",
]
