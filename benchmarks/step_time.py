"""Step time of ASAM against the base optimizer and a two-pass floor.

Measures, in one process and interleaved (A B C ..., A B C ...), the time of
one compiled training step of:

  base        the base optimizer alone (a plain keras.Model)
  floor       the two-pass floor: the gradient computed twice at w, the second
              one applied (the physical limit of any SAM-type method)
  sam         SAMModel
  asam        ASAMModel, element-wise
  asam_filter ASAMModel, filter-wise
  asam_every2 ASAMModel(asam_every=2)
  asam_every5 ASAMModel(asam_every=5)

for a CNN with BatchNorm on CIFAR-shaped data (32x32x3, batch 128) and an MLP,
each at two widths, with and without `jit_compile`. A callback brackets each
step between `on_train_batch_begin` and `on_train_batch_end` inside `fit`
over a cached, repeated `tf.data` dataset. Each round runs every variant for
`--steps` steps; a variant's time is the median over rounds of its mean step
time in a round (so `asam_every=k` averages its cheap and expensive steps).

    python benchmarks/step_time.py            # about 10 minutes on 2 cores
    python benchmarks/step_time.py --quick    # about 2 minutes

Writes benchmarks/results/step_time.json and prints a table.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_asam  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["base", "floor", "sam", "asam", "asam_filter", "asam_every2",
            "asam_every5"]


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


def build(variant, architecture, width, jit):
    keras.utils.set_random_seed(0)
    inner = {"cnn": cnn, "mlp": mlp}[architecture](width)
    model = {
        "base": lambda: inner,
        "floor": lambda: TwoPassFloor(inner),
        "sam": lambda: keras_asam.SAMModel(inner),
        "asam": lambda: keras_asam.ASAMModel(inner),
        "asam_filter": lambda: keras_asam.ASAMModel(
            inner, normalization="filterwise"),
        "asam_every2": lambda: keras_asam.ASAMModel(inner, asam_every=2),
        "asam_every5": lambda: keras_asam.ASAMModel(inner, asam_every=5),
    }[variant]()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    return model


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self.start)


def dataset(batch_size):
    rs = np.random.RandomState(0)
    x = rs.rand(batch_size, 32, 32, 3).astype("float32")
    y = rs.randint(0, 10, batch_size)
    return tf.data.Dataset.from_tensors((x, y)).cache().repeat()


def measure(setting, args):
    """Median (over rounds) of the mean step time of every variant."""
    data = dataset(args.batch_size)
    models = {v: build(v, *setting) for v in VARIANTS}
    for model in models.values():  # Trace and warm up.
        model.fit(data, steps_per_epoch=args.steps, epochs=1, verbose=0)
    per_round = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            timer = StepTimer()
            models[variant].fit(data, steps_per_epoch=args.steps, epochs=1,
                                verbose=0, callbacks=[timer])
            per_round[variant].append(float(np.mean(timer.times)))
    return {v: float(np.median(t)) for v, t in per_round.items()}, per_round


def ratios(times):
    return {
        "floor/base": times["floor"] / times["base"],
        "sam/floor": times["sam"] / times["floor"],
        "asam/floor": times["asam"] / times["floor"],
        "asam_filter/floor": times["asam_filter"] / times["floor"],
        "asam/base": times["asam"] / times["base"],
        "asam_every2/base": times["asam_every2"] / times["base"],
        "asam_every5/base": times["asam_every5"] / times["base"],
    }


def render_markdown(report):
    """Markdown tables of a results report (as written to the JSON)."""
    results = report["results"]
    lines = ["| model | width | params | XLA | " + " | ".join(VARIANTS) + " |",
             "|---|---|---|---|" + "---|" * len(VARIANTS)]
    for r in results:
        times = r["median_step_seconds"]
        lines.append(
            f"| {r['architecture']} | {r['width']} | {r['params']:,} | "
            f"{'on' if r['jit'] else 'off'} | "
            + " | ".join(f"{1000 * times[v]:.1f} ms" for v in VARIANTS) + " |")
    names = list(results[0]["ratios"])
    lines += ["", "| model | width | XLA | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for r in results:
        lines.append(
            f"| {r['architecture']} | {r['width']} | "
            f"{'on' if r['jit'] else 'off'} | "
            + " | ".join(f"{r['ratios'][n]:.3f}" for n in names) + " |")
    versions = report["versions"]
    lines += ["", f"TensorFlow {versions['tensorflow']}, Keras "
              f"{versions['keras']}, {report['machine']['cpu_count']} CPU "
              f"cores, commit {str(report['commit'])[:10]}, "
              f"{report['arguments']['rounds']} rounds of "
              f"{report['arguments']['steps']} steps, batch "
              f"{report['arguments']['batch_size']}."]
    return "\n".join(lines) + "\n"


def commit():
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10,
                        help="steps per variant per round (a multiple of 10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architectures", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
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
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]

    results = []
    header = (f"{'model':<6} {'width':>5} {'xla':>4} | "
              + " ".join(f"{v:>11}" for v in VARIANTS))
    lines = []
    for architecture in args.architectures:
        for width in args.widths:
            for jit in jits:
                setting = (architecture, width, jit)
                times, per_round = measure(setting, args)
                results.append({
                    "architecture": architecture, "width": width, "jit": jit,
                    "params": build("base", *setting).count_params(),
                    "median_step_seconds": times, "ratios": ratios(times),
                    "per_round_seconds": per_round,
                })
                xla = "on" if jit else "off"
                lines.append(
                    f"{architecture:<6} {width:>5} {xla:>4} | "
                    + " ".join(f"{1000 * times[v]:>9.1f}ms" for v in VARIANTS))
                print(lines[-1], flush=True)

    print("\nStep time (median over rounds of the mean step time)")
    print(header)
    print("\n".join(lines))
    print("\nRatios")
    names = list(results[0]["ratios"])
    print(f"{'model':<6} {'width':>5} {'xla':>4} | "
          + " ".join(f"{n:>17}" for n in names))
    for r in results:
        print(f"{r['architecture']:<6} {r['width']:>5} "
              f"{'on' if r['jit'] else 'off':>4} | "
              + " ".join(f"{r['ratios'][n]:>17.3f}" for n in names))

    report = {
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "versions": {"python": sys.version.split()[0],
                     "tensorflow": tf.__version__,
                     "keras": keras.version(),
                     "keras_asam": keras_asam.__version__},
        "commit": commit(),
        "arguments": vars(args),
        "results": results,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=1)
    markdown = os.path.splitext(args.output)[0] + ".md"
    with open(markdown, "w") as f:
        f.write(render_markdown(report))
    print(f"\nWrote {args.output} and {markdown}")


if __name__ == "__main__":
    main()
