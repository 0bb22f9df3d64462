"""Step time of ASAM and its variants against base and a two-pass floor.

Measures, in one process and interleaved (A B C ..., A B C ...), the time of
one compiled training step of:

  base         the base optimizer alone (a plain keras.Model)
  floor        the two-pass floor: the gradient computed twice at w, the second
               one applied (the physical limit of any SAM-type method)
  sam          SAMModel
  asam         ASAMModel, element-wise
  asam_filter  ASAMModel, filter-wise
  asam_every2  ASAMModel(asam_every=2)
  asam_every5  ASAMModel(asam_every=5)
  asam_norm    ASAMModel(perturb="normalization") (SAM-ON; models with a
               normalization layer only: the CNN, not the MLP)
  gsam         ASAMModel(gsam_alpha=0.3) (GSAM direction on adaptive ASAM)
  looksam5     ASAMModel(looksam_alpha=0.7, asam_every=5) (LookSAM)
  asam_split2  ASAMModel(num_batch_splits=2)  (m-sharpness; without XLA only)
  asam_split8  ASAMModel(num_batch_splits=8)
  asam_split_b ASAMModel(num_batch_splits=batch size): 1-SAM, one example
               per part, `--split-b-steps` steps per round (it is slow)
  asam_skip    ASAMModel(non_finite_step="skip"): the update in a
               conditional that skips it where L(w + eps) is not finite
  fsam         ASAMModel(variant=FriendlySAM()) (Friendly-SAM, sigma 1,
               lmbda 0.9, on adaptive ASAM)
  wsam         ASAMModel(variant=WSAM(0.9)) (WSAM, decoupled, on adaptive
               ASAM)
  msam         SAMModel(rho=3, variant=MomentumSAM(0.9)) (Momentum-SAM: one
               pass per step, the paper's rho and SAM mode)
  saf          ASAMModel(variant=SAF(...)) (one pass and a KL term against
               each example's recorded logits; the inputs carry
               `sample_index`)
  mesa         ASAMModel(variant=MESA()) (one pass, a forward pass of the
               weights' average, and the average's update)
  aesam_perturbed  ASAMModel(variant=AESAM(...)) with thresholds that take
               the perturbed pass on every step
  aesam_plain  the same with thresholds that skip it on every step after
               the first (AE-SAM's two kinds of step; how many steps take
               the pass is the budget benchmark's "passes per step")

(the variants from fsam on are from `keras_asam.variants`; against a
version of the library without them they are n/a)

for a CNN with BatchNorm on CIFAR-shaped data (32x32x3, batch 128) and an MLP,
each at two widths, with and without `jit_compile`. A callback brackets each
step between `on_train_batch_begin` and `on_train_batch_end` inside `fit`
over a cached, repeated `tf.data` dataset. Each round runs every variant for
`--steps` steps; a variant's time is the median over rounds of its mean step
time in a round (so `asam_every=k` averages its cheap and expensive steps).
Variants that do not apply to a setting (XLA with `num_batch_splits` > 1,
`perturb="normalization"` on a model without normalization layers) are
skipped and reported as n/a.

    python -m benchmarks.step_time             # about 20 minutes, 2 idle cores
    python -m benchmarks.step_time --widths 1  # about 7 minutes
    python -m benchmarks.step_time --quick     # about 2 minutes
    python -m benchmarks.step_time --variants base floor asam gsam

Writes benchmarks/results/step_time.json and .md and prints the tables.

Backends: a Keras backend is fixed per process, so `--backend NAME` sets
KERAS_BACKEND before Keras is imported and measures on that backend
(tensorflow by default). Each backend's step is compiled its default way:
TensorFlow as a `tf.function` with XLA off and on (`--jit both`), JAX with
`jax.jit` (XLA; Keras' `jit_compile="auto"` on JAX), PyTorch eagerly (its
`ASAMModel` step ignores `jit_compile`). `--backends tensorflow jax torch`
runs one child process per backend, one after the other, and writes one table
of absolute step times and ratios (benchmarks/results/step_time_backends.json
and .md):

    python -m benchmarks.step_time --backend jax --widths 1
    python -m benchmarks.step_time --backends tensorflow jax torch

Every step is timed to its completion: Keras' `fit` converts the logs of a
step to Python numbers before `on_train_batch_end` on every backend, and on
JAX (asynchronous dispatch) the timer also waits for the new state of the
step (`jax.block_until_ready`) before it reads the clock.
"""

import argparse
import os
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
BACKENDS = ["tensorflow", "jax", "torch"]


def _requested_backend(argv):
    """The value of `--backend` in `argv`, or None."""
    for i, arg in enumerate(argv):
        if arg == "--backend" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--backend="):
            return arg.split("=", 1)[1]
    return None


if __name__ == "__main__" and _requested_backend(sys.argv[1:]) in BACKENDS:
    # A Keras backend is fixed when Keras is imported.
    os.environ["KERAS_BACKEND"] = _requested_backend(sys.argv[1:])

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402  (tf.data input on every backend)

import keras_asam  # noqa: E402
from benchmarks import harness  # noqa: E402

try:  # Options that a backend's ASAM step does not implement.
    from keras_asam.backend import UNSUPPORTED  # noqa: E402
except ImportError:  # A TensorFlow-only version of the library.
    UNSUPPORTED = {}

VARIANTS = ["base", "floor", "sam", "asam", "asam_filter", "asam_every2",
            "asam_every5", "asam_norm", "gsam", "looksam5", "asam_split2",
            "asam_split8", "asam_split_b", "asam_skip", "fsam", "wsam",
            "msam", "saf", "mesa", "aesam_perturbed", "aesam_plain"]
# The default variants of `--backends`.
BACKEND_VARIANTS = ["base", "floor", "sam", "asam"]
# The columns of the step-time tables (a new variant joins one of them).
TIME_TABLES = [
    ["base", "floor", "sam", "asam", "asam_filter", "asam_every2",
     "asam_every5"],
    ["base", "floor", "asam", "asam_norm", "gsam", "looksam5", "asam_split2",
     "asam_split8", "asam_split_b", "asam_skip"],
    ["base", "floor", "sam", "asam", "fsam", "wsam", "msam"],
    ["base", "floor", "asam", "saf", "mesa", "aesam_perturbed",
     "aesam_plain"],
]
assert set(sum(TIME_TABLES, [])) == set(VARIANTS), "a variant in no table"
SPLITS = {"asam_split2": 2, "asam_split8": 8, "asam_split_b": None}
GSAM_ALPHA = 0.3
LOOKSAM_ALPHA, LOOKSAM_EVERY = 0.7, 5
FSAM_SIGMA, FSAM_LMBDA = 1.0, 0.9
WSAM_GAMMA = 0.9
MSAM_RHO, MSAM_MOMENTUM = 3.0, 0.9
# AE-SAM's threshold mu + c sigma with c fixed: far below (every step takes
# the perturbed pass) or far above (none after the first).
AESAM_ALWAYS, AESAM_NEVER = -1e6, 1e6
# The class in `keras_asam.variants` each of these variants needs.
VARIANT_CLASSES = {"fsam": "FriendlySAM", "wsam": "WSAM",
                   "msam": "MomentumSAM", "saf": "SAF", "mesa": "MESA",
                   "aesam_perturbed": "AESAM", "aesam_plain": "AESAM"}
# Variants whose inputs carry each example's index (`keras_asam.indexed`).
INDEXED = {"saf"}
# Ratios as (name, numerator, denominator); two tables.
RATIO_TABLES = [
    [("floor/base", "floor", "base"),
     ("sam/floor", "sam", "floor"),
     ("asam/floor", "asam", "floor"),
     ("asam_filter/floor", "asam_filter", "floor"),
     ("asam/base", "asam", "base"),
     ("asam_every2/base", "asam_every2", "base"),
     ("asam_every5/base", "asam_every5", "base")],
    [("gsam/asam", "gsam", "asam"),
     ("looksam5/base", "looksam5", "base"),
     # What looksam5/base would be if its 1 in 5 perturbed steps cost the
     # floor and its other 4 the base step: (floor + 4 base) / (5 base).
     ("looksam5_ideal/base", None, None),
     ("looksam5/asam_every5", "looksam5", "asam_every5"),
     ("asam_norm/asam", "asam_norm", "asam"),
     ("asam_split2/asam", "asam_split2", "asam"),
     ("asam_split8/asam", "asam_split8", "asam"),
     ("asam_split_b/asam", "asam_split_b", "asam"),
     ("asam_skip/asam", "asam_skip", "asam")],
    # Targets (CNN without XLA): fsam/asam and wsam/asam <= 1.03,
    # msam/base <= 1.10.
    [("fsam/asam", "fsam", "asam"),
     ("wsam/asam", "wsam", "asam"),
     ("msam/base", "msam", "base"),
     ("msam/sam", "msam", "sam")],
    # Targets (CNN, with and without XLA): saf/base <= 1.05,
    # mesa/base <= 1.45, aesam_perturbed/asam and aesam_plain/base <= 1.03.
    [("saf/base", "saf", "base"),
     ("mesa/base", "mesa", "base"),
     ("aesam_perturbed/asam", "aesam_perturbed", "asam"),
     ("aesam_plain/base", "aesam_plain", "base")],
]


class TwoPassFloor(keras.Model):
    """Two gradients at w per step, the second applied: no perturbation.

    Pass 2 depends on pass 1 through the gradient norm (which every SAM-type
    step computes): its input is `x * (norm >= 0)`, bitwise `x` but not a
    common subexpression of pass 1, so graph optimizers can neither prune the
    first backward pass nor merge the two passes. The same step on every
    backend, in that backend's style: a `GradientTape` on TensorFlow, two
    `jax.value_and_grad` of `compute_loss_and_updates` from values on JAX
    (pass 2 from the state pass 1 returned; its own state and metric
    updates dropped, as in ASAM's JAX step), two `backward()` calls with the
    gradients zeroed between them on PyTorch.
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped_model = model

    def call(self, inputs, training=None):
        return self.wrapped_model(inputs, training=training)

    def train_step(self, *args):
        backend = keras.backend.backend()
        if backend == "jax":
            return self._jax_train_step(*args)
        if backend == "torch":
            return self._torch_train_step(*args)
        return self._tensorflow_train_step(*args)

    # -- TensorFlow ------------------------------------------------------

    def _gradients(self, x, y):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        return y_pred, loss, tape.gradient(loss, self.trainable_variables)

    def _tensorflow_train_step(self, data):
        x, y = data
        y_pred, loss, first = self._gradients(x, y)
        self._loss_tracker.update_state(loss)
        norm = tf.linalg.global_norm(first)
        same_x = x * tf.cast(norm >= 0.0, x.dtype)  # x, but data-dependent.
        _, _, second = self._gradients(same_x, y)
        self.optimizer.apply_gradients(zip(second, self.trainable_variables))
        return self.compute_metrics(x, y, y_pred)

    # -- JAX (stateless, inside jax.jit) ----------------------------------

    def _jax_train_step(self, state, data):
        import jax
        import jax.numpy as jnp

        trainable, non_trainable, optimizer_variables, metrics_variables = (
            state)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates,
                                     has_aux=True)
        (_, aux), first = grad_fn(
            trainable, non_trainable, metrics_variables, x, y, sample_weight,
            training=True, optimizer_variables=optimizer_variables)
        loss, y_pred, new_non_trainable, new_metrics = aux
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in first))
        same_x = x * (norm >= 0.0).astype(x.dtype)  # x, but data-dependent.
        _, second = grad_fn(
            trainable, new_non_trainable, metrics_variables, same_x, y,
            sample_weight, training=True,
            optimizer_variables=optimizer_variables)
        trainable, optimizer_variables = self.optimizer.stateless_apply(
            optimizer_variables, second, trainable)
        logs, new_metrics = self._update_metrics_variables(
            new_metrics, loss, x, y, y_pred, sample_weight)
        return logs, (trainable, new_non_trainable, optimizer_variables,
                      new_metrics)

    # -- PyTorch (eager) --------------------------------------------------

    def _torch_gradients(self, x, y):
        y_pred = self(x, training=True)
        self.zero_grad()
        loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        loss.backward()
        return y_pred, loss.detach(), [v.value.grad
                                       for v in self.trainable_variables]

    def _torch_train_step(self, data):
        import torch

        x, y = data
        y_pred, loss, first = self._torch_gradients(x, y)
        self._loss_tracker.update_state(loss, sample_weight=x.shape[0])
        with torch.no_grad():
            norm = torch.sqrt(sum(torch.sum(torch.square(g)) for g in first))
            same_x = x * (norm >= 0.0).to(x.dtype)  # x, but data-dependent.
        _, _, second = self._torch_gradients(same_x, y)
        with torch.no_grad():
            self.optimizer.apply(second, self.trainable_variables)
        self.zero_grad()
        return self.compute_metrics(x, y, y_pred)


def cnn(width):
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for filters in (16 * width, 32 * width, 64 * width):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs)


def mlp(width):
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Flatten()(inputs)
    for _ in range(3):
        h = keras.layers.Dense(256 * width, activation="relu")(h)
    outputs = keras.layers.Dense(10)(h)
    return keras.Model(inputs, outputs)


def has_normalization(model):
    types = keras_asam.selection.normalization_layer_types()
    return any(isinstance(layer, types)
               for layer in model._flatten_layers(include_self=False))


# The options of each variant that a backend may not implement.
VARIANT_OPTIONS = {"asam_split2": {"num_batch_splits": 2},
                   "asam_split8": {"num_batch_splits": 8},
                   "asam_split_b": {"num_batch_splits": "batch size"}}


def variant_class(lib, variant):
    """The class of `lib.variants` that `variant` needs, or None if `lib`
    (a version of keras_asam) does not have it."""
    return getattr(getattr(lib, "variants", None),
                   VARIANT_CLASSES[variant], None)


def skip_reason(variant, architecture, width, jit, lib=None):
    """Why `variant` does not apply to this setting, or None."""
    lib = lib or keras_asam
    if variant in VARIANT_CLASSES and variant_class(lib, variant) is None:
        return (f"keras_asam.variants.{VARIANT_CLASSES[variant]} is not in "
                "this version of the library")
    backend = keras.backend.backend()
    unsupported = UNSUPPORTED.get(backend, {})
    for option, value in VARIANT_OPTIONS.get(variant, {}).items():
        if option in unsupported and value != unsupported[option]:
            return f"{option} is not implemented on the {backend} backend"
    if variant in SPLITS and jit and backend == "tensorflow":
        return "num_batch_splits > 1 does not compile with XLA"
    if variant == "asam_norm" and not has_normalization(
            {"cnn": cnn, "mlp": mlp}[architecture](width)):
        return "no normalization layer to perturb"
    return None


def build(variant, architecture, width, jit, batch_size=128, lib=None):
    """`variant` of the model, compiled; `lib`: the keras_asam module to
    build it from (default: the one imported here)."""
    lib = lib or keras_asam
    keras.utils.set_random_seed(0)
    inner = {"cnn": cnn, "mlp": mlp}[architecture](width)
    splits = SPLITS.get(variant) or batch_size
    model = {
        "base": lambda: inner,
        "floor": lambda: TwoPassFloor(inner),
        "sam": lambda: lib.SAMModel(inner),
        "asam": lambda: lib.ASAMModel(inner),
        "asam_filter": lambda: lib.ASAMModel(
            inner, normalization="filterwise"),
        "asam_every2": lambda: lib.ASAMModel(inner, asam_every=2),
        "asam_every5": lambda: lib.ASAMModel(inner, asam_every=5),
        "asam_norm": lambda: lib.ASAMModel(
            inner, perturb="normalization"),
        "gsam": lambda: lib.ASAMModel(inner, gsam_alpha=GSAM_ALPHA),
        "looksam5": lambda: lib.ASAMModel(
            inner, looksam_alpha=LOOKSAM_ALPHA, asam_every=LOOKSAM_EVERY),
        "asam_split2": lambda: lib.ASAMModel(
            inner, num_batch_splits=splits),
        "asam_split8": lambda: lib.ASAMModel(
            inner, num_batch_splits=splits),
        "asam_split_b": lambda: lib.ASAMModel(
            inner, num_batch_splits=splits),
        "asam_skip": lambda: lib.ASAMModel(
            inner, non_finite_step="skip"),
        "fsam": lambda: lib.ASAMModel(inner, variant=variant_class(
            lib, "fsam")(sigma=FSAM_SIGMA, lmbda=FSAM_LMBDA)),
        "wsam": lambda: lib.ASAMModel(inner, variant=variant_class(
            lib, "wsam")(WSAM_GAMMA)),
        "msam": lambda: lib.SAMModel(inner, rho=MSAM_RHO, variant=(
            variant_class(lib, "msam")(MSAM_MOMENTUM))),
        "saf": lambda: lib.ASAMModel(inner, variant=variant_class(
            lib, "saf")(num_examples=batch_size, num_classes=10)),
        "mesa": lambda: lib.ASAMModel(inner, variant=variant_class(
            lib, "mesa")()),
        "aesam_perturbed": lambda: lib.ASAMModel(inner, variant=(
            variant_class(lib, "aesam_perturbed")(
                10**9, lambda1=AESAM_ALWAYS, lambda2=AESAM_ALWAYS))),
        "aesam_plain": lambda: lib.ASAMModel(inner, variant=(
            variant_class(lib, "aesam_plain")(
                10**9, lambda1=AESAM_NEVER, lambda2=AESAM_NEVER))),
    }[variant]()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


class StepTimer(keras.callbacks.Callback):
    """Wall time and process CPU time (all threads) of each step."""

    def __init__(self):
        super().__init__()
        self.times, self.cpu_times = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.cpu_start = time.process_time()
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Keras has made `logs` Python numbers (a wait for the step on every
        # backend); JAX dispatches asynchronously: wait for the new state.
        state = getattr(self.model, "_jax_state", None)
        if state is not None:
            import jax

            jax.block_until_ready(state)
        self.times.append(time.perf_counter() - self.start)
        self.cpu_times.append(time.process_time() - self.cpu_start)


def dataset(batch_size, indexed=False):
    """One batch of CIFAR-shaped data, repeated; `indexed`: the inputs carry
    each example's index (`{"inputs": x, "sample_index": i}`)."""
    rs = np.random.RandomState(0)
    x = rs.rand(batch_size, 32, 32, 3).astype("float32")
    y = rs.randint(0, 10, batch_size)
    if indexed:
        x = {"inputs": x, "sample_index": np.arange(batch_size)}
    return tf.data.Dataset.from_tensors((x, y)).cache().repeat()


def steps_of(variant, args):
    return args.split_b_steps if variant == "asam_split_b" else args.steps


def time_interleaved(models, data, rounds, steps, alternate=()):
    """Per-round mean step times (wall and CPU seconds) of `models` (key ->
    compiled model), run in turn in every round after one warm-up fit each.
    `data`: a dataset, or a function of the key that gives its dataset.
    `steps(key)`: steps per round. `alternate`: groups of keys (e.g. the
    same variant from two versions of the library) whose order is reversed
    in every other round, so that neither always runs first."""
    data_of = data if callable(data) else lambda key: data
    for key, model in models.items():  # Trace and warm up.
        model.fit(data_of(key), steps_per_epoch=steps(key), epochs=1, verbose=0,
                  shuffle=False)
    per_round = {key: [] for key in models}
    per_round_cpu = {key: [] for key in models}
    groups = {key: group for group in alternate for key in group}
    for round_index in range(rounds):
        order, done = [], set()
        for key in models:
            if key in done:
                continue
            group = [k for k in groups.get(key, [key]) if k in models]
            if round_index % 2:
                group = group[::-1]
            order += group
            done.update(group)
        for key in order:
            timer = StepTimer()
            models[key].fit(data_of(key), steps_per_epoch=steps(key), epochs=1,
                            verbose=0, shuffle=False, callbacks=[timer])
            per_round[key].append(float(np.mean(timer.times)))
            per_round_cpu[key].append(float(np.mean(timer.cpu_times)))
    return per_round, per_round_cpu


def measure(setting, args):
    """Median (over rounds) of the mean step time of every variant that
    applies, in wall and in CPU seconds; `None` for the others."""
    data = {indexed: dataset(args.batch_size, indexed=indexed)
            for indexed in (False, True)}
    skipped = {v: skip_reason(v, *setting) for v in args.variants}
    skipped = {v: reason for v, reason in skipped.items() if reason}
    models = {}
    for v in args.variants:
        if v in skipped:
            continue
        try:
            models[v] = build(v, *setting, batch_size=args.batch_size)
        except NotImplementedError as error:  # An option of this backend.
            skipped[v] = str(error).split(";")[0]
    per_round, per_round_cpu = time_interleaved(
        models, lambda v: data[v in INDEXED], args.rounds,
        lambda v: steps_of(v, args))

    def medians(rounds):
        return {v: float(np.median(rounds[v])) if v in rounds else None
                for v in args.variants}

    return (medians(per_round), medians(per_round_cpu), per_round,
            per_round_cpu, skipped)


def ratios(times):
    """Every ratio of `RATIO_TABLES`; `None` where a variant is missing."""
    result = {}
    for name, numerator, denominator in sum(RATIO_TABLES, []):
        if numerator is None:  # looksam5_ideal/base, beside looksam5
            base, floor = times.get("base"), times.get("floor")
            result[name] = (None if base is None or floor is None
                            or times.get("looksam5") is None else
                            (floor + (LOOKSAM_EVERY - 1) * base)
                            / (LOOKSAM_EVERY * base))
            continue
        a, b = times.get(numerator), times.get(denominator)
        result[name] = None if a is None or b is None else a / b
    return result


def _ms(seconds):
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def _ratio(value):
    return "n/a" if value is None else f"{value:.3f}"


def _time_tables(results, measured):
    """The step-time tables, each with the variants it adds."""
    lines, shown = ["Step time (wall, median over rounds of the mean step "
                    "time in a round):", ""], set()
    for columns in TIME_TABLES:
        columns = [v for v in columns if v in measured]
        if not set(columns) - shown:  # Nothing new (an older results file).
            continue
        shown.update(columns)
        lines += ["| model | width | params | XLA | " + " | ".join(columns)
                  + " |", "|---|---|---|---|" + "---|" * len(columns)]
        for r in results:
            times = r["median_step_seconds"]
            lines.append(
                f"| {r['architecture']} | {r['width']} | {r['params']:,} | "
                f"{'on' if r['jit'] else 'off'} | "
                + " | ".join(_ms(times.get(v)) for v in columns) + " |")
        lines.append("")
    return lines


def _ratio_tables(results):
    """The ratio tables, wall and (if recorded) CPU time."""
    lines = []
    for key, title in [("ratios", "Ratios of wall time:"),
                       ("cpu_ratios", "Ratios of process CPU time (all "
                                      "threads; less sensitive to other "
                                      "processes on the cores):")]:
        if not any(key in r for r in results):
            continue  # An older results file: no CPU times.
        lines += [title, ""]
        for table in RATIO_TABLES:
            names = [n for n, _, _ in table
                     if any(r[key].get(n) is not None for r in results)]
            if not names:
                continue
            lines += ["| model | width | XLA | " + " | ".join(names) + " |",
                      "|---|---|---|" + "---|" * len(names)]
            for r in results:
                lines.append(
                    f"| {r['architecture']} | {r['width']} | "
                    f"{'on' if r['jit'] else 'off'} | "
                    + " | ".join(_ratio(r[key].get(n)) for n in names)
                    + " |")
            lines.append("")
    return lines


def _footer(report, measured):
    results = report["results"]
    versions = report["versions"]
    arguments = report["arguments"]
    backend = versions.get("backend", "tensorflow")
    engine = (f"TensorFlow {versions['tensorflow']}" if backend == "tensorflow"
              else f"{BACKEND_NAMES[backend]} {versions[backend]} (Keras "
              f"backend {backend}; " + "; ".join(
                  f"XLA {'on' if jit else 'off'}: {compile_mode(backend, jit)}"
                  for jit in sorted({r["jit"] for r in results})) + ")")
    footer = (f"{engine}, Keras "
              f"{versions['keras']}, {report['machine']['cpu_count']} CPU "
              f"cores, commit {harness.commit_of(report)[:10]}"
              + (" with uncommitted library changes"
                 if harness.library_changes_of(report) else "") + ", "
              f"{arguments['rounds']} rounds of {arguments['steps']} steps")
    if "asam_split_b" in measured and "split_b_steps" in arguments:
        footer += f" ({arguments['split_b_steps']} for asam_split_b)"
    footer += f", batch {arguments['batch_size']}"
    if report.get("wall_seconds") is not None:
        footer += f", {report['wall_seconds'] / 60:.1f} minutes in all"
    loads = [r["load_average"] for r in results if "load_average" in r]
    if loads:
        footer += (", 1-minute load average "
                   f"{min(min(pair) for pair in loads):.1f}-"
                   f"{max(max(pair) for pair in loads):.1f} during the run")
    return footer + "."


def render_markdown(report):
    """Markdown tables of a results report (as written to the JSON)."""
    results = report["results"]
    measured = [v for v in VARIANTS
                if any(v in r["median_step_seconds"] for r in results)]
    lines = _time_tables(results, measured) + _ratio_tables(results)
    notes = sorted({f"{v}: {reason}" for r in results
                    for v, reason in r.get("skipped", {}).items()})
    if notes:
        lines += ["n/a: " + "; ".join(notes) + ".", ""]
    lines.append(_footer(report, measured))
    return "\n".join(lines) + "\n"


BACKEND_NAMES = {"tensorflow": "TensorFlow", "jax": "JAX",
                 "torch": "PyTorch"}


def compile_mode(backend, jit):
    """How a backend's train function is compiled for `jit_compile=jit`."""
    if backend == "tensorflow":
        return "tf.function with XLA" if jit else "tf.function (graph)"
    if backend == "jax":
        return "jax.jit (XLA)" if jit else "eager (no jax.jit)"
    return "torch.compile" if jit else "eager"


def _backends_footer(combined):
    """One line per backend's run, then the machine and commit."""
    lines = []
    for backend, report in combined["backends"].items():
        if "results" not in report:
            lines.append(f"- {backend}: failed ({report.get('error')}).")
            continue
        versions, arguments = report["versions"], report["arguments"]
        loads = [x for r in report["results"] for x in r["load_average"]]
        lines.append(
            f"- {backend}: {BACKEND_NAMES[backend]} {versions[backend]}, "
            f"Keras {versions['keras']}, {arguments['rounds']} rounds of "
            f"{arguments['steps']} steps, batch {arguments['batch_size']}, "
            f"{report['wall_seconds'] / 60:.1f} minutes, 1-minute load "
            f"average {min(loads):.1f}-{max(loads):.1f}.")
    any_report = next(iter(combined["backends"].values()))
    lines.append(
        f"\n{combined['machine']['cpu_count']} CPU cores, commit "
        f"{harness.commit_of(combined)[:10]}"
        + (" with uncommitted library changes"
           if harness.library_changes_of(combined) else "")
        + f", {combined['wall_seconds'] / 60:.1f} minutes in all; one "
        "process per backend, run one after the other"
        + (f" (Python {any_report['versions']['python']})"
           if "versions" in any_report else "") + ".")
    return lines


def render_backends(combined):
    """Markdown tables comparing the backends (`--backends`)."""
    rows = []  # (architecture, width, backend, jit, result)
    for backend, report in combined["backends"].items():
        for r in report.get("results", []):
            rows.append((r["architecture"], r["width"], backend, r["jit"], r))
    rows.sort(key=lambda row: (row[0], row[1], BACKENDS.index(row[2]),
                               row[3]))
    variants = [v for v in VARIANTS if any(
        row[4]["median_step_seconds"].get(v) is not None for row in rows)]
    names = [("floor/base", "floor", "base"), ("sam/floor", "sam", "floor"),
             ("asam/floor", "asam", "floor")]
    lines = ["Step time in ms (wall; process CPU time of all threads in "
             "parentheses), median over rounds of the mean step time in a "
             "round:", "",
             "| model | width | backend | compiled as | "
             + " | ".join(variants) + " |",
             "|---|---|---|---|" + "---|" * len(variants)]
    for architecture, width, backend, jit, r in rows:
        wall, cpu = r["median_step_seconds"], r["median_step_cpu_seconds"]
        cells = ["n/a" if wall.get(v) is None else
                 f"{1000 * wall[v]:.1f} ({1000 * cpu[v]:.1f})"
                 for v in variants]
        lines.append(f"| {architecture} | {width} | {backend} | "
                     f"{compile_mode(backend, jit)} | " + " | ".join(cells)
                     + " |")
    lines += ["", "Ratios, wall / process CPU time (targets: sam/floor and "
              "asam/floor <= 1.03):", "",
              "| model | width | backend | compiled as | "
              + " | ".join(n for n, _, _ in names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for architecture, width, backend, jit, r in rows:
        cells = [f"{_ratio(r['ratios'].get(n))} / "
                 f"{_ratio(r['cpu_ratios'].get(n))}" for n, _, _ in names]
        lines.append(f"| {architecture} | {width} | {backend} | "
                     f"{compile_mode(backend, jit)} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    notes = sorted({f"{v} on {row[2]}: {reason}" for row in rows
                    for v, reason in row[4].get("skipped", {}).items()})
    if notes:
        lines += ["n/a: " + "; ".join(notes) + ".", ""]
    lines += _backends_footer(combined)
    return "\n".join(lines) + "\n"


def run_backends(args):
    """`--backends`: one child process per backend, then one table."""
    output = args.output or harness.results_path("step_time_backends")
    passed = ["--rounds", args.rounds, "--steps", args.steps,
              "--split-b-steps", args.split_b_steps,
              "--batch-size", args.batch_size, "--jit", args.jit,
              "--architectures", *args.architectures,
              "--widths", *args.widths,
              "--variants", *args.variants] + (["--quick"] * args.quick)
    combined = {**harness.provenance(args), "backends": {}}
    start = time.perf_counter()
    stem = os.path.splitext(output)[0]
    for backend in args.backends:
        child_output = f"{stem}.{backend}.json"
        command = harness.module_command("step_time", "--backend", backend,
                                         "--output", child_output, *passed)
        print("$", " ".join(command[1:]), flush=True)
        done = subprocess.run(command, cwd=harness.ROOT, env=dict(
            os.environ, KERAS_BACKEND=backend))
        combined["backends"][backend] = (
            harness.load(child_output) if done.returncode == 0
            else {"error": f"exit status {done.returncode}"})
    combined["wall_seconds"] = time.perf_counter() - start
    text = render_backends(combined)
    print()
    print(text)
    harness.write_results(combined, output, text)


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10,
                        help="steps per variant per round (a multiple of 10)")
    parser.add_argument("--split-b-steps", type=int, default=2,
                        help="steps per round of asam_split_b (1-SAM: "
                             "batch-size sequential parts per step)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architectures", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="default: 1 2 (with --backends: 1)")
    parser.add_argument("--jit", choices=["off", "on", "both", "auto"],
                        default="auto",
                        help="jit_compile off, on or both; auto (default): "
                             "both on TensorFlow, on for JAX (jax.jit), "
                             "off for PyTorch (eager)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=None, metavar="VARIANT",
                        help="measure only these (default: all of "
                             + ", ".join(VARIANTS) + "; with --backends: "
                             + " ".join(BACKEND_VARIANTS) + ")")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="the Keras backend to measure on (sets "
                             "KERAS_BACKEND; default: the current one)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS,
                        default=None, metavar="BACKEND",
                        help="measure on each of these backends (one process "
                             "each) and write one table comparing them "
                             "(default widths: 1)")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, CNN and MLP at width 1, no XLA on "
                             "TensorFlow")
    parser.add_argument("--output", default=None,
                        help="results JSON (default: results/step_time.json"
                             ", with --backends results/"
                             "step_time_backends.json)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only print the Markdown tables of a results "
                             "JSON")
    return parser


def parse_args(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:  # No XLA on TensorFlow (the auto mode below).
        args.rounds, args.widths = 3, [1]
    if args.widths is None:
        args.widths = [1] if args.backends else [1, 2]
    if args.variants is None:
        args.variants = BACKEND_VARIANTS if args.backends else VARIANTS
    args.variants = [v for v in VARIANTS if v in args.variants]
    if args.render or args.backends:
        return args
    backend = keras.backend.backend()
    if args.backend is not None and args.backend != backend:
        parser.error(f"--backend {args.backend}: Keras was imported with the "
                     f"{backend} backend (run this module with -m, or set "
                     "KERAS_BACKEND)")
    args.backend = backend
    if args.jit == "auto":
        args.jit = {"tensorflow": "off" if args.quick else "both",
                    "jax": "on"}.get(backend, "off")
    if backend == "torch" and args.jit != "off":
        parser.error("--jit on: the PyTorch step of ASAMModel runs eagerly "
                     "(it ignores jit_compile); use --jit off on torch")
    args.output = args.output or harness.results_path("step_time")
    return args


def measure_setting(setting, args):
    """The record of one (architecture, width, XLA) setting."""
    architecture, width, jit = setting
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    times, cpu_times, per_round, per_round_cpu, skipped = measure(setting,
                                                                  args)
    result = {
        "architecture": architecture, "width": width, "jit": jit,
        "params": build("base", *setting).count_params(),
        "median_step_seconds": times, "ratios": ratios(times),
        "median_step_cpu_seconds": cpu_times,
        "cpu_ratios": ratios(cpu_times),
        "per_round_seconds": per_round,
        "per_round_cpu_seconds": per_round_cpu,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - start,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    print(f"{architecture} width {width} XLA {'on' if jit else 'off'} "
          f"({result['wall_seconds']:.0f} s): "
          + ", ".join(f"{v} {_ms(t)}" for v, t in times.items()), flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        report = harness.load(args.render)
        print(render_backends(report) if "backends" in report
              else render_markdown(report), end="")
        return
    if args.backends:
        return run_backends(args)
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    # Parts of one example with BatchNorm: the library says what happens
    # (once per trace); timing is all that is measured here.
    warnings.filterwarnings("ignore", message=r"`num_batch_splits=")
    # The library as imported, when the run starts (the tree may change
    # while this runs).
    record = harness.provenance(args)
    start = time.perf_counter()
    results = [measure_setting((architecture, width, jit), args)
               for architecture in args.architectures
               for width in args.widths for jit in jits]
    report = {**record, "wall_seconds": time.perf_counter() - start,
              "results": results}
    markdown_text = render_markdown(report)
    print()
    print(markdown_text)
    harness.write_results(report, args.output, markdown_text)


if __name__ == "__main__":
    main()
