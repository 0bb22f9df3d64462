# Experiment: ASAM through the variant path (a Variant() that changes nothing).
import keras_asam
from keras_asam.variants import Variant

_init = keras_asam.ASAMModel.__init__


def init(self, *args, variant=None, **kwargs):
    _init(self, *args, variant=variant or Variant(), **kwargs)


keras_asam.ASAMModel.__init__ = init
