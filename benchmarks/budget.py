"""At equal cost: what a time budget buys with each method.

SAM-type methods take two forward-and-backward passes per step. At equal
epochs they gain under label noise (`generalization.py`), but equal epochs
is not equal cost. This script trains every method of the SAM family that
keras_asam offers, the cheap schedules included, under two budgets, and
reports what each buys per measured second.

Data, network, recipe, splits, label noise and seeds are those of
`generalization.py` (imported, not copied): scikit-learn's digits and
MNIST-1D, at 0% and 40% symmetric label noise; the MLP with
LayerNormalization; SGD with momentum 0.9, decoupled weight decay 5e-4,
learning rate 0.05 with cosine decay to 0 over each run's own length,
batch 128; XLA; 5 seeds, a seed fixing the noise, the validation split, the
initial weights (the same for every method) and the batch order.

Methods, with the passes per step the issue counts as their cost:

  base         a plain `keras.Model`: the base optimizer alone           1
  sam          `SAMModel`, rho 0.05                                      2
  asam         `ASAMModel`, rho 0.5                                      2
  asam_every2  ASAM, `asam_every=2`                                      1.5
  asam_every5  ASAM, `asam_every=5`                                      1.2
  asam_p05     ASAM, `asam_probability=0.5`                              1.5
  looksam5     ASAM, `variants.LookSAM(0.7)`, `asam_every=5` (k = 5)     1.2
  gsam         ASAM, `variants.GSAM(0.1)` (generalization.py's alpha)    2
  fsam         ASAM, `variants.FriendlySAM(sigma=1.0, lmbda=0.9)`        2
  wsam         ASAM, `variants.WSAM(gamma=0.9, decouple=True)`           2
  msam         `SAMModel`, rho 3, `variants.MomentumSAM(0.9)`            1
  saf          `variants.SAF(lmbda=0.3)` on `keras_asam.indexed` inputs  1
  mesa         `variants.MESA(lmbda=0.8)`                                1.33
  aesam        ASAM, `variants.AESAM(total_steps, delta=0.9)`            1.5*
  ema          base, its weight EMA evaluated (momentum 0.99)            1

rho: the generalization benchmark's (SAM 0.05, ASAM and its variants 0.5);
Momentum-SAM rho 3 without the adaptive scaling, its paper's value. The
draws of `asam_probability` come from the model's fixed `asam_seed`, the
same for every seed of the benchmark (their measured fraction is recorded).

SAF, MESA and AE-SAM decide in the graph; the share of steps that took the
perturbed pass is measured (the model's `perturbed_steps` log, mean over
epochs) and recorded as each run's `perturbed_fraction`: 0 for SAF and
MESA. *AE-SAM's 1.5 is nominal (its threshold c_t falls from lambda2 = 1
to lambda1 = -1, about half the steps for a normal gradient norm): it sets
the equal-passes epochs; the tables show 1 + the measured share next to
it. MESA's teacher is a forward pass without backward, counted as a third
of a pass (the measured CPU seconds per epoch are in the tables). Their
settings, scaled to these short runs (the reference recipes train CIFAR
for 200 epochs): temperature 5; SAF's term from an example's visit
`start + 1` on, lag 3, MESA's from step `start x steps per epoch`, with
`start` the reference code's 5 epochs, or a sixth of the run when that is
shorter (at least 1; the lag then the start: `--quick`); MESA's decay such
that the average's horizon 1 / (1 - decay) is the paper's share of the run
(5000 of 200 x 391 steps, 6.4%: 0.941 for digits' 270 steps, 0.979 for
MNIST-1D's 750); AE-SAM's `total_steps` the run's steps, lambda1 -1,
lambda2 1, its perturbed pass ASAM's (rho 0.5). Each run records the
values it used under `config`. All networks end in logits (no softmax),
every method's loss `from_logits=True`, as before the new methods.

The EMA control: a plain `keras.Model` whose SGD keeps an average of the
weights (`use_ema=True, ema_momentum=0.99`, Keras's default; the average
starts at the weights after the first update). Training is base's own,
step for step (the same curves of training loss); what is evaluated each
epoch is the average, copied at the epoch's end into a second network of
the same architecture that the validation and test evaluation reads. It
is the control for "SAF and MESA gain partly by averaging or
self-distillation": a gain over base that the EMA control matches is not
sharpness-awareness. It is not a point-4 candidate.

Budgets:

  epochs   equal epochs: E = 30 for every method.
  passes   equal passes: what base spends in 2E epochs, i.e. 2E / (passes per
           step) epochs: base 60, the two-pass methods 30 (their equal-epochs
           runs, reused), the 1.5-pass ones (AE-SAM too) 40, the 1.2-pass
           ones 50, MESA 45, Momentum-SAM, SAF and the EMA control 60.

Each run's learning-rate schedule spans its own length.

Measured cost: process CPU seconds of the training epochs (the fit loop
over the batches; the per-epoch evaluation on the validation and test sets
is not counted), one CPU thread per process. The first epoch is dominated
by tracing and XLA compilation: it is not measured but counted at the
median of the run's other epochs, and so is any later epoch above three
times that median (a new batch shape or step kind compiled there for the
first time); the run's `training_seconds` is the sum. Raw per-epoch CPU and
wall seconds are kept in the JSON.

Reported, per data set, noise level, method and budget: test accuracy at
the best-validation epoch (first maximum; the validation labels are noisy,
as a user's) and at the final epoch, mean +/- sample std over seeds; the
paired difference to base at the same budget, mean over seeds +/- 95%
t-interval half-width. Time to accuracy: for each seed the training seconds
until a run's validation accuracy first reaches the best validation
accuracy of base's equal-epochs run of that seed, the median over seeds (a
seed that never reaches it counts as infinitely slow: "never" when most
do not). The question of issue 19, point 4: at 40% noise, under equal
epochs, is there a method of at most 1.25 passes per step (asam_every5,
looksam5, msam, saf) whose mean gain over base is at least 0.7 x ASAM's while
its own 95% t-interval excludes zero? Answered per data set, at the
best-validation epoch and at the final epoch; "undetermined" when ASAM's own
interval includes zero.

Settings chosen honestly (`--select`; `selection.py`). The defaults above
are the papers' or the issue's values, not tuned here. With `--select`,
each method's knob is first chosen per data set and noise level on the
VALIDATION split, at equal epochs (E), with selection seeds 100 and 101,
which the report never uses: the value of highest best validation
accuracy (the maximum over epochs), mean over the two seeds, ties to the
default. The selection runs' test accuracy is not recorded. Then the
report seeds (0-4, fresh) are trained with the chosen values under both
budgets and reported on TEST as above. Grids (the default in each):

  sam                  rho         0.02, 0.05, 0.1
  asam, asam_every2,   rho         0.2, 0.5, 1.0
  asam_every5, asam_p05
  looksam5             alpha       0.1, 0.3, 0.7
  gsam                 alpha       0.02, 0.1, 0.3
  fsam                 lambda      0.6, 0.9, 0.95
  wsam                 gamma       0.8, 0.9, 0.95
  msam                 rho         0.3, 1.0, 3.0
  saf                  lambda      0.1, 0.3, 1.0
  mesa                 lambda      0.3, 0.8, 2.0
  aesam                delta       0.5, 0.9, 0.99
  ema                  momentum    0.9, 0.97, 0.99
  base                 (none: the shared recipe is not tuned)

AE-SAM's knob is delta, not lambda1/lambda2: those set the share of
perturbed steps, i.e. the cost, and validation accuracy at equal epochs
would favour the costliest. The results keep every grid value's validation
scores per selection seed, the chosen values and the defaults
(`selection` in the JSON); the tables name each method's chosen value and
list the choice next to the default. `--quick --select`: 1 selection seed
(100), each grid's smallest and largest value, E = 2.

    python -m benchmarks.budget            # the full run (see README.md)
    python -m benchmarks.budget --quick    # smoke run, about a minute
    python -m benchmarks.budget --select   # selection, then the report
    python -m benchmarks.budget --quick --select  # its smoke run
    python -m benchmarks.budget --render benchmarks/results/budget.json

Writes budget.json (versions, commit, arguments, load average, every run's
curves), budget.md (tables) and budget_frontier.png to benchmarks/results/
(`--quick`: budget_quick.*; `--select`: budget_selected[_quick].*). While
it runs, each process appends its finished runs to
budget_partial_<i>.jsonl there (the selection's to
budget_selected_selection_partial_<i>.jsonl); `--resume` skips the runs
those files hold, and they are removed once the results are written.
"""

import argparse
import glob
import json
import os
import time

# Before TensorFlow is imported: hide its C++ info and warning lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_asam  # noqa: E402
from benchmarks import generalization as g  # noqa: E402
from benchmarks import harness, selection  # noqa: E402
from keras_asam import second_pass, variants  # noqa: E402

ROOT = g.ROOT
RESULTS_DIR = g.RESULTS_DIR

EPOCHS = 30  # E, the equal-epochs budget (generalization.py's).
DATASETS = ["digits", "mnist1d"]
NOISE_LEVELS = [0.0, 0.4]
SEEDS = list(g.SEEDS)
BUDGETS = ["epochs", "passes"]
POINT4_NOISE = 0.4
POINT4_MAX_PASSES = 1.25
POINT4_SHARE = 0.7

LOOKSAM_ALPHA = 0.7
FSAM_SIGMA, FSAM_LMBDA = 1.0, 0.9
WSAM_GAMMA = 0.9
MSAM_RHO, MSAM_MOMENTUM = 3.0, 0.9
SAF_LMBDA, SAF_LAG, SAF_START = 0.3, 3, 5  # SAF's defaults (CIFAR)
MESA_LMBDA = 0.8  # MESA's default
DISTILL_TEMPERATURE = 5.0  # both
MESA_HORIZON_SHARE = 5000 / 78200  # 1 / (1 - 0.9998) of 200 x 391 steps
AESAM_DELTA, AESAM_LAMBDA1, AESAM_LAMBDA2 = 0.9, -1.0, 1.0  # AESAM's
EMA_MOMENTUM = 0.99  # Keras's default `ema_momentum`

METHODS = ["base", "sam", "asam", "asam_every2", "asam_every5", "asam_p05",
           "looksam5", "gsam", "fsam", "wsam", "msam", "saf", "mesa",
           "aesam", "ema"]
PASSES = {"base": 1.0, "sam": 2.0, "asam": 2.0, "asam_every2": 1.5,
          "asam_every5": 1.2, "asam_p05": 1.5, "looksam5": 1.2, "gsam": 2.0,
          "fsam": 2.0, "wsam": 2.0, "msam": 1.0, "saf": 1.0, "mesa": 1.33,
          "aesam": 1.5, "ema": 1.0}
# Passes per step beyond 1 + the share of perturbed steps: MESA's teacher,
# a forward pass without backward, counted as a third of a pass.
TEACHER_PASSES = {"mesa": 1 / 3}
# Point 4's candidates: the SAM family's methods of at most 1.25 passes
# (the EMA control is not one).
CONTROLS = ["ema"]
LABELS = {
    "base": "base (SGD)",
    "sam": f"SAM rho {g.SAM_RHO}",
    "asam": f"ASAM rho {g.ASAM_RHO}",
    "asam_every2": "ASAM every 2",
    "asam_every5": "ASAM every 5",
    "asam_p05": "ASAM p 0.5",
    "looksam5": f"LookSAM k 5 alpha {LOOKSAM_ALPHA}",
    "gsam": f"GSAM alpha {g.GSAM_ALPHA}",
    "fsam": f"F-SAM sigma {FSAM_SIGMA} lambda {FSAM_LMBDA}",
    "wsam": f"WSAM gamma {WSAM_GAMMA} decoupled",
    "msam": f"Momentum-SAM rho {MSAM_RHO}",
    "saf": f"SAF lambda {SAF_LMBDA}",
    "mesa": f"MESA lambda {MESA_LMBDA}",
    "aesam": f"AE-SAM (ASAM rho {g.ASAM_RHO}) delta {AESAM_DELTA}",
    "ema": f"base, weight EMA momentum {EMA_MOMENTUM} evaluated",
}
SHORT = {"base": "base", "sam": "SAM", "asam": "ASAM",
         "asam_every2": "every2", "asam_every5": "every5",
         "asam_p05": "p0.5", "looksam5": "LookSAM", "gsam": "GSAM",
         "fsam": "F-SAM", "wsam": "WSAM", "msam": "MSAM", "saf": "SAF",
         "mesa": "MESA", "aesam": "AE-SAM", "ema": "EMA"}

JOBS = 2
# Relative CPU cost of an epoch, only to share the work between processes.
DATASET_COST = {"digits": 1.0, "mnist1d": 2.8}
# An epoch above this many times the run's median (epochs 2..N) is taken to
# hold a compilation (a new batch shape or step kind) and counted at the
# median.
SPIKE = 3.0

QUICK = dict(epochs=2, seeds=[0, 1], noise_levels=[0.4],
             datasets=["digits"],
             methods=["base", "asam", "asam_p05", "looksam5", "msam", "saf",
                      "mesa", "aesam", "ema"],
             max_train=512, jit_compile=False)


# -- methods and budgets -------------------------------------------------


def method_kwargs(method, setting=None, shape=None):
    """`ASAMModel` arguments of a method (None: a plain `keras.Model`).
    `setting`: the method's knob (`selection.KNOBS`), else its default;
    `shape`: the run's n_train, steps_per_epoch and epochs, which SAF,
    MESA and AE-SAM need."""
    knob = dict(setting or {})
    rho = knob.get("rho")
    asam = dict(rho=g.ASAM_RHO if rho is None else rho)
    if method in ("saf", "mesa", "aesam"):
        return dict(asam, variant=distilling_variant(method, knob, shape))
    table = {
        "base": None,
        "ema": None,
        "sam": dict(adaptive=False, rho=g.SAM_RHO if rho is None else rho),
        "asam": asam,
        "asam_every2": dict(asam, asam_every=2),
        "asam_every5": dict(asam, asam_every=5),
        "asam_p05": dict(asam, asam_probability=0.5),
        "looksam5": dict(asam, asam_every=5, variant=variants.LookSAM(
            knob.get("alpha", LOOKSAM_ALPHA))),
        "gsam": dict(asam, variant=variants.GSAM(
            knob.get("alpha", g.GSAM_ALPHA))),
        "fsam": dict(asam, variant=variants.FriendlySAM(
            sigma=FSAM_SIGMA, lmbda=knob.get("lmbda", FSAM_LMBDA))),
        "wsam": dict(asam, variant=variants.WSAM(
            gamma=knob.get("gamma", WSAM_GAMMA), decouple=True)),
        "msam": dict(adaptive=False, rho=MSAM_RHO if rho is None else rho,
                     variant=variants.MomentumSAM(MSAM_MOMENTUM)),
    }
    return table[method]


def start_epochs(epochs):
    """Epochs before SAF's and MESA's terms apply: the reference code's 5,
    or a sixth of the run when that is shorter (at least 1)."""
    return min(SAF_START, max(1, epochs // 6))


def mesa_decay(total_steps):
    """MESA's decay: an average whose horizon 1 / (1 - decay) is the same
    share of the run as the paper's (5000 of 78,200 steps), at least 2."""
    return 1.0 - 1.0 / max(2, round(MESA_HORIZON_SHARE * total_steps))


def variant_config(method, knob, shape):
    """The arguments of SAF, MESA or AE-SAM for a run of `shape`."""
    steps = shape["steps_per_epoch"] * shape["epochs"]
    start = start_epochs(shape["epochs"])
    if method == "saf":
        return dict(num_examples=shape["n_train"], num_classes=g.NUM_CLASSES,
                    lmbda=knob.get("lmbda", SAF_LMBDA),
                    temperature=DISTILL_TEMPERATURE,
                    lag=min(SAF_LAG, start), start=start)
    if method == "mesa":
        return dict(lmbda=knob.get("lmbda", MESA_LMBDA),
                    temperature=DISTILL_TEMPERATURE,
                    decay=mesa_decay(steps),
                    start=start * shape["steps_per_epoch"])
    return dict(total_steps=steps, delta=knob.get("delta", AESAM_DELTA),
                lambda1=AESAM_LAMBDA1, lambda2=AESAM_LAMBDA2)


def distilling_variant(method, knob, shape):
    cls = {"saf": variants.SAF, "mesa": variants.MESA,
           "aesam": variants.AESAM}[method]
    return cls(**variant_config(method, knob, shape))


def ema_momentum(setting=None):
    return (setting or {}).get("momentum", EMA_MOMENTUM)


def knob_defaults():
    """Each method's knob at its default (`selection.KNOBS`)."""
    return dict(sam=g.SAM_RHO, asam=g.ASAM_RHO, asam_every2=g.ASAM_RHO,
                asam_every5=g.ASAM_RHO, asam_p05=g.ASAM_RHO,
                looksam5=LOOKSAM_ALPHA, gsam=g.GSAM_ALPHA, fsam=FSAM_LMBDA,
                wsam=WSAM_GAMMA, msam=MSAM_RHO, saf=SAF_LMBDA,
                mesa=MESA_LMBDA, aesam=AESAM_DELTA, ema=EMA_MOMENTUM)


def apply_settings(settings):
    """Sets LookSAM's alpha and Momentum-SAM's rho (`--looksam-alpha`,
    `--msam-rho`; the issue's values by default), here and in a worker."""
    global LOOKSAM_ALPHA, MSAM_RHO
    LOOKSAM_ALPHA = settings.get("looksam_alpha", LOOKSAM_ALPHA)
    MSAM_RHO = settings.get("msam_rho", MSAM_RHO)
    LABELS["looksam5"] = f"LookSAM k 5 alpha {LOOKSAM_ALPHA}"
    LABELS["msam"] = f"Momentum-SAM rho {MSAM_RHO}"


def measured_passes(method, fraction):
    """Passes per step from the measured share of perturbed steps."""
    return 1.0 + fraction + TEACHER_PASSES.get(method, 0.0)


def budget_epochs(method, budget, epochs):
    """Epochs of `method` under `budget` when equal epochs means `epochs`."""
    if budget == "epochs":
        return epochs
    return int(round(2 * epochs / PASSES[method]))


def perturbed_fraction(method, steps):
    """The fraction of `steps` steps (from 0) that take the perturbed pass:
    the model's own host-side choice, with its default seed. None for
    the methods that decide in the graph (SAF, MESA, AE-SAM): their share
    is measured, the model's `perturbed_steps` log."""
    if method in ("saf", "mesa", "aesam"):
        return None
    kwargs = method_kwargs(method)
    if kwargs is None or method == "msam":
        return 0.0
    every = kwargs.get("asam_every", 1)
    probability = kwargs.get("asam_probability", 1.0)
    return float(np.mean([second_pass.perturb_on_host(
        step, every=every, probability=probability)
        for step in range(steps)]))


# -- training -------------------------------------------------------------


class EpochClock(keras.callbacks.Callback):
    """Per epoch, the process CPU and wall seconds of the training loop.
    Listed before the evaluation callback, so it is not counted."""

    def on_epoch_begin(self, epoch, logs=None):
        self.cpu, self.wall = time.process_time(), time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs["cpu_seconds"] = time.process_time() - self.cpu
        logs["wall_seconds"] = time.time() - self.wall


class EmaWeights(keras.callbacks.Callback):
    """The EMA control's evaluation: at each epoch's end, copies the
    optimizer's average of the weights (`use_ema`) into `held_out`, a
    second network of the same architecture that the evaluation reads. The
    trained network is not touched, so training is base's own; Keras swaps
    the average into it only after the last epoch
    (`finalize_variable_values`), which the next run's reset undoes.
    Listed after EpochClock: not counted in the training seconds."""

    def __init__(self, optimizer, held_out):
        super().__init__()
        self.optimizer, self.held_out = optimizer, held_out

    def on_epoch_end(self, epoch, logs=None):
        # The averages, in the order of the trainable variables they were
        # built for (what `finalize_variable_values` assigns from).
        averages = self.optimizer._model_variables_moving_average
        targets = self.held_out.trainable_variables
        assert len(averages) == len(targets)
        for target, average in zip(targets, averages):
            target.assign(average)


class Trainer(g.Trainer):
    """generalization.Trainer with this benchmark's methods: one compiled
    model per (data set, method, epochs, setting), reused for every seed
    and noise level. Before each run every variable of the model (weights,
    rho, the step counter the schedules follow, the variant's state) and
    of the optimizer (the EMA control's average too) is set back to its
    value before the first step, then the weights to the seed's initial
    ones. SAF trains on `keras_asam.indexed` inputs; the EMA control is
    evaluated on its average (EmaWeights)."""

    def __init__(self, dataset, method, shape, jit_compile, setting=None):
        self.network = g.build_network(dataset)
        self.shape = shape
        self.config = (
            variant_config(method, setting or {}, shape)
            if method in ("saf", "mesa", "aesam")
            else dict(ema_momentum=ema_momentum(setting))
            if method == "ema" else {})
        self.indexed = method == "saf"
        kwargs = method_kwargs(method, setting, shape)
        self.model = (self.network if kwargs is None
                      else keras_asam.ASAMModel(self.network, **kwargs))
        schedule = keras.optimizers.schedules.CosineDecay(
            g.LEARNING_RATE,
            decay_steps=shape["steps_per_epoch"] * shape["epochs"])
        ema = (dict(use_ema=True, ema_momentum=ema_momentum(setting))
               if method == "ema" else {})
        self.model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=g.MOMENTUM,
                                           weight_decay=g.WEIGHT_DECAY,
                                           **ema),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"], jit_compile=jit_compile)
        self.model.optimizer.build(self.model.trainable_variables)
        self.optimizer_start = [keras.ops.convert_to_numpy(v)
                                for v in self.model.optimizer.variables]
        self.model_start = [keras.ops.convert_to_numpy(v)
                            for v in self.model.variables]
        self.held_out = (g.build_network(dataset) if method == "ema"
                         else self.network)
        self.evaluate = g.evaluation(self.held_out)

    def run(self, initial_weights, seed, data, epochs, batch_size):
        """Trains from `initial_weights`; returns the per-epoch curves,
        with each epoch's CPU and wall seconds (and the share of perturbed
        steps, where the model logs it)."""
        for variable, value in zip(self.model.variables, self.model_start):
            variable.assign(value)
        for variable, value in zip(self.model.optimizer.variables,
                                   self.optimizer_start):
            variable.assign(value)
        self.network.set_weights(initial_weights)
        x_train, y_train, x_val, y_val, x_test, y_test = data
        if self.indexed:
            x_train = keras_asam.indexed(x_train)
        keras.utils.set_random_seed(seed)
        batches = tf.data.Dataset.from_tensor_slices((x_train, y_train)) \
            .shuffle(len(y_train), seed=seed, reshuffle_each_iteration=True) \
            .batch(batch_size).prefetch(1)
        callbacks = [EpochClock()]
        if self.held_out is not self.network:
            callbacks.append(EmaWeights(self.model.optimizer, self.held_out))
        callbacks.append(g.HeldOutAccuracy(self.evaluate, x_val, y_val,
                                           x_test, y_test))
        history = self.model.fit(batches, epochs=epochs, verbose=0,
                                 shuffle=False, callbacks=callbacks)
        keys = ["loss", "accuracy", "val_loss", "val_accuracy", "test_loss",
                "test_accuracy", "cpu_seconds", "wall_seconds",
                "perturbed_steps"]
        return {k: [round(float(v), 6) for v in history.history[k]]
                for k in keys if k in history.history}


def epoch_seconds(cpu):
    """Per-epoch training seconds of a run: measured from the second epoch
    on; the first epoch, and any epoch above SPIKE times the median of
    epochs 2..N, counted at that median. Returns (seconds, replaced)."""
    cpu = list(cpu)
    steady = cpu[1:] if len(cpu) > 1 else cpu
    median = float(np.median(steady))
    out, replaced = [], []
    for i, value in enumerate(cpu):
        if i == 0 or value > SPIKE * median:
            out.append(median)
            if i > 0:
                replaced.append(i + 1)
        else:
            out.append(value)
    return out, replaced


def summarize_run(curves):
    out = g.summarize_run(curves)
    seconds, replaced = epoch_seconds(curves["cpu_seconds"])
    out.update(training_seconds=round(float(np.sum(seconds)), 3),
               cpu_seconds_from_epoch2=round(float(np.sum(
                   curves["cpu_seconds"][1:])), 3),
               epochs_counted_at_median=replaced,
               elapsed_seconds=[round(float(s), 3)
                                for s in np.cumsum(seconds)])
    return out


def plan(args, chosen=None):
    """The runs, one dict per run; a run serves each budget whose epochs it
    has (the two-pass methods' equal-epochs runs serve both). `chosen`:
    (data set, noise, method) -> setting (`--select`), else defaults."""
    tasks = []
    for dataset in args.datasets:
        budgets = [b for b in args.budgets
                   if b != "passes" or dataset in args.passes_datasets]
        for noise in args.noise_levels:
            for method in args.methods:
                by_epochs = {}
                for budget in budgets:
                    by_epochs.setdefault(budget_epochs(
                        method, budget, args.epochs), []).append(budget)
                setting = (chosen or {}).get((dataset, noise, method), {})
                for epochs, served in by_epochs.items():
                    for seed in args.seeds:
                        tasks.append(dict(dataset=dataset, noise=noise,
                                          method=method, epochs=epochs,
                                          budgets=served, seed=seed,
                                          setting=setting))
    return tasks


def run_key(run):
    return tuple(run[k] for k in ("dataset", "noise", "method", "epochs",
                                  "seed")) + (
        selection.setting_key(run.get("setting")),)


def task_data(task, data_sets, max_train):
    """The task's (train, validation, test) arrays, its noisy labels and
    the split, the pool loaded once per data set."""
    dataset = task["dataset"]
    if dataset not in data_sets:
        x_pool, y_pool, x_test, y_test = g.load_pool_and_test(dataset)
        if max_train:
            x_pool, y_pool = x_pool[:max_train], y_pool[:max_train]
        data_sets[dataset] = x_pool, y_pool, x_test, y_test
    x_pool, y_pool, x_test, y_test = data_sets[dataset]
    train, val, labels = g.label_noise.noisy_split(
        y_pool, task["noise"], task["seed"], num_classes=g.NUM_CLASSES,
        validation_fraction=g.VALIDATION_FRACTION)
    data = (x_pool[train], labels[train], x_pool[val], labels[val],
            x_test, y_test)
    noisy = float(np.mean(labels[train] != y_pool[train]))
    return data, noisy


def run_record(task, trainer, data, noisy, curves, clock):
    """A run's record: the task, its shape, cost and curves, summarized."""
    x_train, _, _, y_val, _, y_test = data
    steps, epochs = trainer.shape["steps_per_epoch"], task["epochs"]
    fraction = perturbed_fraction(task["method"], steps * epochs)
    if "perturbed_steps" in curves:  # measured (equal steps per epoch)
        fraction = float(np.mean(curves["perturbed_steps"]))
    tic, cpu = clock
    run = dict(task, setting=task.get("setting", {}),
               batch_size=g.BATCH_SIZE[task["dataset"]],
               steps_per_epoch=steps, n_train=len(x_train), n_val=len(y_val),
               n_test=len(y_test), passes_per_step=PASSES[task["method"]],
               perturbed_fraction=round(fraction, 4),
               config=trainer.config,
               seconds=round(time.time() - tic, 2),
               cpu_seconds=round(time.process_time() - cpu, 2),
               load_average_1min=os.getloadavg()[0],
               noisy_train_fraction=noisy, curves=curves)
    run.update(summarize_run(curves))
    return run


def run_tasks(tasks, max_train, jit_compile, prefix="", partial=None):
    """Runs `tasks` in this process, in order; returns their records and
    appends each to the file `partial` (JSON lines) as it finishes."""
    runs, data_sets, trainers, starts = [], {}, {}, {}
    started = time.time()
    for count, task in enumerate(tasks, start=1):
        dataset, method, epochs, seed = (
            task["dataset"], task["method"], task["epochs"], task["seed"])
        batch_size = g.BATCH_SIZE[dataset]
        data, noisy = task_data(task, data_sets, max_train)
        if (dataset, seed) not in starts:
            starts[dataset, seed] = g.initial_weights(dataset, seed)
        shape = dict(n_train=len(data[0]), epochs=epochs,
                     steps_per_epoch=-(-len(data[0]) // batch_size))
        key = (dataset, method, epochs, shape["n_train"],
               selection.setting_key(task.get("setting")))
        if key not in trainers:
            trainers[key] = Trainer(dataset, method, shape, jit_compile,
                                    task.get("setting"))
        clock = time.time(), time.process_time()
        curves = trainers[key].run(starts[dataset, seed], seed, data,
                                   epochs, batch_size)
        run = run_record(task, trainers[key], data, noisy, curves, clock)
        runs.append(run)
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps(run, separators=(",", ":")) + "\n")
        # Selection runs show validation accuracy only.
        scores = (f"best val {run['best_val_accuracy']:.4f} (epoch "
                  f"{run['best_epoch']:2d})"
                  if task.get("phase") == "selection" else
                  f"test {run['test_at_best_val']:.4f} at best val (epoch "
                  f"{run['best_epoch']:2d}), {run['test_final']:.4f} final")
        print(f"{prefix}{count}/{len(tasks)} {dataset:7s} noise "
              f"{task['noise']:.1f} {method:11s} {epochs:2d} ep seed {seed}"
              f"{setting_text(task.get('setting'))}: {scores}; "
              f"{run['training_seconds']:.1f} CPU s training, "
              f"{run['seconds']:.1f} s wall; load "
              f"{run['load_average_1min']:.1f} "
              f"[{(time.time() - started) / 60:.1f} min]", flush=True)
    return runs


def setting_text(setting):
    return "".join(f" {k} {v:g}" for k, v in sorted((setting or {}).items()))


def task_cost(task):
    return (DATASET_COST[task["dataset"]] * task["epochs"]
            * PASSES[task["method"]])


def assign(tasks, jobs):
    """Splits the tasks into `jobs` lists of about equal cost, keeping each
    (data set, method, epochs) in one list (one trace per model). Costliest
    group first, each to the least loaded list."""
    groups = {}
    for task in tasks:
        groups.setdefault((task["dataset"], task["method"], task["epochs"],
                           selection.setting_key(task.get("setting"))),
                          []).append(task)
    loads = [[0.0, []] for _ in range(jobs)]
    for group in sorted(groups.values(),
                        key=lambda group: -sum(map(task_cost, group))):
        lightest = min(loads, key=lambda load: load[0])
        lightest[0] += sum(map(task_cost, group))
        lightest[1] += group
    return [tasks for _, tasks in loads]


def settings(args):
    return dict(looksam_alpha=args.looksam_alpha, msam_rho=args.msam_rho)


def experiment(args, stem, tasks):
    """Runs every task (but those `--resume` finds done) in `args.jobs`
    processes of one CPU thread each: this one and `args.jobs - 1` workers;
    each appends its runs to `{stem}_partial_<i>.jsonl`. Returns the run
    records in plan order."""
    partials = sorted(glob.glob(f"{stem}_partial_*.jsonl"))
    done = []
    if args.resume:
        for path in partials:
            with open(path) as f:
                done += [json.loads(line) for line in f if line.strip()]
        wanted = {run_key(t) for t in tasks}
        done = list({run_key(r): r for r in done
                     if run_key(r) in wanted}.values())
    else:
        for path in partials:
            os.remove(path)
    finished = {run_key(r) for r in done}
    todo = [t for t in tasks if run_key(t) not in finished]
    print(f"{len(tasks)} runs ({len(done)} done before), "
          f"{sum(t['epochs'] for t in todo)} epochs to train; "
          f"{args.jobs} job(s)", flush=True)
    own, *parts = assign(todo, args.jobs)
    runs = list(done) + g.run_with_workers(
        "budget", parts,
        lambda i, part: dict(tasks=part, max_train=args.max_train,
                             settings=settings(args),
                             jit_compile=args.jit_compile,
                             prefix=f"[{i}] ",
                             partial=f"{stem}_partial_{i}.jsonl"),
        lambda: run_tasks(own, args.max_train, args.jit_compile,
                          prefix="[0] ",
                          partial=f"{stem}_partial_0.jsonl"))
    order = {run_key(t): i for i, t in enumerate(tasks)}
    return sorted(runs, key=lambda r: order[run_key(r)])


def worker(path):
    """`--worker PATH`: runs the tasks in PATH and writes the runs back."""
    with open(path) as f:
        job = json.load(f)
    apply_settings(job["settings"])
    job["runs"] = run_tasks(job["tasks"], job["max_train"],
                            job["jit_compile"], job["prefix"],
                            job["partial"])
    with open(path, "w") as f:
        json.dump(job, f)


# -- statistics -------------------------------------------------------------


def budget_runs(runs, dataset, noise, method, budget):
    """The runs of one (data set, noise, method, budget), by seed."""
    return sorted([r for r in runs if (r["dataset"], r["noise"],
                                       r["method"]) == (dataset, noise, method)
                   and budget in r["budgets"]], key=lambda r: r["seed"])


def _order(reference):
    return lambda x: reference.index(x) if x in reference else len(reference)


def combos(runs):
    """(data set, noise) pairs present, in order."""
    return sorted({(r["dataset"], r["noise"]) for r in runs},
                  key=lambda c: (_order(DATASETS)(c[0]), c[1]))


def summary(runs):
    """Per (data set, noise, method, budget): mean/std of the accuracies
    and seconds, the paired differences to base at the same budget (95%
    t-interval half-widths) and the time to base's accuracy."""
    cells = []
    for dataset, noise in combos(runs):
        methods = sorted({r["method"] for r in runs
                          if r["dataset"] == dataset}, key=_order(METHODS))
        targets = {r["seed"]: r["best_val_accuracy"] for r in budget_runs(
            runs, dataset, noise, "base", "epochs")}
        for budget in BUDGETS:
            base = {r["seed"]: r for r in budget_runs(
                runs, dataset, noise, "base", budget)}
            for method in methods:
                found = budget_runs(runs, dataset, noise, method, budget)
                if not found:
                    continue
                fraction = float(np.mean([r["perturbed_fraction"]
                                          for r in found]))
                cell = dict(dataset=dataset, noise=noise, method=method,
                            budget=budget, epochs=found[0]["epochs"],
                            setting=found[0].get("setting", {}),
                            passes_per_step=PASSES[method],
                            passes_per_step_measured=measured_passes(
                                method, fraction),
                            seeds=[r["seed"] for r in found])
                for metric in ("test_at_best_val", "test_final",
                               "best_val_accuracy", "train_accuracy_final",
                               "training_seconds", "best_epoch"):
                    cell[metric] = g.mean_std([r[metric] for r in found])
                paired = [r for r in found if r["seed"] in base]
                if method != "base" and paired:
                    for metric in ("test_at_best_val", "test_final"):
                        cell[f"{metric}_minus_base"] = g.paired_interval(
                            [r[metric] for r in paired],
                            [base[r["seed"]][metric] for r in paired])
                    cell["paired_seeds"] = [r["seed"] for r in paired]
                cell["time_to_base_accuracy"] = time_to_accuracy(
                    found, targets)
                cells.append(cell)
    return cells


def time_to_accuracy(found, targets):
    """Seconds until the validation accuracy first reaches the seed's
    target (base's best validation accuracy at equal epochs): per seed
    (None: never), the median over seeds (None: never, when more than half
    never reach it) and how many seeds reach it."""
    per_seed = {}
    for run in found:
        if run["seed"] not in targets:
            continue
        target = targets[run["seed"]]
        reached = [i for i, v in enumerate(run["curves"]["val_accuracy"])
                   if v >= target]
        per_seed[str(run["seed"])] = (
            run["elapsed_seconds"][reached[0]] if reached else None)
    values = [np.inf if v is None else v for v in per_seed.values()]
    median = float(np.median(values)) if values else np.inf
    return dict(per_seed=per_seed,
                median=None if not np.isfinite(median) else median,
                reached=sum(v is not None for v in per_seed.values()),
                seeds=len(per_seed))


def find_cell(cells, dataset, noise, method, budget):
    for cell in cells:
        if (cell["dataset"], cell["noise"], cell["method"],
                cell["budget"]) == (dataset, noise, method, budget):
            return cell
    return None


def point4(cells):
    """Issue 19, point 4, per data set and metric (equal epochs, 40%
    noise): a method of at most 1.25 passes per step whose mean gain is at
    least 0.7 x ASAM's, its own 95% t-interval excluding zero."""
    out = []
    for dataset in sorted({c["dataset"] for c in cells},
                          key=_order(DATASETS)):
        asam = find_cell(cells, dataset, POINT4_NOISE, "asam", "epochs")
        if asam is None or "test_at_best_val_minus_base" not in asam:
            continue
        candidates = [m for m in METHODS if m not in ["base", *CONTROLS]
                      and PASSES[m] <= POINT4_MAX_PASSES]
        for metric in ("test_at_best_val", "test_final"):
            gain, half = asam[f"{metric}_minus_base"]
            entry = dict(dataset=dataset, noise=POINT4_NOISE, metric=metric,
                         seeds=asam["paired_seeds"], asam_gain=[gain, half],
                         threshold=POINT4_SHARE * gain, candidates=[])
            determined = bool(np.isfinite(half) and gain - half > 0)
            qualifying = []
            for method in candidates:
                cell = find_cell(cells, dataset, POINT4_NOISE, method,
                                 "epochs")
                if cell is None or f"{metric}_minus_base" not in cell:
                    continue
                m_gain, m_half = cell[f"{metric}_minus_base"]
                excludes_zero = bool(np.isfinite(m_half) and (
                    m_gain - m_half > 0 or m_gain + m_half < 0))
                qualifies = bool(determined and m_gain >= entry["threshold"]
                                 and excludes_zero)
                entry["candidates"].append(dict(
                    method=method, passes_per_step=PASSES[method],
                    gain=[m_gain, m_half],
                    share_of_asam=(m_gain / gain if gain else None),
                    interval_excludes_zero=excludes_zero,
                    qualifies=qualifies))
                if qualifies:
                    qualifying.append(method)
            entry["qualifying"] = qualifying
            entry["answer"] = ("undetermined" if not determined
                               else "yes" if qualifying else "no")
            out.append(entry)
    return out


# -- reporting ------------------------------------------------------------


def percent(pair, signed=False):
    return g.percent(pair, signed=signed)


def seconds_text(value):
    return "never" if value is None else f"{value:.1f}"


def budget_name(budget, epochs):
    return f"equal {budget} ({epochs} ep)"


DATASET_NAMES = {"digits": "digits", "mnist1d": "MNIST-1D"}


def cost_ratios(runs):
    """(data set, method) -> mean over runs of the training seconds per
    epoch, over base's mean."""
    out = {}
    for dataset in {r["dataset"] for r in runs}:
        per_epoch = {}
        for r in runs:
            if r["dataset"] == dataset:
                per_epoch.setdefault(r["method"], []).append(
                    r["training_seconds"] / r["epochs"])
        base = np.mean(per_epoch["base"])
        for method, values in per_epoch.items():
            out[dataset, method] = float(np.mean(values) / base)
    return out


def summary_table(results, metric="test_at_best_val", budget="passes"):
    """The README's table: per method, its gain over base at `budget` in
    every (data set, noise), base's own accuracy, and the measured CPU
    seconds per epoch relative to base's."""
    cells = results["summary"]
    panels = combos(results["runs"])
    datasets = sorted({d for d, _ in panels}, key=_order(DATASETS))
    ratios = cost_ratios(results["runs"])
    lines = [
        "| method | passes/step | epochs | "
        + " | ".join(f"{DATASET_NAMES[d]} {100 * n:.0f}%" for d, n in panels)
        + " | CPU s/epoch vs base (" + ", ".join(
            DATASET_NAMES[d] for d in datasets) + ") |",
        "|---|---|---|" + "---|" * len(panels) + "---|"]
    methods = sorted({c["method"] for c in cells}, key=_order(METHODS))
    for method in methods:
        found = [find_cell(cells, d, n, method, budget) for d, n in panels]
        if any(c is None for c in found):
            continue
        entries = [
            f"{100 * c[metric][0]:.1f}" if method == "base" else
            "{:+.1f} +/- {:.1f}".format(
                *(100 * v for v in c[f"{metric}_minus_base"]))
            for c in found]
        lines.append(
            f"| {method} | {PASSES[method]:g} | {found[0]['epochs']} | "
            + " | ".join(entries) + " | "
            + ", ".join(f"{ratios[d, method]:.2f}" for d in datasets) + " |")
    return lines


def _summary_tables(results):
    cells, lines = results["summary"], []
    for budget in BUDGETS:
        if not any(c["budget"] == budget for c in cells):
            continue
        lines += [
            f"### Summary: equal {budget}", "",
            "Test accuracy % at the best-validation epoch: base's own; "
            "the others' paired difference to base at the same budget, "
            "mean +/- 95% t-interval half-width over seeds, in points. "
            "CPU s/epoch vs base: measured training seconds per epoch "
            "over base's, mean over all of the method's runs.", "",
            *summary_table(results, budget=budget), ""]
    return lines


def _cell_tables(results):
    """One table per (data set, noise level)."""
    cells, lines = results["summary"], []
    for dataset, noise in combos(results["runs"]):
        rows = [c for c in cells
                if (c["dataset"], c["noise"]) == (dataset, noise)]
        n = len(rows[0]["seeds"])
        lines += [
            f"### {dataset}, {100 * noise:.0f}% noise ({n} seeds)", "",
            "Test accuracy % (clean test labels): mean +/- sample std over "
            "seeds; - base: mean paired difference to base at the same "
            "budget +/- 95% t-interval half-width, in points. Seconds: "
            "process CPU seconds of training (epochs 2..N measured, the "
            "first at their median), mean over seeds. Time to base: median "
            "seconds until validation accuracy first reaches base's best "
            "at equal epochs (seeds reaching it).", "",
            "| budget | method | passes/step | epochs | CPU s | at best val "
            "| final | best val - base | final - base | time to base |",
            "|---|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            diff = [percent(c[f"{m}_minus_base"], signed=True)
                    if f"{m}_minus_base" in c else "-"
                    for m in ("test_at_best_val", "test_final")]
            t = c["time_to_base_accuracy"]
            passes = f"{c['passes_per_step']:g}"
            if abs(c["passes_per_step_measured"] - c["passes_per_step"]) \
                    > 0.005 and c["method"] != "msam":
                passes += f" ({c['passes_per_step_measured']:.3f})"
            lines.append(
                f"| {c['budget']} | {c['method']}"
                f"{setting_text(c.get('setting'))} | {passes} | "
                f"{c['epochs']} | {c['training_seconds'][0]:.1f} | "
                f"{percent(c['test_at_best_val'])} | "
                f"{percent(c['test_final'])} | {diff[0]} | {diff[1]} | "
                f"{seconds_text(t['median'])} ({t['reached']}/{t['seeds']})"
                " |")
        lines.append("")
    return lines


def _point4_table(results):
    lines = []
    p4 = results.get("point4", [])
    if p4:
        lines += [
            f"### Point 4: at {100 * POINT4_NOISE:.0f}% noise, equal epochs, "
            f"a method of at most {POINT4_MAX_PASSES} passes per step with "
            f">= {POINT4_SHARE} x ASAM's gain?", "",
            "Gain: mean paired difference to base over seeds +/- 95% "
            "t-interval half-width, in points. A method qualifies when its "
            f"gain is at least {POINT4_SHARE} x ASAM's and its interval "
            "excludes zero; undetermined when ASAM's interval includes "
            "zero.", "",
            "| data | metric | ASAM gain | threshold | candidates: gain "
            "(share of ASAM's) | answer |",
            "|---|---|---|---|---|---|"]
        for e in p4:
            cands = "; ".join(
                f"{c['method']} {percent(c['gain'], signed=True)} "
                + (f"({100 * c['share_of_asam']:.0f}%)"
                   if c["share_of_asam"] is not None else "")
                + (" *" if c["qualifies"] else "")
                for c in e["candidates"])
            lines.append(
                f"| {e['dataset']} | {e['metric']} | "
                f"{percent(e['asam_gain'], signed=True)} | "
                f"{100 * e['threshold']:+.2f} | {cands} | "
                f"**{e['answer']}** |")
        lines += ["", "`*`: qualifies.", ""]
    return lines


def markdown(results):
    meta = results["meta"]
    lines = (_summary_tables(results) + _cell_tables(results)
             + _point4_table(results))
    if "selection" in results:
        lines += selection.markdown(results["selection"], _order(METHODS))
    load = meta.get("load_average_1min", {})
    lines.append(
        f"TensorFlow {meta['versions']['tensorflow']}, Keras "
        f"{meta['versions']['keras']}, {harness.cpu_count_of(meta)} CPU "
        f"cores, commit {harness.commit_of(meta)[:10]}"
        f"{' (dirty)' if harness.dirty_of(meta) else ''}"
        f"; seeds {meta['arguments']['seeds']}; equal-passes budget on "
        f"{', '.join(meta['arguments']['passes_datasets']) or 'none'}; "
        f"{meta['minutes']:.1f} minutes of wall time, "
        f"{meta['cpu_minutes_in_runs']:.1f} CPU minutes in training runs; "
        "1-minute load average "
        f"{load.get('start', float('nan')):.1f} at the start, "
        f"{load.get('end', float('nan')):.1f} at the end, "
        f"{load.get('min_during', float('nan')):.1f}-"
        f"{load.get('max_during', float('nan')):.1f} at the ends of runs.")
    constants = meta["constants"]
    lines[-1] += (f" LookSAM alpha {constants['looksam_alpha']}, "
                  f"Momentum-SAM rho {constants['msam_rho']}.")
    if "saf" in constants:
        lines[-1] += " " + new_methods_text(constants)
    note = meta.get("note") or meta.get("reduction")
    if note:
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def new_methods_text(constants):
    """The settings of SAF, MESA, AE-SAM and the EMA control in words."""
    saf, mesa = constants["saf"], constants["mesa"]
    aesam, ema = constants["aesam"], constants["ema"]
    return (f"SAF lambda {saf['lmbda']}, temperature {saf['temperature']}, "
            f"lag {saf['lag']}, start {saf['start']}; MESA lambda "
            f"{mesa['lmbda']}, temperature {mesa['temperature']}, decay: "
            f"{mesa['decay']}, start: {mesa['start']}; AE-SAM delta "
            f"{aesam['delta']}, lambda1 "
            f"{aesam['lambda1']}, lambda2 {aesam['lambda2']}, ASAM rho "
            f"{aesam['rho']}; EMA control momentum {ema['momentum']} (the "
            "per-run values of all four are in each run's `config`).")


def plot(results, path):
    """The frontier: best-validation test accuracy against training
    seconds, one panel per (data set, noise), one point per method and
    budget."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["summary"]
    panels = combos(results["runs"])
    cols = 2 if len(panels) > 1 else 1
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False,
                             figsize=(7.5 * cols, 5.5 * rows))
    colors = dict(zip(METHODS, plt.get_cmap("tab20").colors[::2]
                      + plt.get_cmap("tab20").colors[1::2]))
    for ax, (dataset, noise) in zip(axes.flat, panels):
        for method in METHODS:
            points = [c for c in cells if (c["dataset"], c["noise"],
                                           c["method"]) ==
                      (dataset, noise, method)]
            if not points:
                continue
            shared = len({c["epochs"] for c in points}) == 1
            xs = [c["training_seconds"][0] for c in points]
            ys = [100 * c["test_at_best_val"][0] for c in points]
            if not shared:
                ax.plot(xs, ys, color=colors[method], lw=0.8, alpha=0.6)
            for c in points:
                if shared and c["budget"] == "passes":
                    continue
                marker = "o" if c["budget"] == "epochs" else "s"
                x, y = c["training_seconds"][0], 100 * c["test_at_best_val"][0]
                ax.errorbar(x, y, yerr=100 * np.nan_to_num(
                    c["test_at_best_val"][1]), xerr=np.nan_to_num(
                    c["training_seconds"][1]), fmt=marker, ms=6,
                    color=colors[method], capsize=2, lw=0.8)
                tag = ("" if shared else " E" if c["budget"] == "epochs"
                       else f" {c['epochs']}ep")
                ax.annotate(SHORT[method] + tag, (x, y), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        ax.set_title(f"{dataset}, {100 * noise:.0f}% label noise",
                     fontsize=10)
        ax.set_xlabel("training CPU seconds (mean over seeds)")
        ax.set_ylabel("test accuracy at best-validation epoch (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color="gray", marker="o", ls="",
                          label="equal epochs (E); two-pass methods: also "
                                "equal passes"),
               plt.Line2D([], [], color="gray", marker="s", ls="",
                          label="equal passes (base's 2E epochs)")]
    axes.flat[0].legend(handles=handles, fontsize=8, loc="best")
    n = len(cells[0]["seeds"]) if cells else 0
    fig.suptitle("What a budget buys: test accuracy against training CPU "
                 f"time (mean; error bars: sample std over {n} seeds)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# -- bookkeeping ------------------------------------------------------------


def metadata(args, minutes, runs, record):
    meta = g.metadata(args, minutes, runs, record)
    meta["constants"].update(
        budgets={"epochs": "E epochs for every method",
                 "passes": "2E / (passes per step) epochs"},
        equal_epochs=args.epochs, passes_per_step=PASSES,
        methods={m: LABELS[m] for m in args.methods},
        looksam_alpha=LOOKSAM_ALPHA, fsam_sigma=FSAM_SIGMA,
        fsam_lmbda=FSAM_LMBDA, wsam_gamma=WSAM_GAMMA, wsam_decouple=True,
        msam_rho=MSAM_RHO, msam_momentum=MSAM_MOMENTUM,
        msam_adaptive=False, asam_seed=second_pass.DEFAULT_SEED,
        saf=dict(lmbda=SAF_LMBDA, temperature=DISTILL_TEMPERATURE,
                 lag=f"{SAF_LAG} (the start, if that is smaller)",
                 start=f"{SAF_START} epochs, or a sixth of the run if "
                       "shorter (at least 1)"),
        mesa=dict(lmbda=MESA_LMBDA, temperature=DISTILL_TEMPERATURE,
                  decay=f"horizon 1 / (1 - decay) = "
                        f"{100 * MESA_HORIZON_SHARE:.1f}% of the run's "
                        "steps, the paper's share",
                  start="SAF's start in epochs, as train steps",
                  passes_per_step="1 + 1/3 for the teacher's forward pass"),
        aesam=dict(delta=AESAM_DELTA, lambda1=AESAM_LAMBDA1,
                   lambda2=AESAM_LAMBDA2, rho=g.ASAM_RHO, adaptive=True,
                   total_steps="the run's train steps"),
        ema=dict(momentum=EMA_MOMENTUM,
                 evaluated="the optimizer's average (use_ema), copied into "
                           "a second network at each epoch's end"),
        point4_excluded=CONTROLS,
        jit_compile=args.jit_compile,
        seconds=("process CPU seconds of the training loop (evaluation "
                 "excluded), one thread per process; epoch 1 and epochs "
                 f"above {SPIKE} x the median of epochs 2..N counted at "
                 "that median"))
    return meta


def add_selection_arguments(parser):
    parser.add_argument("--select", action="store_true",
                        help="choose each method's knob on validation "
                             "data with the selection seeds first, then "
                             "report --seeds with the chosen values")
    parser.add_argument("--selection-seeds", nargs="+", type=int,
                        default=None,
                        help=f"default {selection.SELECTION_SEEDS} "
                             f"({selection.QUICK_SELECTION_SEEDS} with "
                             "--quick); must not be report seeds")


def check_selection_arguments(parser, args):
    """Default selection seeds; the report's seeds must be fresh."""
    args.selection_seeds = args.selection_seeds or (
        selection.QUICK_SELECTION_SEEDS if args.quick
        else selection.SELECTION_SEEDS)
    if args.select and set(args.selection_seeds) & set(args.seeds):
        parser.error("--selection-seeds must differ from --seeds")


def _parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: digits, 40%% noise, 2 seeds, 2 "
                             "epochs, 9 methods, 512 pool examples, no XLA "
                             "(with --select: 1 selection seed, grids of "
                             "2 values)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS,
                        default=None, help="default: both")
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=None, help="default: all")
    parser.add_argument("--noise-levels", nargs="+", type=float,
                        default=None, help=f"default {NOISE_LEVELS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"default {SEEDS}")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"E, the equal-epochs budget (default "
                             f"{EPOCHS})")
    parser.add_argument("--budgets", nargs="+", choices=BUDGETS,
                        default=BUDGETS)
    parser.add_argument("--passes-datasets", nargs="*", default=None,
                        help="data sets that get the equal-passes budget "
                             "(default: all)")
    parser.add_argument("--looksam-alpha", type=float, default=LOOKSAM_ALPHA,
                        help=f"LookSAM's alpha (default {LOOKSAM_ALPHA}, "
                             "the issue's)")
    parser.add_argument("--msam-rho", type=float, default=MSAM_RHO,
                        help=f"Momentum-SAM's rho (default {MSAM_RHO}, the "
                             "paper's)")
    add_selection_arguments(parser)
    parser.add_argument("--note", default="",
                        help="what this run changes or leaves out of the "
                             "issue's plan, recorded in the JSON and tables")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use only the first N examples of the pool")
    parser.add_argument("--no-jit", action="store_true",
                        help="compile the steps without XLA")
    parser.add_argument("--jobs", type=int, default=JOBS,
                        help=f"processes, one CPU thread each (default "
                             f"{JOBS})")
    parser.add_argument("--resume", action="store_true",
                        help="skip the runs in budget_partial_*.jsonl")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--stem", default=None,
                        help="output file name stem (default budget, "
                             "budget_quick with --quick; budget_selected"
                             "[_quick] with --select)")
    parser.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    parser.add_argument("--render", metavar="JSON",
                        help="only redraw the tables and PNG of a results "
                             "JSON next to it")
    return parser


def parse_args(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.datasets = args.datasets or quick.get("datasets", DATASETS)
    if "mnist1d" in args.datasets and not g.mnist1d_available():
        parser.error("mnist1d is not installed: pip install mnist1d")
    args.methods = sorted(args.methods or quick.get("methods", METHODS),
                          key=_order(METHODS))
    if "base" not in args.methods:
        parser.error("base is needed: every difference is against it")
    args.noise_levels = (args.noise_levels
                         or quick.get("noise_levels", NOISE_LEVELS))
    args.seeds = args.seeds or quick.get("seeds", SEEDS)
    args.epochs = args.epochs or quick.get("epochs", EPOCHS)
    args.max_train = args.max_train or quick.get("max_train")
    args.jit_compile = (not args.no_jit) and quick.get("jit_compile", True)
    if args.passes_datasets is None:
        args.passes_datasets = list(args.datasets)
    check_selection_arguments(parser, args)
    return args


def default_stem(args):
    return ("budget" + ("_selected" if args.select else "")
            + ("_quick" if args.quick else ""))


def train(args, stem):
    """The report's runs and, with `--select`, the selection's record:
    the selection runs first (their own partial files), then the report
    with the chosen settings."""
    if not args.select:
        return experiment(args, stem, plan(args)), None
    found = experiment(args, f"{stem}_selection",
                       selection.plan(args, args.quick))
    defaults = knob_defaults()
    chosen = selection.choose(found, defaults)
    runs = experiment(args, stem,
                      plan(args, selection.chosen_settings(chosen)))
    methods = [m for m in args.methods if m in selection.KNOBS]
    record = dict(
        seeds=args.selection_seeds, report_seeds=args.seeds,
        epochs=args.epochs, budget="epochs",
        criterion="best validation accuracy, mean over selection seeds",
        knobs={m: selection.KNOBS[m] for m in methods},
        grids={m: (selection.quick_grid(m) if args.quick
                   else selection.GRIDS[m]) for m in methods},
        defaults={m: defaults[m] for m in methods},
        chosen=chosen, runs=[selection.compact(r) for r in found],
        cpu_minutes_in_runs=sum(r["cpu_seconds"] for r in found) / 60)
    return runs, record


def main(argv=None):
    args = parse_args(argv)
    apply_settings(settings(args))
    if args.worker:
        worker(args.worker)
        return
    if args.render:
        with open(args.render) as f:
            results = json.load(f)
        stem = os.path.splitext(args.render)[0]
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        stem = os.path.join(args.output_dir, args.stem or default_stem(args))
        tic, record = time.time(), g.provenance(args)
        load = os.getloadavg()[0]
        runs, selected = train(args, stem)
        minutes = (time.time() - tic) / 60
        results = dict(meta=metadata(args, minutes, runs, record), runs=runs)
        if selected:
            results["selection"] = selected
        loads = [r["load_average_1min"] for r in runs]
        results["meta"]["load_average_1min"] = dict(
            start=load, end=os.getloadavg()[0], min_during=min(loads),
            max_during=max(loads), mean_during=float(np.mean(loads)))
        results["meta"]["note"] = args.note
        results["summary"] = summary(runs)
        results["point4"] = point4(results["summary"])
        harness.dump_json(results, f"{stem}.json", compact_key="runs")
        for path in (glob.glob(f"{stem}_partial_*.jsonl")
                     + glob.glob(f"{stem}_selection_partial_*.jsonl")):
            os.remove(path)
    with open(f"{stem}.md", "w") as f:
        f.write(markdown(results))
    paths = [f"{stem}.md", *plot(results, f"{stem}_frontier.png")]
    print()
    print(markdown(results))
    print("wrote", ", ".join(paths if args.render else [f"{stem}.json",
                                                        *paths]))


if __name__ == "__main__":
    main()
