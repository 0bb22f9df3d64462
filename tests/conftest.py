import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


import keras  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Tests marked `tensorflow` (tf.function, tf.distribute, SavedModel,
    TensorFlow's graph) are skipped on the other backends, and so are
    those marked `fixed_backend`: their processes pick their own backends,
    so they run once, from the TensorFlow suite."""
    if keras.backend.backend() == "tensorflow":
        return
    skips = {
        "tensorflow": pytest.mark.skip(reason="needs the TensorFlow backend"),
        "fixed_backend": pytest.mark.skip(
            reason="processes on backends of their own: run from the "
                   "TensorFlow suite"),
    }
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
                break


@pytest.fixture(scope="session")
def tensorflow_runs(tmp_path_factory):
    """Pinned cases on TensorFlow: today's code, the pinned commit's,
    another CPU's kernels and slightly changed steps
    (`tests/pinned_runs.py`)."""
    from tests import pinned_runs

    extra = {"other_kernels": ([], pinned_runs.OTHER_KERNELS)}
    extra.update({label: (args, {})
                  for label, args in pinned_runs.CHANGES.items()})
    return pinned_runs.runs("tensorflow",
                            tmp_path_factory.mktemp("pinned_tensorflow"),
                            extra)


@pytest.fixture(scope="session")
def jax_runs(tmp_path_factory):
    """Pinned cases on JAX: today's code and the pinned commit's."""
    from tests import pinned_runs

    return pinned_runs.runs("jax", tmp_path_factory.mktemp("pinned_jax"))


@pytest.fixture(scope="session")
def torch_runs(tmp_path_factory):
    """Pinned eager cases on PyTorch: today's code and the pinned
    commit's."""
    pytest.importorskip("torch")
    from tests import pinned_runs

    return pinned_runs.runs("torch", tmp_path_factory.mktemp("pinned_torch"),
                            arguments=["--cases", *pinned_runs.TORCH_CASES])
