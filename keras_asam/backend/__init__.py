"""The train step of `ASAMModel` for the active Keras backend.

The maths (eps, T_w, GSAM, LookSAM) lives once, in `keras_asam.perturbation`
and `keras_asam.directions`, written with `keras.ops`. What differs between
backends is the plumbing: how a gradient at w + eps is taken and how state
is kept or restored. One module per backend holds it, the way Keras splits
`keras/src/backend/<name>/trainer.py`:

    tensorflow   keras_asam.backend.tensorflow_step  (variables moved and
                                                      restored)
    jax          keras_asam.backend.jax_step  (stateless: a second gradient at
                                               w + eps from values)
    torch        keras_asam.backend.torch_step  (moved and restored under
                                                 `torch.no_grad()`)

Only the active backend's module is imported, so `import keras_asam` on JAX
or PyTorch does not import TensorFlow.
"""

import keras

# Options that a backend's step does not implement: name -> the value that
# turns them off. Checked when an `ASAMModel` is built. Every option of
# `ASAMModel` is implemented on the three backends today.
UNSUPPORTED = {
    "jax": {},
    "torch": {},
}


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
    from keras_asam.backend.common import UnsupportedBackendStep

    return (UnsupportedBackendStep,)


def check_options(hyperparameters):
    """Raises `NotImplementedError` for an option the active backend's step
    does not implement (at construction, naming the option and backend)."""
    name = keras.backend.backend()
    if name not in ("tensorflow", "jax", "torch"):
        raise NotImplementedError(
            "`ASAMModel` trains on the TensorFlow, JAX and PyTorch backends; "
            f"the current Keras backend is {name!r}. Set KERAS_BACKEND to "
            "'tensorflow', 'jax' or 'torch'."
        )
    for option, off in UNSUPPORTED.get(name, {}).items():
        value = hyperparameters[option]
        if value != off:
            raise NotImplementedError(
                f"`{option}={value!r}` is not implemented on the {name!r} "
                f"backend (only `{option}={off!r}`); it works on the "
                "'tensorflow' backend (KERAS_BACKEND=tensorflow)."
            )
