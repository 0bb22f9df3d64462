"""Where ASAM's time beyond the two-pass floor goes, without XLA.

Times, on the weights of the benchmark models, the parts of the ASAM step
that are not forward/backward passes: computing eps (`perturbation`), and
moving the weights to w + eps and back (snapshot, assign, restore). Each part
is a `tf.function` called on the same tensors; medians of many calls.

    python benchmarks/ascent_cost.py

Writes benchmarks/results/ascent_cost.json.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import step_time  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_asam.perturbation import is_bias, perturbation  # noqa: E402


def median_ms(fn, calls=200):
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    results = []
    for architecture in ("mlp", "cnn"):
        for width in (1, 2):
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

            row = {"architecture": architecture, "width": width,
                   "params": model.count_params(),
                   "sam_eps_ms": median_ms(sam_eps),
                   "asam_eps_ms": median_ms(asam_eps),
                   "perturb_and_restore_ms": median_ms(perturb_and_restore),
                   "one_elementwise_pass_ms": median_ms(one_elementwise_pass)}
            results.append(row)
            print(f"{architecture} width {width} ({row['params']:,} params): "
                  f"SAM eps {row['sam_eps_ms']:.2f} ms, "
                  f"ASAM eps {row['asam_eps_ms']:.2f} ms, "
                  f"perturb+restore {row['perturb_and_restore_ms']:.2f} ms, "
                  f"one elementwise pass {row['one_elementwise_pass_ms']:.2f}"
                  " ms", flush=True)
    output = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "results", "ascent_cost.json")
    with open(output, "w") as f:
        json.dump({"tensorflow": tf.__version__, "commit":
                   step_time.commit(), "results": results}, f, indent=1)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
