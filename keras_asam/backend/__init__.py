"""The train step's plumbing for the active Keras backend.

The step itself is written once, in `keras_asam/step/`; what differs
between backends is how a gradient at w + eps is taken and how state is
kept or restored. One module per backend holds it, the way Keras splits
`keras/src/backend/<name>/trainer.py`:

    tensorflow  tensorflow_step  (variables moved and restored)
    jax         jax_step  (stateless: a gradient at w + eps from values)
    torch       torch_step  (moved and restored under `torch.no_grad()`)

Only the active backend's module is imported, so `import keras_asam` on JAX
or PyTorch does not import TensorFlow.
"""

import keras

BACKENDS = ("tensorflow", "jax", "torch")


class _LazyTensorFlow:
    """`tensorflow`, imported on first use: importing keras_asam on the JAX
    or PyTorch backend does not import TensorFlow."""

    def __getattr__(self, name):
        import tensorflow

        return getattr(tensorflow, name)


tf = _LazyTensorFlow()


def is_tensorflow():
    """Whether Keras runs on TensorFlow (checked per call: the backend is
    read when Keras is imported, never from this module)."""
    return keras.backend.backend() == "tensorflow"


def train_step_bases():
    """The mixins that give `ASAMModel` its `train_step` on this backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_asam.backend.tensorflow_step import TensorFlowTrainStep
        from keras_asam.distribute import MultiWorkerFixes

        return (MultiWorkerFixes, TensorFlowTrainStep)
    if name == "jax":
        from keras_asam.backend.jax_step import JaxTrainStep

        return (JaxTrainStep,)
    if name == "torch":
        from keras_asam.backend.torch_step import TorchTrainStep

        return (TorchTrainStep,)
    from keras_asam.step import SharedStep

    return (SharedStep,)


def check_backend():
    """Raises `NotImplementedError` on a backend without an ASAM step."""
    name = keras.backend.backend()
    if name not in BACKENDS:
        raise NotImplementedError(
            "`ASAMModel` trains on the TensorFlow, JAX and PyTorch backends; "
            f"the current Keras backend is {name!r}. Set KERAS_BACKEND to "
            "'tensorflow', 'jax' or 'torch'."
        )
