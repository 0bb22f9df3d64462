"""SAM and ASAM trajectories on a 2-D loss with a valley of rescaled minima.

The loss L(w1, w2) = (1 - w1 * w2)^2 depends only on the product w1 * w2, so
(a * w1, w2 / a) is the same "network" as (w1, w2), just like rescaling one
ReLU layer by a and the next by 1/a. Its minima form the valley w1 * w2 = 1.

The script draws SAM and ASAM trajectories from the same start points over
the loss contours (as in the paper's figure) and prints the invariance the
paper proves: at w and at its rescaled twin, ASAM's perturbation maps onto the
rescaled one (eps1 scales by a, eps2 by 1/a), so the perturbed loss is the
same; SAM's is not. Every perturbation comes from
`keras_asam.perturbation.perturbation`, the code the train step runs.

    python examples/toy_trajectories.py     # a few seconds
"""

import argparse
import os

import numpy as np
import tensorflow as tf

from keras_asam.perturbation import perturbation

START_POINTS = [(0.2, 2.4), (2.4, 0.25), (0.35, 0.35)]
SETTINGS = {  # Each method with its own usual radius.
    "SAM": dict(adaptive=False, rho=0.05),
    "ASAM": dict(adaptive=True, rho=0.2),
}
ETA = 0.0  # eta = 0 makes ASAM exactly scale invariant.


def loss_fn(w1, w2):
    return (1.0 - w1 * w2) ** 2


def loss_and_grads(w):
    """Loss and gradient at w = [w1, w2] (two scalar variables)."""
    w = [tf.constant(v, tf.float64) for v in w]
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = loss_fn(*w)
    return float(loss), [g.numpy() for g in tape.gradient(loss, w)]


def eps_at(w, adaptive, rho):
    _, grads = loss_and_grads(w)
    eps = perturbation([tf.constant(g) for g in grads],
                       [tf.constant(v, tf.float64) for v in w],
                       rho=rho, adaptive=adaptive, eta=ETA)
    return np.array([float(e) for e in eps])


def trajectory(start, adaptive, rho, lr, steps):
    w = np.array(start, dtype="float64")
    path = [w.copy()]
    for _ in range(steps):
        eps = eps_at(w, adaptive, rho)
        _, grads = loss_and_grads(w + eps)
        w = w - lr * np.array(grads)
        path.append(w.copy())
    return np.array(path)


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


def plot(paths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(0.01, 2.8, 300)
    w1, w2 = np.meshgrid(grid, grid)
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.contourf(w1, w2, np.log10(loss_fn(w1, w2) + 1e-3), levels=30,
                cmap="Blues_r")
    ax.plot(grid, 1 / grid, "k--", lw=1, label="minima: w1 * w2 = 1")
    colors = {"SAM": "tab:orange", "ASAM": "tab:red"}
    for (method, start), p in paths.items():
        ax.plot(p[:, 0], p[:, 1], "-", color=colors[method], lw=1.5,
                label=method if start == START_POINTS[0] else None)
        ax.plot(*p[0], "ko", ms=4)
        ax.plot(*p[-1], "*", color=colors[method], ms=10)
    ax.set(xlim=(0, 2.8), ylim=(0, 2.8), xlabel="w1", ylabel="w2",
           title="SAM and ASAM on L = (1 - w1 w2)^2")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--scale", type=float, default=4.0,
                        help="the rescaling factor a of the invariance check")
    parser.add_argument("--output-dir", default="examples/outputs")
    args = parser.parse_args(argv)

    paths = {(method, start): trajectory(start, lr=args.lr, steps=args.steps,
                                         **kwargs)
             for method, kwargs in SETTINGS.items() for start in START_POINTS}
    for (method, start), p in paths.items():
        print(f"{method:<4} from {start}: ends at ({p[-1][0]:.3f}, "
              f"{p[-1][1]:.3f}), loss {loss_fn(*p[-1]):.2e}")
    print()
    print(invariance_table(np.array([0.5, 1.2]), args.scale))

    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, "toy_trajectories.png")
    plot(paths, png)
    print(f"\nWrote {png}")


if __name__ == "__main__":
    main()
