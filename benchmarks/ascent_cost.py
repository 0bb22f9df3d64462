"""Where ASAM's time beyond the two-pass floor goes, without XLA.

Times, on the weights of the benchmark models, the parts of the ASAM step
that are not forward/backward passes: computing eps (`perturbation`), and
moving the weights to w + eps and back (snapshot, assign, restore). Each part
is a `tf.function` called on the same tensors; medians of many calls.

    python -m benchmarks.ascent_cost             # about a minute
    python -m benchmarks.ascent_cost --calls 20  # a smoke run

Writes benchmarks/results/ascent_cost.json.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import harness, step_time  # noqa: E402
from keras_asam.perturbation import is_bias, perturbation  # noqa: E402


def median_ms(fn, calls=200):
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def measure(architecture, width, calls):
    """Median times (ms) of the step's parts on one model's weights."""
    model = getattr(step_time, architecture)(width)
    variables = model.trainable_variables
    grads = [tf.random.normal(v.shape) for v in variables]
    scaled = [not is_bias(v.path) for v in variables]

    @tf.function
    def sam_eps():
        return perturbation(grads, [v.value for v in variables],
                            rho=0.05, adaptive=False)

    @tf.function
    def asam_eps():
        return perturbation(grads, [v.value for v in variables],
                            rho=0.5, scaled=scaled)

    @tf.function
    def perturb_and_restore():
        saved = [tf.identity(v.value) for v in variables]
        for v, g in zip(variables, grads):
            v.assign_add(g * 0.0)
        for v, w in zip(variables, saved):
            v.assign(w)

    @tf.function
    def one_elementwise_pass():
        return [g * 2.0 for g in grads]

    return {"architecture": architecture, "width": width,
            "params": model.count_params(),
            "sam_eps_ms": median_ms(sam_eps, calls),
            "asam_eps_ms": median_ms(asam_eps, calls),
            "perturb_and_restore_ms": median_ms(perturb_and_restore, calls),
            "one_elementwise_pass_ms": median_ms(one_elementwise_pass,
                                                 calls)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200,
                        help="timed calls of each part (default 200)")
    parser.add_argument("--output", default=harness.results_path(
        "ascent_cost"))
    args = parser.parse_args(argv)
    record = harness.provenance(args)
    results = []
    for architecture in ("mlp", "cnn"):
        for width in (1, 2):
            row = measure(architecture, width, args.calls)
            results.append(row)
            print(f"{architecture} width {width} ({row['params']:,} params): "
                  f"SAM eps {row['sam_eps_ms']:.2f} ms, "
                  f"ASAM eps {row['asam_eps_ms']:.2f} ms, "
                  f"perturb+restore {row['perturb_and_restore_ms']:.2f} ms, "
                  f"one elementwise pass {row['one_elementwise_pass_ms']:.2f}"
                  " ms", flush=True)
    harness.write_results({**record, "results": results}, args.output)


if __name__ == "__main__":
    main()
