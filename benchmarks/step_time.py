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

for a CNN with BatchNorm on CIFAR-shaped data (32x32x3, batch 128) and an MLP,
each at two widths, with and without `jit_compile`. A callback brackets each
step between `on_train_batch_begin` and `on_train_batch_end` inside `fit`
over a cached, repeated `tf.data` dataset. Each round runs every variant for
`--steps` steps; a variant's time is the median over rounds of its mean step
time in a round (so `asam_every=k` averages its cheap and expensive steps).
Variants that do not apply to a setting (XLA with `num_batch_splits` > 1,
`perturb="normalization"` on a model without normalization layers) are
skipped and reported as n/a.

    python benchmarks/step_time.py             # about 20 minutes, 2 idle cores
    python benchmarks/step_time.py --widths 1  # about 7 minutes
    python benchmarks/step_time.py --quick     # about 2 minutes
    python benchmarks/step_time.py --variants base floor asam gsam

Writes benchmarks/results/step_time.json and .md and prints the tables.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_asam  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["base", "floor", "sam", "asam", "asam_filter", "asam_every2",
            "asam_every5", "asam_norm", "gsam", "looksam5", "asam_split2",
            "asam_split8", "asam_split_b"]
# The columns of the two step-time tables.
TIME_TABLES = [VARIANTS[:7], ["base", "floor", "asam", *VARIANTS[7:]]]
SPLITS = {"asam_split2": 2, "asam_split8": 8, "asam_split_b": None}
GSAM_ALPHA = 0.3
LOOKSAM_ALPHA, LOOKSAM_EVERY = 0.7, 5
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
     ("asam_split_b/asam", "asam_split_b", "asam")],
]


class TwoPassFloor(keras.Model):
    """Two gradients at w per step, the second applied: no perturbation.

    Pass 2 depends on pass 1 through the gradient norm (which every SAM-type
    step computes): its input is `x * (norm >= 0)`, bitwise `x` but not a
    common subexpression of pass 1, so graph optimizers can neither prune the
    first backward pass nor merge the two passes.
    """

    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.wrapped_model = model

    def call(self, inputs, training=None):
        return self.wrapped_model(inputs, training=training)

    def _gradients(self, x, y):
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        return y_pred, loss, tape.gradient(loss, self.trainable_variables)

    def train_step(self, data):
        x, y = data
        y_pred, loss, first = self._gradients(x, y)
        self._loss_tracker.update_state(loss)
        norm = tf.linalg.global_norm(first)
        same_x = x * tf.cast(norm >= 0.0, x.dtype)  # x, but data-dependent.
        _, _, second = self._gradients(same_x, y)
        self.optimizer.apply_gradients(zip(second, self.trainable_variables))
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


def skip_reason(variant, architecture, width, jit):
    """Why `variant` does not apply to this setting, or None."""
    if variant in SPLITS and jit:
        return "num_batch_splits > 1 does not compile with XLA"
    if variant == "asam_norm" and not has_normalization(
            {"cnn": cnn, "mlp": mlp}[architecture](width)):
        return "no normalization layer to perturb"
    return None


def build(variant, architecture, width, jit, batch_size=128):
    keras.utils.set_random_seed(0)
    inner = {"cnn": cnn, "mlp": mlp}[architecture](width)
    splits = SPLITS.get(variant) or batch_size
    model = {
        "base": lambda: inner,
        "floor": lambda: TwoPassFloor(inner),
        "sam": lambda: keras_asam.SAMModel(inner),
        "asam": lambda: keras_asam.ASAMModel(inner),
        "asam_filter": lambda: keras_asam.ASAMModel(
            inner, normalization="filterwise"),
        "asam_every2": lambda: keras_asam.ASAMModel(inner, asam_every=2),
        "asam_every5": lambda: keras_asam.ASAMModel(inner, asam_every=5),
        "asam_norm": lambda: keras_asam.ASAMModel(
            inner, perturb="normalization"),
        "gsam": lambda: keras_asam.ASAMModel(inner, gsam_alpha=GSAM_ALPHA),
        "looksam5": lambda: keras_asam.ASAMModel(
            inner, looksam_alpha=LOOKSAM_ALPHA, asam_every=LOOKSAM_EVERY),
        "asam_split2": lambda: keras_asam.ASAMModel(
            inner, num_batch_splits=splits),
        "asam_split8": lambda: keras_asam.ASAMModel(
            inner, num_batch_splits=splits),
        "asam_split_b": lambda: keras_asam.ASAMModel(
            inner, num_batch_splits=splits),
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
        self.times.append(time.perf_counter() - self.start)
        self.cpu_times.append(time.process_time() - self.cpu_start)


def dataset(batch_size):
    rs = np.random.RandomState(0)
    x = rs.rand(batch_size, 32, 32, 3).astype("float32")
    y = rs.randint(0, 10, batch_size)
    return tf.data.Dataset.from_tensors((x, y)).cache().repeat()


def steps_of(variant, args):
    return args.split_b_steps if variant == "asam_split_b" else args.steps


def measure(setting, args):
    """Median (over rounds) of the mean step time of every variant that
    applies, in wall and in CPU seconds; `None` for the others."""
    data = dataset(args.batch_size)
    skipped = {v: skip_reason(v, *setting) for v in args.variants}
    skipped = {v: reason for v, reason in skipped.items() if reason}
    variants = [v for v in args.variants if v not in skipped]
    models = {v: build(v, *setting, batch_size=args.batch_size)
              for v in variants}
    for v, model in models.items():  # Trace and warm up.
        model.fit(data, steps_per_epoch=steps_of(v, args), epochs=1,
                  verbose=0, shuffle=False)
    per_round = {v: [] for v in variants}
    per_round_cpu = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            timer = StepTimer()
            models[variant].fit(data, steps_per_epoch=steps_of(variant, args),
                                epochs=1, verbose=0, shuffle=False,
                                callbacks=[timer])
            per_round[variant].append(float(np.mean(timer.times)))
            per_round_cpu[variant].append(float(np.mean(timer.cpu_times)))

    def medians(rounds):
        return {v: float(np.median(rounds[v])) if v in rounds else None
                for v in args.variants}

    return (medians(per_round), medians(per_round_cpu), per_round,
            per_round_cpu, skipped)


def ratios(times):
    """Every ratio of `RATIO_TABLES`; `None` where a variant is missing."""
    result = {}
    for name, numerator, denominator in sum(RATIO_TABLES, []):
        if numerator is None:  # looksam5_ideal/base
            base, floor = times.get("base"), times.get("floor")
            result[name] = (None if base is None or floor is None else
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


def render_markdown(report):
    """Markdown tables of a results report (as written to the JSON)."""
    results = report["results"]
    measured = [v for v in VARIANTS
                if any(v in r["median_step_seconds"] for r in results)]
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
    notes = sorted({f"{v}: {reason}" for r in results
                    for v, reason in r.get("skipped", {}).items()})
    if notes:
        lines += ["n/a: " + "; ".join(notes) + ".", ""]
    versions = report["versions"]
    arguments = report["arguments"]
    footer = (f"TensorFlow {versions['tensorflow']}, Keras "
              f"{versions['keras']}, {report['machine']['cpu_count']} CPU "
              f"cores, commit {str(report['commit'])[:10]}"
              + (" with uncommitted library changes"
                 if report.get("uncommitted_library_files") else "") + ", "
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
    lines.append(footer + ".")
    return "\n".join(lines) + "\n"


def commit():
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def uncommitted_library_files():
    """Files of `keras_asam` that differ from the commit (as imported)."""
    try:
        status = subprocess.check_output(
            ["git", "status", "--porcelain", "--", "keras_asam"],
            cwd=os.path.dirname(HERE), text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in status.splitlines()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10,
                        help="steps per variant per round (a multiple of 10)")
    parser.add_argument("--split-b-steps", type=int, default=2,
                        help="steps per round of asam_split_b (1-SAM: "
                             "batch-size sequential parts per step)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architectures", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=VARIANTS, metavar="VARIANT",
                        help="measure only these (default: all of "
                             + ", ".join(VARIANTS) + ")")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, CNN and MLP at width 1, no XLA")
    parser.add_argument("--output",
                        default=os.path.join(HERE, "results", "step_time.json"))
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only print the Markdown tables of a results "
                             "JSON")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render_markdown(json.load(f)), end="")
        return
    if args.quick:
        args.rounds, args.widths, args.jit = 3, [1], "off"
    args.variants = [v for v in VARIANTS if v in args.variants]
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    # Parts of one example with BatchNorm: the library says what happens
    # (once per trace); timing is all that is measured here.
    warnings.filterwarnings("ignore", message=r"`num_batch_splits=")

    # The library as imported: the tree may change while this runs.
    source = {"commit": commit(),
              "uncommitted_library_files": uncommitted_library_files()}
    start = time.perf_counter()
    results = []
    for architecture in args.architectures:
        for width in args.widths:
            for jit in jits:
                setting = (architecture, width, jit)
                setting_start = time.perf_counter()
                load_before = os.getloadavg()[0]
                times, cpu_times, per_round, per_round_cpu, skipped = (
                    measure(setting, args))
                results.append({
                    "architecture": architecture, "width": width, "jit": jit,
                    "params": build("base", *setting).count_params(),
                    "median_step_seconds": times, "ratios": ratios(times),
                    "median_step_cpu_seconds": cpu_times,
                    "cpu_ratios": ratios(cpu_times),
                    "per_round_seconds": per_round,
                    "per_round_cpu_seconds": per_round_cpu,
                    "skipped": skipped,
                    "wall_seconds": time.perf_counter() - setting_start,
                    "load_average": [load_before, os.getloadavg()[0]],
                })
                print(f"{architecture} width {width} XLA "
                      f"{'on' if jit else 'off'} "
                      f"({results[-1]['wall_seconds']:.0f} s): "
                      + ", ".join(f"{v} {_ms(t)}" for v, t in times.items()),
                      flush=True)

    report = {
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "versions": {"python": sys.version.split()[0],
                     "tensorflow": tf.__version__,
                     "keras": keras.version(),
                     "keras_asam": keras_asam.__version__},
        **source,
        "arguments": vars(args),
        "wall_seconds": time.perf_counter() - start,
        "results": results,
    }
    markdown_text = render_markdown(report)
    print()
    print(markdown_text)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    markdown = os.path.splitext(args.output)[0] + ".md"
    with open(markdown, "w") as f:
        f.write(markdown_text)
    print(f"Wrote {args.output} and {markdown}")


if __name__ == "__main__":
    main()
