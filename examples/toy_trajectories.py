"""SAM and ASAM trajectories on a 2-D loss with a valley of rescaled minima.

The loss L(w1, w2) = (1 - w1 * w2)^2 depends only on the product w1 * w2, so
(a * w1, w2 / a) is the same "network" as (w1, w2), just like rescaling one
ReLU layer by a and the next by 1/a. Its minima form the valley w1 * w2 = 1,
and every point of the valley is a rescaling of every other one: they are all
equally good, and their adaptive sharpness is the same. Their SAM sharpness is
not: a fixed ball of radius rho reaches highest loss where the weights are
unbalanced, and lowest at w1 = w2 = 1.

What the figure shows (in the spirit of the paper's figure of SAM and ASAM
trajectories; the paper's start points, radius and step size are not in the
official code, so these are our own choice): from each start point, plain
gradient descent reaches the valley and stops. SAM reaches the valley and then
slides along it towards (1, 1), the point its parametrization-dependent
sharpness prefers. ASAM, whose sharpness is the same all along the valley,
stays close to where gradient descent stops. Gradient flow keeps
w1^2 - w2^2 constant; the printed endpoints show how much each method
changed it. (ASAM's small residual drift is a step-size effect, of order
lr^2 rho^2 per step.)

Choices: start points START_POINTS, both methods with rho = 0.2 (for weights
of order 1 that perturbs them by about 20%), eta = 0 (exact scale
invariance), plain gradient descent steps of lr = 0.005, 2000 steps.

The script also prints the invariance the paper proves: at w and at its
rescaled twin, ASAM's perturbation maps onto the rescaled one (eps1 scales by
a, eps2 by 1/a), so the perturbed loss is the same; SAM's is not. Every
perturbation comes from `keras_asam.perturbation.perturbation`, the code the
train step runs.

    python examples/toy_trajectories.py     # about 20 seconds on 2 CPU cores
"""

import argparse
import os

# Before TensorFlow is imported: hide its C++ info and warning lines (CUDA
# probes on CPU-only machines). Numerics are unaffected.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_asam.perturbation import perturbation  # noqa: E402

START_POINTS = [(0.15, 2.6), (2.6, 0.3), (2.6, 1.9)]
RHO = 0.2
SETTINGS = {  # The same radius: ASAM's is relative to the weights.
    "SAM": dict(adaptive=False, rho=RHO),
    "ASAM": dict(adaptive=True, rho=RHO),
}
ETA = 0.0  # eta = 0 makes ASAM exactly scale invariant.
LEARNING_RATE = 0.005
STEPS = 2000
TWIN_POINT = (0.5, 1.2)  # Where the invariance table is computed.
COLORS = {"GD": "black", "SAM": "tab:orange", "ASAM": "tab:blue"}
OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "outputs")


def loss_fn(w1, w2):
    return (1.0 - w1 * w2) ** 2


def gradient(w):
    """Gradient of the loss at w, a float64 tensor [w1, w2]."""
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = loss_fn(w[0], w[1])
    return tape.gradient(loss, w)


def perturbation_at(w, adaptive, rho):
    """eps at w from `keras_asam.perturbation` (w1 and w2 as two variables)."""
    g = gradient(w)
    eps = perturbation([g[0], g[1]], [w[0], w[1]], rho=rho,
                       adaptive=adaptive, eta=ETA)
    return tf.cast(tf.stack(eps), tf.float64)


def eps_at(w, adaptive, rho):
    w = tf.constant(w, tf.float64)
    return perturbation_at(w, adaptive, rho).numpy()


@tf.function
def _trajectory(start, lr, rho, steps, adaptive):
    w = start
    path = tf.TensorArray(tf.float64, size=steps + 1).write(0, w)
    for i in tf.range(steps):
        w = w - lr * gradient(w + perturbation_at(w, adaptive, rho))
        path = path.write(i + 1, w)
    return path.stack()


def trajectory(start, lr, steps, adaptive=False, rho=0.0):
    """`steps` SAM / ASAM steps from `start` (an array of all the w's);
    rho = 0 gives gradient descent."""
    return _trajectory(tf.constant(start, tf.float64),
                       tf.constant(lr, tf.float64),
                       tf.constant(rho, tf.float64),
                       tf.constant(steps), adaptive).numpy()


def invariance_table(w, a):
    twin = np.array([a * w[0], w[1] / a])
    lines = [f"w = ({w[0]:.3f}, {w[1]:.3f}), twin = (a*w1, w2/a) with a = {a}",
             f"{'method':<6} {'eps at w':>24} {'eps at twin':>24} "
             f"{'L(w+eps)':>10} {'L(twin+eps)':>12}"]
    for method, kwargs in SETTINGS.items():
        e, e_twin = eps_at(w, **kwargs), eps_at(twin, **kwargs)
        lines.append(
            f"{method:<6} ({e[0]:>+10.5f},{e[1]:>+10.5f}) "
            f"({e_twin[0]:>+10.5f},{e_twin[1]:>+10.5f}) "
            f"{loss_fn(*(w + e)):>10.6f} {loss_fn(*(twin + e_twin)):>12.6f}")
    e, e_twin = eps_at(w, **SETTINGS["ASAM"]), eps_at(twin, **SETTINGS["ASAM"])
    lines.append(f"ASAM eps1 ratio twin/w = {e_twin[0] / e[0]:.6f} (a = {a}), "
                 f"eps2 ratio = {e_twin[1] / e[1]:.6f} (1/a = {1 / a:.6f})")
    return "\n".join(lines)


def plot(paths, lr, steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = 2.9
    grid = np.linspace(0.01, limit, 300)
    w1, w2 = np.meshgrid(grid, grid)
    fig, ax = plt.subplots(figsize=(9, 6.2))
    ax.contourf(w1, w2, np.log10(loss_fn(w1, w2) + 1e-3), levels=30,
                cmap="Greys_r", alpha=0.8)
    ax.plot(grid, 1 / grid, "--", color="tab:green", lw=1.2,
            label="minima: w1 w2 = 1")
    labelled = set()

    def label(text):  # Each legend entry once.
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for (method, start), p in paths.items():
        color = COLORS[method]
        if method == "GD":
            ax.plot(p[:, 0], p[:, 1], ":", color=color, lw=1.3, zorder=4,
                    label=label("gradient descent (reference)"))
            continue
        ax.plot(p[:, 0], p[:, 1], "-", color=color, lw=1.6, zorder=3,
                label=label(f"{method} path (rho={RHO})"))
        ax.plot(*p[-1], "*", color=color, ms=15, mec="black", mew=0.7,
                zorder=5, label=label(f"{method} end"))
    ax.plot(1, 1, "P", color="tab:green", ms=9, mec="black", mew=0.7,
            zorder=5, label="(1, 1): smallest SAM sharpness")
    for start in START_POINTS:
        ax.plot(*start, "o", color="black", ms=7, zorder=5,
                label=label("start"))
    ax.set(xlim=(0, limit), ylim=(0, limit), aspect="equal",
           xlabel="w1", ylabel="w2",
           title=f"L = (1 - w1 w2)^2: {steps} steps of lr {lr} from each "
                 "start\n(background: log loss, darker is lower)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--scale", type=float, default=4.0,
                        help="the rescaling factor a of the invariance check")
    parser.add_argument("--output-dir", default=OUTPUT_DIR,
                        help="default: examples/outputs next to this script")
    args = parser.parse_args(argv)

    paths = {}
    for method, kwargs in [("GD", {})] + list(SETTINGS.items()):
        for start in START_POINTS:
            paths[(method, start)] = trajectory(start, args.lr, args.steps,
                                                **kwargs)
    print("Endpoints after {} steps (gradient flow keeps w1^2 - w2^2 "
          "constant):".format(args.steps))
    for (method, start), p in paths.items():
        w = p[-1]
        print(f"{method:<4} from {start}: ends at ({w[0]:.3f}, {w[1]:.3f}), "
              f"loss {loss_fn(*w):.1e}, w1^2 - w2^2 {w[0]**2 - w[1]**2:+.2f} "
              f"(start {start[0]**2 - start[1]**2:+.2f})")
    print()
    print(invariance_table(np.array(TWIN_POINT), args.scale))

    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, "toy_trajectories.png")
    plot(paths, args.lr, args.steps, png)
    print(f"\nWrote {png}")


if __name__ == "__main__":
    main()
