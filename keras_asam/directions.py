"""The descent directions of GSAM and LookSAM under their earlier names
(`keras_asam.compat`).

They live with their variants, `keras_asam.variants.gsam` and
`keras_asam.variants.looksam`; the names stay importable from here.
"""

from keras_asam.variants.base import dot
from keras_asam.variants.gsam import EPSILON as GSAM_EPSILON
from keras_asam.variants.gsam import gsam_direction
from keras_asam.variants.looksam import looksam_correction, looksam_orthogonal

__all__ = ["GSAM_EPSILON", "dot", "gsam_direction", "looksam_correction",
           "looksam_orthogonal"]
