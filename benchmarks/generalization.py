"""What ASAM buys: test accuracy under label noise, against the base optimizer.

SAM-type methods show their largest gains when part of the training labels
are wrong (Foret et al., 2021; Baek et al., ICLR 2024): the base optimizer
memorizes the wrong labels late in training, and the perturbed gradient
resists that. ASAM's own claim (Kwon et al., 2021) is that its adaptive
radius lets it use a larger rho than SAM and makes it less sensitive to rho.
This script measures both at CPU scale, on two data sets that ship offline:

  digits   scikit-learn's embedded 8x8 handwritten digits (1,797 images): a
           fixed stratified 25% test split (450), the other 1,347 for
           training and validation. Model: an MLP 64-128-128-10 with
           LayerNormalization after each hidden Dense layer (26k weights).
  mnist1d  MNIST-1D (Greydanus, 2020; `pip install mnist1d`), generated
           locally from the package's templates with its default arguments
           (signals of length 40, its own 4,000/1,000 split); the pool is the
           first 2,000 training signals, the test set all 1,000. Nothing is
           downloaded: the generator runs with network connections refused.
           Model: a 1-D CNN, Conv1D(32, 5, stride 2) and Dense(64), each
           followed by LayerNormalization and ReLU (43k weights).

Symmetric label noise at 0, 20, 40 and 60% on the training labels only: that
fraction of the pool (train + validation) gets a label drawn uniformly from
the nine *other* classes. The corrupted examples of a lower level are a
subset of those of a higher level (same seed). 20% of the noisy pool is held
out for validation (noisy labels, as a user would have); the test labels are
clean.

Methods: one recipe for all (architecture, 30 epochs, batch 128, SGD with
momentum 0.9 and decoupled weight decay 5e-4, learning rate 0.05 with cosine
decay to 0), nothing tuned per method:

  base      a plain `keras.Model`: the base optimizer alone
  sam       `SAMModel`, rho 0.05 (the official CIFAR-10 value)
  asam      `ASAMModel`, rho 0.5 (the official CIFAR-10 value)
  gsam      `ASAMModel(gsam_alpha=0.1)`: the GSAM descent direction on ASAM
  asam_m32  `ASAMModel(num_batch_splits=4)`: m-sharpness, each part of 32
            examples perturbs along its own gradient
  asam_on   `ASAMModel(perturb="normalization")`: SAM-ON, only the
            LayerNormalization scales and offsets are perturbed

The ASAM variants use ASAM's rho 0.5 (the SAM-ON paper tunes a separate,
larger rho for normalization-only perturbations; GSAM's alpha is untuned).
LayerNormalization rather than BatchNormalization: it has no batch
statistics, so neither m-sharpness (each part of a batch would be normalized
with its own statistics) nor train/test mode differences enter the
comparison. 1-SAM (one example per part) is left out: it is a sequential loop
over the batch, far beyond the time budget. Steps are compiled with XLA
(the same maths), except m-sharpness, which does not support it.

Every cell is run with 5 seeds; a seed fixes the label noise, the validation
split, the initial weights (identical for every method) and the batch order.
Each run records, per epoch, train loss/accuracy (on the noisy labels),
validation and test loss/accuracy. Reported: the test accuracy at the epoch
of best validation accuracy (the early stopping a user could do) and at the
final epoch, as mean +/- sample std over seeds, and the paired difference
method - base over seeds with a 95% t-interval.

A rho sweep at 40% noise compares ASAM (rho 0.01-2) and SAM (rho 0.001-0.2)
on log grids that hold the papers' values. The main table uses the papers'
rho, not the sweep's choice; the rho that validation accuracy would choose is
reported next to the sweep.

    python -m benchmarks.generalization          # 28 minutes, 2 busy cores
    python -m benchmarks.generalization --quick  # smoke run, 1.5-3 minutes
    python -m benchmarks.generalization --render \
        benchmarks/results/generalization.json  # redraw tables and PNGs

The full run is 320 trainings, 23 CPU minutes: 28 minutes of wall time on 2
cores that other jobs kept busy (load average 5-8), about 15 expected on idle
ones. `--quick` is about 110 CPU seconds. The runs are shared between this
process and a worker, one CPU thread each (`--jobs`); results do not depend
on the split. Writes generalization.json
(versions, commit, arguments, every run's curves), generalization.md (tables)
and three PNGs to benchmarks/results/ (`--quick`: generalization_quick.*, so
the full run's files are never overwritten). `--quick` only checks that
everything runs: its numbers mean nothing. Equal epochs is not equal
compute: a SAM-type step costs about two base steps (see step_time.py).
"""

import argparse
import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time

# Before TensorFlow is imported: hide its C++ info and warning lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402
import tensorflow as tf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_asam  # noqa: E402
from benchmarks import harness  # noqa: E402

# Symmetric label noise: one definition, shared with the quickstart.
from examples import label_noise  # noqa: E402

ROOT = harness.ROOT
RESULTS_DIR = harness.RESULTS_DIR

# The training recipe, shared by every method: SGD with momentum and weight
# decay, the learning rate decayed to zero over the run by a cosine
# (examples/quickstart.py trains its label-noise run with this recipe).
LEARNING_RATE = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
BATCH_SIZE = {"digits": 128, "mnist1d": 128}
EPOCHS = {"digits": 30, "mnist1d": 30}
# XLA: same maths, about a third less time per step for models this small.
# `num_batch_splits` > 1 does not support it and runs without.
JIT_COMPILE = True
NUM_CLASSES = 10
INPUT_SIZE = {"digits": 64, "mnist1d": 40}
WIDTH = 128

# Data: noise levels, the validation fraction of the (noisy) training pool,
# the digits test fraction and the seeds.
DATASETS = ["digits", "mnist1d"]
NOISE_LEVELS = [0.0, 0.2, 0.4, 0.6]
VALIDATION_FRACTION = 0.2
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0  # Fixes the digits test set across seeds.
SEEDS = [0, 1, 2, 3, 4]

# Methods. rho: the official CIFAR-10 values (README, "Recommended rho");
# the ASAM variants share ASAM's. GSAM_ALPHA is untuned (Zhuang et al. use
# 0.01-0.3). M-sharpness parts have PART_SIZE examples (batch / PART_SIZE
# splits).
SAM_RHO = 0.05
ASAM_RHO = 0.5
GSAM_ALPHA = 0.1
PART_SIZE = 32
M_SHARPNESS = f"asam_m{PART_SIZE}"
METHODS = ["base", "sam", "asam", "gsam", M_SHARPNESS, "asam_on"]
LABELS = {
    "base": "base (SGD)",
    "sam": f"SAM rho {SAM_RHO}",
    "asam": f"ASAM rho {ASAM_RHO}",
    "gsam": f"GSAM (ASAM, alpha {GSAM_ALPHA})",
    M_SHARPNESS: f"ASAM m-sharpness ({PART_SIZE}/part)",
    "asam_on": "ASAM-ON (normalization only)",
}

# The rho sweep: one noise level; for both methods the same multiples
# (1/25, 1/5, 1, 4, 20) of its paper value, so the widths of the two curves
# compare. Its runs at SAM_RHO / ASAM_RHO are the main grid's.
SWEEP_NOISE = 0.4
SWEEP_RHOS = {"asam": [0.02, 0.1, 0.5, 2.0, 10.0],
              "sam": [0.002, 0.01, 0.05, 0.2, 1.0]}

# Parallel workers (--jobs), and the relative cost of a run, used only to
# give the workers about equal shares.
JOBS = 2
DATASET_COST = {"digits": 1.0, "mnist1d": 2.8}
METHOD_COST = {"base": 1.0, "sam": 1.5, "asam": 1.5, "gsam": 1.5,
               M_SHARPNESS: 3.0, "asam_on": 1.5}

# --quick: a smoke run of every code path, on a subsample of the data,
# without XLA (compiling costs more than it saves in 2 epochs).
QUICK = dict(epochs=2, seeds=[0, 1], noise_levels=[0.0, 0.6],
             sweep_rhos={"asam": [0.1, ASAM_RHO], "sam": [0.01, SAM_RHO]},
             max_train=512, sweep_noise=0.6, jit_compile=False)


# -- data ---------------------------------------------------------------


@contextlib.contextmanager
def network_refused():
    """Makes any network connection inside the block raise: proof that a
    data set is built locally and not downloaded."""
    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted while building data")

    saved = (socket.socket.connect, socket.create_connection,
             socket.getaddrinfo)
    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    try:
        yield
    finally:
        (socket.socket.connect, socket.create_connection,
         socket.getaddrinfo) = saved


def mnist1d_available():
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        return False
    return True


def load_pool_and_test(name):
    """(x_pool, y_pool, x_test, y_test): the training pool (to be split into
    train and validation) and the clean test set, float32 / int32."""
    if name == "digits":
        digits = load_digits()
        x = (digits.data / 16.0).astype("float32")
        y = digits.target.astype("int32")
        x_pool, x_test, y_pool, y_test = train_test_split(
            x, y, test_size=DIGITS_TEST_FRACTION, stratify=y,
            random_state=DIGITS_SPLIT_SEED)
        return x_pool, y_pool, x_test, y_test
    if name == "mnist1d":
        import matplotlib
        matplotlib.use("Agg")  # mnist1d imports pyplot.
        from mnist1d.data import get_dataset_args, make_dataset

        # `make_dataset` builds the signals from the templates (seed 42 in
        # the default arguments); `get_dataset` would download the pickle.
        with network_refused():
            data = make_dataset(get_dataset_args())
        return (data["x"].astype("float32"), data["y"].astype("int32"),
                data["x_test"].astype("float32"),
                data["y_test"].astype("int32"))
    raise ValueError(f"unknown data set {name!r}")


# -- models -------------------------------------------------------------


def build_network(name):
    """The one architecture of both data sets, an MLP with two hidden
    layers of WIDTH units, each followed by LayerNormalization and ReLU;
    logits out."""
    inputs = keras.Input((INPUT_SIZE[name],))
    h = inputs
    for _ in range(2):
        h = keras.layers.Dense(WIDTH)(h)
        h = keras.layers.LayerNormalization()(h)
        h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(NUM_CLASSES)(h)
    return keras.Model(inputs, outputs, name=f"{name}_mlp")


def method_kwargs(method, batch_size):
    """`ASAMModel` arguments of a method (None: the plain base model)."""
    return {
        "base": None,
        "sam": dict(adaptive=False, rho=SAM_RHO),
        "asam": dict(rho=ASAM_RHO),
        "gsam": dict(rho=ASAM_RHO, gsam_alpha=GSAM_ALPHA),
        M_SHARPNESS: dict(rho=ASAM_RHO, num_batch_splits=max(
            1, batch_size // PART_SIZE)),
        "asam_on": dict(rho=ASAM_RHO, perturb="normalization"),
    }[method]


class HeldOutAccuracy(keras.callbacks.Callback):
    """Adds the validation and test loss and accuracy to each epoch's logs
    (`val_*`, `test_*`), so `fit`'s History records them per epoch.

    One traced forward pass over validation and test set together:
    `fit(validation_data=)` and `evaluate` rebuild a dataset and an iterator
    on every call, which costs more than the evaluation itself here."""

    def __init__(self, evaluate, x_val, y_val, x_test, y_test):
        super().__init__()
        self.evaluate = evaluate
        self.x = tf.constant(np.concatenate([x_val, x_test]))
        self.y = tf.constant(np.concatenate([y_val, y_test]), "int64")
        self.parts = {"val": slice(0, len(y_val)),
                      "test": slice(len(y_val), None)}

    def on_epoch_end(self, epoch, logs=None):
        losses, hits = (keras.ops.convert_to_numpy(t)
                        for t in self.evaluate(self.x, self.y))
        for prefix, part in self.parts.items():
            logs[f"{prefix}_loss"] = float(np.mean(losses[part]))
            logs[f"{prefix}_accuracy"] = float(np.mean(hits[part]))


def evaluation(network):
    """Loss and hits of `network` per example (inference mode), traced
    once."""

    @tf.function
    def evaluate(x, y):
        logits = network(x, training=False)
        loss = keras.losses.sparse_categorical_crossentropy(
            y, logits, from_logits=True)
        hits = keras.ops.equal(keras.ops.argmax(logits, axis=-1), y)
        return loss, keras.ops.cast(hits, "float32")

    return evaluate


class Trainer:
    """One compiled model per (data set, method), reused for every seed,
    noise level and rho, so the training step is traced once.

    Before each run the network's weights are set to the seed's initial
    weights (the same for every method), the optimizer's variables
    (iteration counter, momentum) to their values before the first step, and
    `rho` through `model.rho` (a variable: no retracing). A run therefore
    equals a run of a freshly built and compiled model."""

    def __init__(self, dataset, method, steps_per_epoch, epochs,
                 jit_compile):
        self.network = build_network(dataset)
        kwargs = method_kwargs(method, BATCH_SIZE[dataset])
        self.model = (self.network if kwargs is None
                      else keras_asam.ASAMModel(self.network, **kwargs))
        schedule = keras.optimizers.schedules.CosineDecay(
            LEARNING_RATE, decay_steps=steps_per_epoch * epochs)
        self.model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=MOMENTUM,
                                           weight_decay=WEIGHT_DECAY),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=jit_compile and (kwargs or {}).get(
                "num_batch_splits", 1) == 1)
        self.model.optimizer.build(self.model.trainable_variables)
        self.optimizer_start = [keras.ops.convert_to_numpy(v)
                                for v in self.model.optimizer.variables]
        self.evaluate = evaluation(self.network)

    def run(self, initial_weights, seed, data, epochs, batch_size, rho=None):
        """Trains from `initial_weights`; returns the per-epoch curves."""
        self.network.set_weights(initial_weights)
        for variable, value in zip(self.model.optimizer.variables,
                                   self.optimizer_start):
            variable.assign(value)
        if rho is not None:
            self.model.rho = rho
        x_train, y_train, x_val, y_val, x_test, y_test = data
        keras.utils.set_random_seed(seed)
        # The seed fixes the batch order, reshuffled every epoch.
        batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)) \
            .shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True) \
            .batch(batch_size).prefetch(1)
        held_out = HeldOutAccuracy(self.evaluate, x_val, y_val, x_test,
                                   y_test)
        history = self.model.fit(batches, epochs=epochs, verbose=0,
                                 shuffle=False, callbacks=[held_out])
        keys = ["loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
                "test_accuracy", "sharpness"]
        # Six decimals: float32 noise beyond that only bloats the JSON.
        return {k: [round(float(v), 6) for v in history.history[k]]
                for k in keys if k in history.history}


def initial_weights(dataset, seed):
    """The seed's initial weights of the data set's network."""
    keras.utils.set_random_seed(seed)
    return build_network(dataset).get_weights()


# -- statistics ---------------------------------------------------------


def summarize_run(curves):
    """Test accuracy at the best validation epoch (first maximum) and at the
    final epoch."""
    best = int(np.argmax(curves["val_accuracy"]))
    return dict(best_epoch=best + 1,
                best_val_accuracy=curves["val_accuracy"][best],
                test_at_best_val=curves["test_accuracy"][best],
                test_final=curves["test_accuracy"][-1],
                train_accuracy_final=curves["accuracy"][-1])


def mean_std(values):
    values = np.asarray(values, dtype=float)
    std = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return float(values.mean()), std


def paired_interval(a, b):
    """Mean of a - b over paired seeds and its 95% t-interval half-width."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan")
    half = (scipy.stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1)
            / np.sqrt(len(d)))
    return float(d.mean()), float(half)


# -- the experiment -----------------------------------------------------


def plan(args):
    """The runs to do, one dict per run: the grid, then the sweep's runs
    that the grid does not already hold."""
    tasks, seen = [], set()
    for dataset in args.datasets:
        cells = [(noise, method, None) for noise in args.noise_levels
                 for method in args.methods]
        if args.sweep_noise is not None:
            cells += [(args.sweep_noise, method, rho)
                      for method, rhos in args.sweep_rhos.items()
                      if method in args.methods for rho in rhos]
        for noise, method, rho in cells:
            kwargs = method_kwargs(method, BATCH_SIZE[dataset])
            if kwargs is not None and rho is None:
                rho = kwargs["rho"]
            for seed in args.seeds:
                key = (dataset, noise, method, rho, seed)
                if key not in seen:
                    seen.add(key)
                    tasks.append(dict(dataset=dataset, noise=noise,
                                      method=method, rho=rho, seed=seed))
    return tasks


def run_tasks(tasks, epochs_by_dataset, max_train, jit_compile, prefix=""):
    """Runs `tasks` in this process, in order; returns their records."""
    runs, data_sets, trainers, starts = [], {}, {}, {}
    started = time.time()
    for task in tasks:
        dataset, noise, method, rho, seed = (
            task["dataset"], task["noise"], task["method"], task["rho"],
            task["seed"])
        epochs = epochs_by_dataset[dataset]
        batch_size = BATCH_SIZE[dataset]
        if dataset not in data_sets:
            x_pool, y_pool, x_test, y_test = load_pool_and_test(dataset)
            if max_train:
                x_pool, y_pool = x_pool[:max_train], y_pool[:max_train]
            data_sets[dataset] = x_pool, y_pool, x_test, y_test
        x_pool, y_pool, x_test, y_test = data_sets[dataset]
        train, val, labels = label_noise.noisy_split(
            y_pool, noise, seed, num_classes=NUM_CLASSES,
            validation_fraction=VALIDATION_FRACTION)
        data = (x_pool[train], labels[train], x_pool[val], labels[val],
                x_test, y_test)
        if (dataset, seed) not in starts:
            starts[dataset, seed] = initial_weights(dataset, seed)
        if (dataset, method) not in trainers:
            steps = -(-len(train) // batch_size)
            trainers[dataset, method] = Trainer(dataset, method, steps,
                                                epochs, jit_compile)
        tic, cpu = time.time(), time.process_time()
        curves = trainers[dataset, method].run(
            starts[dataset, seed], seed, data, epochs, batch_size, rho=rho)
        run = dict(task, epochs=epochs, batch_size=batch_size,
                   n_train=len(train), n_val=len(val), n_test=len(y_test),
                   seconds=round(time.time() - tic, 2),
                   cpu_seconds=round(time.process_time() - cpu, 2),
                   noisy_train_fraction=float(
                       np.mean(labels[train] != y_pool[train])),
                   curves=curves)
        run.update(summarize_run(curves))
        runs.append(run)
        print(f"{prefix}{dataset:8s} noise {noise:.1f} {method:9s} rho "
              f"{rho if rho is not None else '-':<6} seed {seed}: test "
              f"{run['test_at_best_val']:.4f} at best val (epoch "
              f"{run['best_epoch']:2d}), {run['test_final']:.4f} final; "
              f"{run['seconds']:.1f} s [{(time.time() - started) / 60:.1f} "
              "min]", flush=True)
    return runs


def assign(tasks, jobs):
    """Splits the tasks into `jobs` lists of about equal cost, keeping each
    (data set, method) in one list (one trace per model). Longest group
    first, each to the least loaded list."""
    groups = {}
    for task in tasks:
        groups.setdefault((task["dataset"], task["method"]), []).append(task)
    loads = [[0.0, []] for _ in range(jobs)]
    for (dataset, method), group in sorted(
            groups.items(), key=lambda kv: -len(kv[1]) * DATASET_COST[kv[0][0]]
            * METHOD_COST[kv[0][1]]):
        lightest = min(loads, key=lambda load: load[0])
        lightest[0] += (len(group) * DATASET_COST[dataset]
                        * METHOD_COST[method])
        lightest[1] += group
    return [tasks for _, tasks in loads if tasks]


def experiment(args):
    """Runs every task in `args.jobs` processes of one CPU thread each: this
    one and `args.jobs - 1` workers (`--jobs 1`: this process alone, with
    TensorFlow's default threads). Returns the run records in plan order."""
    tasks = plan(args)
    epochs = {d: args.epochs or EPOCHS[d] for d in args.datasets}
    print(f"{len(tasks)} runs; epochs {epochs}; {args.jobs} job(s)",
          flush=True)
    if args.jobs == 1:
        return run_tasks(tasks, epochs, args.max_train, args.jit_compile)
    # Small models train faster side by side on one core each than one after
    # the other on all cores: at this size TensorFlow's threads mostly wait
    # for each other.
    own, *parts = assign(tasks, args.jobs)
    runs = run_with_workers(
        "generalization", parts,
        lambda i, part: dict(tasks=part, epochs=epochs,
                             max_train=args.max_train,
                             jit_compile=args.jit_compile,
                             prefix=f"[{i}] "),
        lambda: run_tasks(own, epochs, args.max_train, args.jit_compile,
                          prefix="[0] "))
    order = {run_key(t): i for i, t in enumerate(tasks)}
    return sorted(runs, key=lambda r: order[run_key(r)])


def run_with_workers(name, parts, job, run_own):
    """Runs each non-empty `parts[i - 1]` in a worker process of
    `benchmarks.<name>` (`python -m benchmarks.<name> --worker PATH`, PATH
    holding `job(i, part)`, the worker writing
    its runs back under "runs") while `run_own()` runs here, one thread
    each; returns `run_own()`'s runs followed by the workers'."""
    # The thread counts must be set before TensorFlow runs its first
    # operation.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1",
               TF_NUM_INTEROP_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        workers = []
        for i, part in enumerate(parts, start=1):
            if not part:
                continue
            path = os.path.join(tmp, f"worker{i}.json")
            with open(path, "w") as f:
                json.dump(job(i, part), f)
            workers.append((path, subprocess.Popen(
                harness.module_command(name, "--worker", path),
                env=env, cwd=ROOT)))
        try:
            runs = run_own()
        finally:
            for path, process in workers:
                if process.wait() != 0:
                    raise RuntimeError(f"worker {path} failed with exit "
                                       f"code {process.returncode}")
        for path, _ in workers:
            with open(path) as f:
                runs += json.load(f)["runs"]
    return runs


def run_key(run):
    return tuple(run[k] for k in ("dataset", "noise", "method", "rho",
                                  "seed"))


def worker(path):
    """`--worker PATH`: runs the tasks in PATH and writes the runs back."""
    with open(path) as f:
        job = json.load(f)
    runs = run_tasks(job["tasks"], job["epochs"], job["max_train"],
                     job["jit_compile"], job["prefix"])
    job["runs"] = runs
    with open(path, "w") as f:
        json.dump(job, f)


def cell_runs(runs, dataset, noise, method, rho="default"):
    """Runs of one cell, sorted by seed. rho="default": the method's own."""
    if rho == "default":
        kwargs = method_kwargs(method, BATCH_SIZE[dataset])
        rho = None if kwargs is None else kwargs["rho"]
    found = [r for r in runs if (r["dataset"], r["noise"], r["method"],
                                 r["rho"]) == (dataset, noise, method, rho)]
    return sorted(found, key=lambda r: r["seed"])


def summary(runs):
    """Per cell: mean/std of the two test accuracies, and the paired
    difference to base with its 95% t-interval (in accuracy units)."""
    cells = []
    datasets = sorted({r["dataset"] for r in runs}, key=_order(DATASETS))
    for dataset in datasets:
        noises = sorted({r["noise"] for r in runs if r["dataset"] == dataset})
        methods = sorted({r["method"] for r in runs
                          if r["dataset"] == dataset}, key=_order(METHODS))
        for noise in noises:
            base = {r["seed"]: r for r in cell_runs(runs, dataset, noise,
                                                    "base")}
            for method in methods:
                found = cell_runs(runs, dataset, noise, method)
                if not found:
                    continue
                cell = dict(dataset=dataset, noise=noise, method=method,
                            rho=found[0]["rho"],
                            seeds=[r["seed"] for r in found])
                for metric in ("test_at_best_val", "test_final",
                               "train_accuracy_final"):
                    cell[metric] = mean_std([r[metric] for r in found])
                paired = [r for r in found if r["seed"] in base]
                if method != "base" and paired:
                    for metric in ("test_at_best_val", "test_final"):
                        cell[f"{metric}_minus_base"] = paired_interval(
                            [r[metric] for r in paired],
                            [base[r["seed"]][metric] for r in paired])
                cell["seconds_per_run"] = float(np.mean(
                    [r["seconds"] for r in found]))
                cells.append(cell)
    return cells


def sweep_summary(runs, sweep_noise, sweep_rhos):
    """Per data set and method: mean/std test accuracy (both epochs) and the
    mean best validation accuracy for every rho of the sweep, and the rho
    that validation accuracy alone would choose."""
    out = []
    for dataset in sorted({r["dataset"] for r in runs}, key=_order(DATASETS)):
        for method, rhos in sweep_rhos.items():
            points = []
            for rho in rhos:
                found = cell_runs(runs, dataset, sweep_noise, method, rho)
                if not found:
                    continue
                points.append(dict(
                    rho=rho, seeds=[r["seed"] for r in found],
                    val=mean_std([r["best_val_accuracy"] for r in found]),
                    test_at_best_val=mean_std(
                        [r["test_at_best_val"] for r in found]),
                    test_final=mean_std([r["test_final"] for r in found])))
            if not points:
                continue
            chosen = max(points, key=lambda p: p["val"][0])
            out.append(dict(dataset=dataset, method=method, noise=sweep_noise,
                            points=points, rho_by_validation=chosen["rho"]))
    return out


def _order(reference):
    return lambda x: reference.index(x) if x in reference else len(reference)


# -- reporting ----------------------------------------------------------


def percent(pair, signed=False):
    mean, spread = pair
    sign = "+" if signed else ""
    if np.isnan(spread):
        return f"{100 * mean:{sign}.2f}"
    return f"{100 * mean:{sign}.2f} +/- {100 * spread:.2f}"


def markdown(results):
    """The tables of generalization.md."""
    cells, sweep = results["summary"], results["sweep"]
    lines = []
    for dataset in sorted({c["dataset"] for c in cells}, key=_order(DATASETS)):
        rows = [c for c in cells if c["dataset"] == dataset]
        n = len(rows[0]["seeds"])
        epochs = next(r["epochs"] for r in results["runs"]
                      if r["dataset"] == dataset)
        lines += [f"### {dataset} ({epochs} epochs, {n} seeds)", "",
                  "Test accuracy % (clean test labels): mean +/- sample std "
                  "over seeds; method - base: mean paired difference over "
                  "seeds +/- 95% t-interval half-width, in points. rho: the "
                  "papers' CIFAR-10 values at every noise level (not the "
                  "sweep's choice). Train accuracy: final epoch, on the "
                  "noisy training labels.", "",
                  "| noise | method | rho | at best val epoch | final epoch "
                  "| best val - base | final - base | train acc (noisy) |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in rows:
            diff = [percent(c[f"{m}_minus_base"], signed=True)
                    if f"{m}_minus_base" in c else "-"
                    for m in ("test_at_best_val", "test_final")]
            lines.append(
                f"| {100 * c['noise']:.0f}% | {c['method']} | "
                f"{c['rho'] if c['rho'] is not None else '-'} | "
                f"{percent(c['test_at_best_val'])} | "
                f"{percent(c['test_final'])} | {diff[0]} | {diff[1]} | "
                f"{percent(c['train_accuracy_final'])} |")
        lines.append("")
    if sweep:
        lines += [f"### rho sweep at {100 * sweep[0]['noise']:.0f}% noise",
                  "", "Test accuracy % at the best validation epoch (mean "
                  "+/- std over seeds), and in brackets the mean best "
                  "validation accuracy (noisy labels); `*` marks the rho "
                  "with the highest one, the choice a user could make "
                  "without the test set.", "",
                  "| data | method | rho: test (validation) |",
                  "|---|---|---|"]
        for s in sweep:
            entries = [
                f"{p['rho']}{'*' * (p['rho'] == s['rho_by_validation'])}: "
                f"{percent(p['test_at_best_val'])} "
                f"({100 * p['val'][0]:.1f})" for p in s["points"]]
            lines.append(f"| {s['dataset']} | {s['method']} | "
                         + "; ".join(entries) + " |")
        lines.append("")
    meta = results["meta"]
    lines.append(
        f"TensorFlow {meta['versions']['tensorflow']}, Keras "
        f"{meta['versions']['keras']}, {harness.cpu_count_of(meta)} CPU "
        f"cores, commit {harness.commit_of(meta)[:10]}"
        f"{' (dirty)' if harness.dirty_of(meta) else ''}"
        f"; {meta['minutes']:.1f} minutes, of which "
        f"{meta.get('cpu_minutes_in_runs', float('nan')):.1f} CPU minutes in "
        "training runs"
        + (" (1-minute load average {start:.1f} at the start, {end:.1f} at "
           "the end)".format(**meta["load_average_1min"])
           if "load_average_1min" in meta else "") + ".")
    return "\n".join(lines) + "\n"


def _save(plt, fig, path):
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _accuracy_figure(plt, results, path_stem, context):
    """Test accuracy against noise, mean +/- std over seeds."""
    cells, datasets, methods, colors, metrics = (
        context[k] for k in ("cells", "datasets", "methods", "colors",
                             "metrics"))
    fig, axes = plt.subplots(2, len(datasets), squeeze=False,
                             figsize=(5.5 * len(datasets), 8))
    for j, dataset in enumerate(datasets):
        for i, (metric, title) in enumerate(metrics):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                rows = [c for c in cells if (c["dataset"], c["method"]) ==
                        (dataset, method)]
                x = [100 * c["noise"] + (k - len(methods) / 2) * 0.6
                     for c in rows]
                ax.errorbar(x, [100 * c[metric][0] for c in rows],
                            yerr=[100 * np.nan_to_num(c[metric][1])
                                  for c in rows],
                            marker="o", ms=4, capsize=3, lw=1.2,
                            color=colors[method], label=LABELS[method])
            ax.set_title(f"{dataset}: test accuracy {title}", fontsize=10)
            ax.set_xlabel("training labels corrupted (%)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    n = len(cells[0]["seeds"])
    fig.suptitle("Test accuracy under symmetric label noise (mean; error "
                 f"bars: sample std over {n} seeds)", fontsize=11)
    fig.tight_layout()
    return _save(plt, fig, f"{path_stem}.png")



def _diff_figure(plt, results, path_stem, context):
    """Paired difference to base, with 95% t-intervals."""
    cells, datasets, methods, colors, metrics = (
        context[k] for k in ("cells", "datasets", "methods", "colors",
                             "metrics"))
    n = len(cells[0]["seeds"])
    fig, axes = plt.subplots(2, len(datasets), squeeze=False,
                             figsize=(5.5 * len(datasets), 8))
    others = [m for m in methods if m != "base"]
    for j, dataset in enumerate(datasets):
        for i, (metric, title) in enumerate(metrics):
            ax = axes[i][j]
            ax.axhline(0, color="black", lw=0.8)
            for k, method in enumerate(others):
                rows = [c for c in cells if (c["dataset"], c["method"]) ==
                        (dataset, method) and f"{metric}_minus_base" in c]
                x = [100 * c["noise"] + (k - (len(others) - 1) / 2) * 1.2
                     for c in rows]
                ax.errorbar(x, [100 * c[f"{metric}_minus_base"][0]
                                for c in rows],
                            yerr=[100 * np.nan_to_num(
                                c[f"{metric}_minus_base"][1]) for c in rows],
                            fmt="o", ms=4, capsize=3, color=colors[method],
                            label=LABELS[method])
            ax.set_title(f"{dataset}: method - base, {title}", fontsize=10)
            ax.set_xlabel("training labels corrupted (%)")
            ax.set_ylabel("test accuracy difference (points)")
            ax.set_xticks([100 * x for x in sorted({c["noise"]
                                                    for c in cells})])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gain over the base optimizer: mean paired difference over "
                 f"{n} seeds; error bars: 95% t-interval", fontsize=11)
    fig.tight_layout()
    return _save(plt, fig, f"{path_stem}_diff.png")



def _rho_figure(plt, results, path_stem, context):
    """The rho sweep."""
    cells, datasets, methods, colors, metrics = (
        context[k] for k in ("cells", "datasets", "methods", "colors",
                             "metrics"))
    sweep, n = results["sweep"], len(cells[0]["seeds"])
    fig, axes = plt.subplots(2, len(datasets), squeeze=False,
                             figsize=(5.5 * len(datasets), 8))
    noise = sweep[0]["noise"]
    for j, dataset in enumerate(datasets):
        base = cell_runs(results["runs"], dataset, noise, "base")
        for i, (metric, title) in enumerate(metrics):
            ax = axes[i][j]
            if base:
                mean, std = mean_std([r[metric] for r in base])
                ax.axhline(100 * mean, color=colors["base"], lw=1.2,
                           label=f"{LABELS['base']} (band: +/- std)")
                if not np.isnan(std):
                    ax.axhspan(100 * (mean - std), 100 * (mean + std),
                               color=colors["base"], alpha=0.12)
            for s in sweep:
                if s["dataset"] != dataset:
                    continue
                rhos = [p["rho"] for p in s["points"]]
                ax.errorbar(rhos, [100 * p[metric][0]
                                   for p in s["points"]],
                            yerr=[100 * np.nan_to_num(p[metric][1])
                                  for p in s["points"]],
                            marker="o", ms=4, capsize=3,
                            color=colors[s["method"]],
                            label=f"{s['method'].upper()} (rho by "
                                  f"validation: {s['rho_by_validation']})")
                paper = SAM_RHO if s["method"] == "sam" else ASAM_RHO
                ax.axvline(paper, color=colors[s["method"]], ls=":",
                           lw=1)
            ax.set_xscale("log")
            ax.set_title(f"{dataset}, {100 * noise:.0f}% noise: test "
                         f"accuracy {title}", fontsize=10)
            ax.set_xlabel("rho (log scale; dotted: paper's CIFAR-10 "
                          "value)")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle(f"rho sweep (mean; error bars: sample std over {n} "
                 "seeds)", fontsize=11)
    fig.tight_layout()
    return _save(plt, fig, f"{path_stem}_rho.png")


def plot(results, path_stem):
    """Three PNGs: accuracy against noise, paired difference to base
    against noise, test accuracy against rho."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, sweep = results["summary"], results["sweep"]
    datasets = sorted({c["dataset"] for c in cells}, key=_order(DATASETS))
    methods = sorted({c["method"] for c in cells}, key=_order(METHODS))
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()[
        "color"]))
    metrics = [("test_at_best_val", "at the best-validation epoch"),
               ("test_final", "at the final epoch")]
    context = dict(cells=cells, datasets=datasets, methods=methods,
                   colors=colors, metrics=metrics)
    figures = [_accuracy_figure, _diff_figure] + ([_rho_figure] if sweep
                                                  else [])
    return [figure(plt, results, path_stem, context) for figure in figures]


def print_tables(results):
    print()
    print(markdown(results))


# -- bookkeeping --------------------------------------------------------


def metadata(args, minutes, runs, record):
    """The run's provenance (`record`, taken at the start) with the
    recipe's constants and the time it took."""
    return dict(
        **record,
        constants=dict(learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                       weight_decay=WEIGHT_DECAY, batch_size=BATCH_SIZE,
                       validation_fraction=VALIDATION_FRACTION,
                       sam_rho=SAM_RHO, asam_rho=ASAM_RHO,
                       gsam_alpha=GSAM_ALPHA, part_size=PART_SIZE,
                       schedule="cosine decay to 0, per step"),
        minutes=minutes,
        cpu_minutes_in_runs=sum(r["cpu_seconds"] for r in runs) / 60)


def provenance(args):
    return harness.provenance(args, extra_versions=("scikit-learn",
                                                    "mnist1d"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 epochs, 2 seeds, noise 0 and "
                             "60%%, 2 rho per sweep, 512 pool examples")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS,
                        default=None, help="default: both (digits only if "
                        "mnist1d is not installed)")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=METHODS, help="default: all")
    parser.add_argument("--noise-levels", nargs="+", type=float,
                        default=None, help=f"default {NOISE_LEVELS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"default {SEEDS}")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"for every data set (default {EPOCHS})")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use only the first N examples of the pool")
    parser.add_argument("--sweep-noise", type=float, default=None,
                        help=f"noise level of the rho sweep (default "
                             f"{SWEEP_NOISE})")
    parser.add_argument("--no-sweep", action="store_true",
                        help="skip the rho sweep")
    parser.add_argument("--no-jit", action="store_true",
                        help="compile the steps without XLA")
    parser.add_argument("--jobs", type=int, default=JOBS,
                        help=f"processes, one CPU thread each (default "
                             f"{JOBS}; 1: train in this process with "
                             "TensorFlow's default threads)")
    parser.add_argument("--output-dir", default=RESULTS_DIR,
                        help="default: benchmarks/results")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON",
                        help="only redraw the tables and PNGs of a results "
                             "JSON next to it")
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    if args.datasets is None:
        args.datasets = [d for d in DATASETS
                         if d != "mnist1d" or mnist1d_available()]
    elif "mnist1d" in args.datasets and not mnist1d_available():
        parser.error("mnist1d is not installed: pip install mnist1d")
    args.noise_levels = (args.noise_levels
                         or quick.get("noise_levels", NOISE_LEVELS))
    args.seeds = args.seeds or quick.get("seeds", SEEDS)
    args.epochs = args.epochs or quick.get("epochs")
    args.max_train = args.max_train or quick.get("max_train")
    args.sweep_rhos = quick.get("sweep_rhos", SWEEP_RHOS)
    args.jit_compile = (not args.no_jit) and quick.get("jit_compile",
                                                       JIT_COMPILE)
    if args.no_sweep:
        args.sweep_noise = None
    elif args.sweep_noise is None:
        args.sweep_noise = quick.get("sweep_noise", SWEEP_NOISE)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        stem = os.path.splitext(args.render)[0]
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        stem = os.path.join(args.output_dir, "generalization_quick"
                            if args.quick else "generalization")
        tic, record, load = time.time(), provenance(args), os.getloadavg()[0]
        runs = experiment(args)
        minutes = (time.time() - tic) / 60
        results = dict(meta=metadata(args, minutes, runs, record), runs=runs)
        # How busy the machine was: the wall time depends on it.
        results["meta"]["load_average_1min"] = dict(
            start=load, end=os.getloadavg()[0])
        results["summary"] = summary(runs)
        results["sweep"] = (sweep_summary(runs, args.sweep_noise,
                                          args.sweep_rhos)
                            if args.sweep_noise is not None else [])
        harness.dump_json(results, f"{stem}.json", compact_key="runs")
    with open(f"{stem}.md", "w") as f:
        f.write(markdown(results))
    paths = [f"{stem}.md", *plot(results, stem)]
    print_tables(results)
    print("wrote", ", ".join(paths if args.render else [f"{stem}.json",
                                                        *paths]))


if __name__ == "__main__":
    main()
