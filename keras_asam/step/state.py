"""The model's own variables during the step: rho, the count of steps,
the variant's state."""


import keras
from keras import ops

from keras_asam import sample_index
from keras_asam.variants.base import (
    Variant,
)

PLAIN = Variant()  # ASAM/SAM: ascend along g, descend along g_adv.


class OwnState:
    """The model's own variables as the step reads and writes them (a
    mixin)."""


    def _symbolic_build(self, iterator=None, data_batch=None):
        variant = self._active_variant
        if variant.uses_sample_index:
            # Built from the inputs without the examples' indices.
            if data_batch is None:
                for _, _, data in iterator:
                    data_batch = (data[0] if isinstance(data, (list, tuple))
                                  else next(data))
                    break
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
                data_batch)
            x = sample_index.split(x, True, type(variant).__name__)[0]
            data_batch = keras.utils.pack_x_y_sample_weight(
                x, y, sample_weight)
        super()._symbolic_build(iterator=iterator, data_batch=data_batch)
        self._create_own_state()

    @property
    def _active_variant(self):
        return self.variant or PLAIN

    def _own_state(self):
        """ASAM's own variables: `rho`, the step count, the variant's
        state."""
        return [self._rho, self._train_steps] + self._variant_variables()

    def _float_state(self):
        """Non-trainable float variables of the layers (BatchNorm moving
        statistics), without ASAM's own state."""
        own = {id(v) for v in self._own_state()}
        return [
            v for v in self.non_trainable_variables
            if id(v) not in own and keras.backend.is_float_dtype(v.dtype)
        ]

    def _state_values(self):
        """The variant's state: name -> values aligned with the weights (one
        value for its `extra_state`)."""
        return {name: (self._read(variables)
                       if not isinstance(variables, list)
                       else [self._read(v) for v in variables])
                for name, variables in self._variant_state().items()}

    def _write_state(self, updates):
        state = self._variant_state()
        for name, values in updates.items():
            if not isinstance(state[name], list):
                values, variables = [values], [state[name]]
            else:
                variables = state[name]
            for variable, value in zip(variables, values):
                if value is not None:
                    self._write(variable, ops.cast(value, "float32"))

    def _counter_dtype(self):
        """The dtype of the model's count of train steps."""
        return "int64"

    def _count_step(self):
        self._write(self._train_steps, self._read(self._train_steps) + 1)
