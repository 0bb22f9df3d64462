"""The SAM family as objects: `ASAMModel(..., variant=...)`.

Each variant is one module, written once with `keras.ops`; the model's step
(`keras_asam/step/`) calls its hooks on every backend. `Variant` is the
base class to write your own (see its docstring).
"""

from keras_asam.variants.aesam import AESAM
from keras_asam.variants.base import StepContext, Variant, dot, dots
from keras_asam.variants.friendly import FriendlySAM
from keras_asam.variants.gsam import GSAM
from keras_asam.variants.in_place import InPlace, all_finite
from keras_asam.variants.looksam import LookSAM
from keras_asam.variants.mesa import MESA
from keras_asam.variants.momentum import MomentumSAM
from keras_asam.variants.saf import SAF
from keras_asam.variants.wsam import WSAM

__all__ = ["AESAM", "FriendlySAM", "GSAM", "InPlace", "LookSAM", "MESA",
           "MomentumSAM", "SAF", "StepContext", "Variant", "WSAM",
           "all_finite", "dot", "dots"]
