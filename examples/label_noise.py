"""Symmetric label noise for the quickstart and benchmarks/generalization.py.

Both import `noisy_split` from here, so the quickstart's noisy labels and
validation split for a seed are the benchmark's. NumPy only (no
deep-learning backend).
"""

import numpy as np

NUM_CLASSES = 10
VALIDATION_FRACTION = 0.2


def noisy_split(y_pool, noise, seed, num_classes=NUM_CLASSES,
                validation_fraction=VALIDATION_FRACTION):
    """(train indices, validation indices, noisy labels) for one seed.

    A fraction `noise` of the pool gets a label drawn uniformly from the
    `num_classes - 1` *other* classes. The seed fixes an order of the pool:
    the first round(noise * n) examples in it are corrupted, so the corrupted
    sets are nested across noise levels. The validation split (a fraction
    `validation_fraction` of the pool, with its noisy labels) depends on the
    seed only."""
    n = len(y_pool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    shifts = rng.integers(1, num_classes, n)
    split = rng.permutation(n)
    labels = y_pool.copy()
    corrupted = order[:int(round(noise * n))]
    labels[corrupted] = (y_pool[corrupted] + shifts[corrupted]) % num_classes
    n_val = int(round(validation_fraction * n))
    return np.sort(split[n_val:]), np.sort(split[:n_val]), labels
