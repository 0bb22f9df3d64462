"""Peak memory of one ASAM training step against the base step and a
two-pass floor.

A SAM-type step needs, beyond a plain step, one saved copy of the weights
(to restore w after the perturbed pass); GSAM keeps g as well, LookSAM one
direction the size of the weights. This script measures what each variant
actually holds, on an MLP large enough (about 30M parameters by default) for
its weights to dwarf its activations (batch 32 on 256 inputs), with SGD
without momentum (the optimizer holds no slots):

  base         the base optimizer alone (a plain keras.Model)
  floor        the two-pass floor: two gradients at w per step, the second
               applied; pass 2 depends on pass 1 through the gradient norm
               (so graph optimizers can neither prune nor merge the passes)
  sam          SAMModel
  asam         ASAMModel, element-wise
  asam_filter  ASAMModel(normalization="filterwise")
  sam_skip     SAMModel(non_finite_step="skip")
  asam_skip    ASAMModel(non_finite_step="skip"): no clean-gradient fallback
               when L(w + eps) is not finite (the update is skipped), so
               nothing needs g after the perturbed pass
  gsam         ASAMModel(gsam_alpha=0.3): keeps g for the descent direction
  looksam      ASAMModel(looksam_alpha=0.5, asam_every=5): keeps g_v, a
               variable the size of the weights
  gsam_skip, looksam_skip  the same with non_finite_step="skip"
  fsam         ASAMModel(variant=FriendlySAM()): keeps m, the moving average
               of g (1 P of state), and g until m is updated
  wsam         ASAMModel(variant=WSAM(0.9)) (decoupled): keeps g through
               pass 2 for the correction after the update
  msam         SAMModel(rho=3, variant=MomentumSAM(0.9)): one pass per step
               at w + eps, from its buffer v (1 P of state); compared with
               the plain step (`over base`), since it has no second pass
  fsam_skip, wsam_skip  fsam and wsam with non_finite_step="skip" (no
               clean-gradient fallback: what the fallback holds)
  saf          ASAMModel(variant=SAF(...)): one pass, a KL term against each
               example's recorded logits (a record of 1,024 examples x 4 x
               10, 160 KiB); compared with the plain step
  mesa         ASAMModel(variant=MESA()): one pass, a forward pass of the
               weights' average (1 P of state) and its update; compared
               with the plain step
  aesam        ASAMModel(variant=AESAM(...)) with thresholds that take the
               perturbed pass on every step (its dearer kind of step)

(the variants from fsam on need `keras_asam.variants`; a version of the
library without them reports them as skipped.)

each without and with `jit_compile=True`. Every measurement is one fresh
process (this script runs itself with `--child`), in one of three modes:

  tf   TF_CPU_ALLOCATOR_USE_BFC=true, so that TensorFlow counts the bytes its
       CPU allocator hands out: `tf.config.experimental.get_memory_info`
       gives the exact bytes of live tensors and their peak (variables,
       gradients, temporaries, constants held by the compiled step; not
       Python objects, graphs or compiled code). The primary measure.
  rss  The system allocator (TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1) and glibc's
       mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed
       tensors go back to the system at once: the resident set of the
       process as the system sees it (VmRSS, and VmHWM reset through
       /proc/self/clear_refs), which also counts traced graphs, compiled
       code and allocator slack.
  rss_pool  As rss, with TensorFlow's default CPU allocator on x86 builds
       with oneDNN (MklCPUAllocator): a BFC pool that never returns memory
       to the system, growing by doubling regions. Its resident set keeps
       the high-water mark of the pool, including pages touched while the
       weights were initialised, so it shows how one large step buffer
       (XLA's preallocated temporary) fits into that pool.

In a child, after building the model, `optimizer.build` and the data:
`fit` runs `--warmup-steps` steps (tracing, compiling; one-time costs), then
the peak counters are reset and `fit` runs `--steps` more. Reported, in
units of the model's parameter bytes P = 4 x parameters:

  state       memory held after building, before any step (weights; LookSAM
              also g_v)
  step        peak during the measured steps over the memory held after
              building: what a step adds at its peak, including anything
              the compiled step keeps allocated between steps
  kept        what stays allocated between steps (part of `step`)
  footprint   state + step
  over base   footprint - footprint of base
  over floor  footprint - footprint of floor

The allowed extra over the floor is the saved copy of the weights plus 10%
(SAM, ASAM); GSAM also keeps g through pass 2 (2.1 P); LookSAM keeps g
through pass 2 on its perturbed steps, since g_v = g_adv - (g . g_adv /
||g||^2) g needs g and g_adv at once, and g_v as its state (3.1 P);
Friendly-SAM and WSAM 2.1 P (m, or g through pass 2). Momentum-SAM may
hold 2.1 P over the base step (its buffer v and a saved copy of the
weights, plus 10%).

`--library DIR` runs the children so that they import the `keras_asam` of
another checkout (e.g. an earlier commit; `harness.library_dir`); the
report records that checkout's commit.

Each number is the minimum over `--repeats` processes (scheduling of the
executor's threads moves the peak of a step without XLA by up to ~0.3 P).
For comparison `first` is the brief's recipe on `ru_maxrss` (its growth
over the warm-up steps, tracing included), recorded in the rss mode.

    python -m benchmarks.memory          # about 50 minutes on 2 busy cores
    python -m benchmarks.memory --quick  # about a minute: small model, tf
                                         # mode, no XLA, one repeat
    python -m benchmarks.memory --render benchmarks/results/memory.json

Writes benchmarks/results/memory.json and .md (--quick: memory_quick.json
and .md) and prints the tables.
"""

import argparse
import ctypes
import json
import os
import resource
import subprocess
import time

from benchmarks import harness

ROOT = harness.ROOT
VARIANTS = ["base", "floor", "sam", "asam", "asam_filter", "sam_skip",
            "asam_skip", "gsam", "looksam", "gsam_skip", "looksam_skip",
            "fsam", "wsam", "msam", "fsam_skip", "wsam_skip", "saf", "mesa",
            "aesam"]
MODES = ["tf", "rss", "rss_pool"]
GSAM_ALPHA = 0.3
LOOKSAM_ALPHA, LOOKSAM_EVERY = 0.5, 5
FSAM_SIGMA, FSAM_LMBDA = 1.0, 0.9
WSAM_GAMMA = 0.9
MSAM_RHO, MSAM_MOMENTUM = 3.0, 0.9
SAF_EXAMPLES = 1024
# AE-SAM's threshold mu + c sigma with c far below: every step takes the
# perturbed pass.
AESAM_ALWAYS = -1e6
# The class in `keras_asam.variants` each of these variants needs.
VARIANT_CLASSES = {"fsam": "FriendlySAM", "wsam": "WSAM",
                   "msam": "MomentumSAM", "fsam_skip": "FriendlySAM",
                   "wsam_skip": "WSAM", "saf": "SAF", "mesa": "MESA",
                   "aesam": "AESAM"}
DEFAULT_LAYERS = [256, 2048, 4096, 4096, 1024]
QUICK_LAYERS = [64, 512, 1024, 1024, 256]
# What each variant may hold over the floor, in P (10% slack): the saved
# weights; GSAM also g through pass 2; LookSAM g through pass 2 (on its
# perturbed steps g_v = g_adv - (g . g_adv / ||g||^2) g needs both g and
# g_adv) and g_v, its state.
ALLOWED_OVER_FLOOR = {"sam": 1.1, "asam": 1.1, "asam_filter": 1.1,
                      "sam_skip": 1.1, "asam_skip": 1.1,
                      "gsam": 2.1, "looksam": 3.1, "gsam_skip": 2.1,
                      "looksam_skip": 3.1, "fsam": 2.1, "wsam": 2.1,
                      "fsam_skip": 2.1, "wsam_skip": 2.1, "aesam": 1.1}
# Variants with one pass per step: what they may hold over the base step
# (Momentum-SAM v and the saved weights; SAF 0.1 P besides its record; MESA
# its average and 0.2 P).
ALLOWED_OVER_BASE = {"msam": 2.1, "saf": 0.1, "mesa": 1.2}
QUANTITIES = ["state", "step", "kept", "first"]


# -- the child: one configuration, one process --------------------------------

def _status():
    """VmRSS and VmHWM (bytes) of this process, and ru_maxrss (bytes)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    values["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return values


def _trim():
    """Hands freed heap memory back to the system (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss():
    """Resets VmHWM to the current VmRSS (Linux >= 4.0); False if denied."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _tf_memory(tf, counting):
    """Live-tensor bytes and their peak from TensorFlow's counters (zeros
    when the allocator does not count)."""
    if not counting:
        return {"current": 0, "peak": 0}
    return tf.config.experimental.get_memory_info("CPU:0")


def _floor_class(keras, tf):
    class TwoPassFloor(keras.Model):
        """Two gradients at w per step, the second applied (as in
        step_time.py): pass 2 takes `x * (||g|| >= 0)`, bitwise x but
        dependent on pass 1, so neither pass can be pruned or merged."""

        def __init__(self, model, **kwargs):
            super().__init__(**kwargs)
            self.wrapped_model = model

        def call(self, inputs, training=None):
            return self.wrapped_model(inputs, training=training)

        def _gradients(self, x, y):
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                          training=True)
            return y_pred, loss, tape.gradient(loss,
                                               self.trainable_variables)

        def train_step(self, data):
            x, y = data
            y_pred, loss, first = self._gradients(x, y)
            self._loss_tracker.update_state(loss)
            norm = tf.linalg.global_norm(first)
            same_x = x * tf.cast(norm >= 0.0, x.dtype)
            _, _, second = self._gradients(same_x, y)
            self.optimizer.apply_gradients(
                zip(second, self.trainable_variables))
            return self.compute_metrics(x, y, y_pred)

    return TwoPassFloor


def _builders(keras_asam, floor, variant_class):
    """Each variant's model around the network `inner`."""
    asam, sam = keras_asam.ASAMModel, keras_asam.SAMModel
    skip = {"non_finite_step": "skip"}
    looksam = {"looksam_alpha": LOOKSAM_ALPHA, "asam_every": LOOKSAM_EVERY}

    def fsam(inner, **kwargs):
        return asam(inner, variant=variant_class(sigma=FSAM_SIGMA,
                                                 lmbda=FSAM_LMBDA), **kwargs)

    def wsam(inner, **kwargs):
        return asam(inner, variant=variant_class(WSAM_GAMMA), **kwargs)

    return {
        "base": lambda inner: inner,
        "floor": floor,
        "sam": sam,
        "asam": asam,
        "asam_filter": lambda i: asam(i, normalization="filterwise"),
        "sam_skip": lambda i: sam(i, **skip),
        "asam_skip": lambda i: asam(i, **skip),
        "gsam": lambda i: asam(i, gsam_alpha=GSAM_ALPHA),
        "looksam": lambda i: asam(i, **looksam),
        "gsam_skip": lambda i: asam(i, gsam_alpha=GSAM_ALPHA, **skip),
        "looksam_skip": lambda i: asam(i, **looksam, **skip),
        "fsam": fsam,
        "wsam": wsam,
        "fsam_skip": lambda i: fsam(i, **skip),
        "wsam_skip": lambda i: wsam(i, **skip),
        # The optimizer as for the others (no slots): `over base` is then
        # what Momentum-SAM itself holds.
        "msam": lambda i: sam(i, rho=MSAM_RHO,
                              variant=variant_class(MSAM_MOMENTUM)),
        "saf": lambda i: asam(i, variant=variant_class(
            num_examples=SAF_EXAMPLES, num_classes=10)),
        "mesa": lambda i: asam(i, variant=variant_class()),
        "aesam": lambda i: asam(i, variant=variant_class(
            10**9, lambda1=AESAM_ALWAYS, lambda2=AESAM_ALWAYS)),
    }


def _data(keras, np, tf, config):
    """One batch for the MLP of `config["layers"]`, repeated; for SAF the
    inputs carry each example's index."""
    keras.utils.set_random_seed(0)
    rs = np.random.RandomState(0)
    x = rs.rand(config["batch_size"], config["layers"][0]).astype("float32")
    y = rs.randint(0, 10, config["batch_size"])
    if config["variant"] == "saf":
        x = {"inputs": x, "sample_index": np.arange(config["batch_size"])}
    return tf.data.Dataset.from_tensors((x, y)).cache().repeat()


def _mlp(keras, layers):
    inputs = keras.Input((layers[0],))
    h = inputs
    for units in layers[1:]:
        h = keras.layers.Dense(units, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def _run_steps(model, data, steps, tf, counting):
    """Fits `steps` steps; their seconds, and the peaks after them."""
    start = time.perf_counter()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0,
              shuffle=False)
    return (time.perf_counter() - start, _status(),
            _tf_memory(tf, counting))


def child(config):
    """Builds one variant, runs its steps and returns the raw measurements
    (bytes)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_asam

    library = os.path.dirname(os.path.dirname(os.path.realpath(
        keras_asam.__file__)))
    needed = VARIANT_CLASSES.get(config["variant"])
    variant_class = getattr(getattr(keras_asam, "variants", None), needed,
                            None) if needed else None
    if needed and variant_class is None:
        return {"skipped": f"keras_asam.variants.{needed} is not in this "
                           "version of the library", "library": library}
    counting = config["mode"] == "tf"
    data = _data(keras, np, tf, config)
    _trim()
    before, tf_before = _status(), _tf_memory(tf, counting)
    inner = _mlp(keras, config["layers"])
    model = _builders(keras_asam, _floor_class(keras, tf), variant_class)[
        config["variant"]](inner)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),  # no momentum: no slots
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=config["jit"],
    )
    model.optimizer.build(model.trainable_variables)
    _trim()
    built, tf_built = _status(), _tf_memory(tf, counting)
    warmup_seconds, warm, tf_warm = _run_steps(
        model, data, config["warmup_steps"], tf, counting)
    _trim()
    if counting:
        tf.config.experimental.reset_memory_stats("CPU:0")
    reset = _reset_peak_rss()
    seconds, measured, tf_measured = _run_steps(model, data, config["steps"],
                                                tf, counting)
    _trim()
    after = _status()
    return {
        "library": library,
        "keras_asam_version": keras_asam.__version__,
        "params": inner.count_params(),
        # All but `iterations`.
        "optimizer_slots": len(model.optimizer.variables) - 1,
        "train_steps": int(model.optimizer.iterations.numpy()),
        "hwm_reset": reset,
        "warmup_seconds": warmup_seconds,
        "step_seconds": seconds / config["steps"],
        "rss": {"before": before["VmRSS"], "built": built["VmRSS"],
                "peak": measured["VmHWM"], "after": after["VmRSS"]},
        "maxrss": {"built": built["maxrss"], "warm": warm["maxrss"],
                   "measured": measured["maxrss"]},
        "tf": {"before": tf_before["current"], "built": tf_built["current"],
               "warmup_peak": tf_warm["peak"], "peak": tf_measured["peak"],
               "after": tf_measured["current"]},
    }


def quantities(raw, mode):
    """state, step, kept, first (bytes) from one child's raw numbers."""
    if mode == "tf":
        t = raw["tf"]
        return {"state": t["built"] - t["before"],
                "step": t["peak"] - t["built"],
                "kept": t["after"] - t["built"],
                "first": t["warmup_peak"] - t["built"]}
    r, m = raw["rss"], raw["maxrss"]
    return {"state": r["built"] - r["before"],
            "step": r["peak"] - r["built"] if raw["hwm_reset"] else None,
            "kept": r["after"] - r["built"],
            "first": m["warm"] - m["built"]}


# -- the parent: one child per variant x XLA x mode x repeat ------------------

def _child_env(config, directory):
    """The allocator settings of the child's mode."""
    env = harness.child_env(directory)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
    env.pop("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", None)
    if config["mode"] == "tf":
        env["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    else:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        if config["mode"] == "rss":
            env["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] = "1"
    return env


def run_child(config):
    """One measurement in a fresh process (`python -m benchmarks.memory
    --child CONFIG`), importing the `keras_asam` of `config["library"]`
    (default: this repository's)."""
    with harness.library_dir(config.get("library")) as directory:
        result = subprocess.run(
            harness.module_command("memory", "--child", json.dumps(config)),
            env=_child_env(config, directory), cwd=directory,
            capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines()
             if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(
            f"child {config} failed ({result.returncode}):\n"
            + result.stderr[-3000:])
    return json.loads(lines[-1])


def summarize(runs, variants):
    """Minimum over repeats of each quantity, in units of P, per XLA setting
    and mode, plus the footprints' differences to base and floor."""
    summary = {}
    for jit in sorted({r["jit"] for r in runs}):
        for mode in [m for m in MODES if any(r["mode"] == m for r in runs)]:
            rows = {}
            for variant in variants:
                mine = [r for r in runs if r["jit"] == jit
                        and r["mode"] == mode and r["variant"] == variant]
                if not mine:
                    continue
                unit = 4.0 * mine[0]["raw"]["params"]
                row = {"repeats": len(mine)}
                for q in QUANTITIES:
                    values = [r["quantities"][q] for r in mine
                              if r["quantities"][q] is not None]
                    row[q] = min(values) / unit if values else None
                    row[q + "_max"] = max(values) / unit if values else None
                row["footprint"] = (None if row["step"] is None
                                    else row["state"] + row["step"])
                row["step_seconds"] = min(r["raw"]["step_seconds"]
                                          for r in mine)
                rows[variant] = row
            for row in rows.values():
                for ref in ("base", "floor"):
                    other = rows.get(ref, {}).get("footprint")
                    row["over_" + ref] = (
                        None if other is None or row["footprint"] is None
                        else row["footprint"] - other)
            key = f"{'xla' if jit else 'no_xla'}/{mode}"
            summary[key] = rows
    return summary


def _p(value):
    if value is None:
        return "n/a"
    return f"{0.0 if abs(value) < 0.005 else value:.2f}"


LEGEND = (
    "state: memory held after building (weights; LookSAM also g_v). "
    "step: peak during the measured steps over that, including what "
    "the compiled step keeps allocated between steps (kept). "
    "footprint = state + step; over base, over floor: footprint minus "
    "theirs. allowed: over the floor, the saved weights (GSAM, WSAM "
    "also g, F-SAM also m, LookSAM also g and g_v), plus 10%; over "
    "base for Momentum-SAM (one pass): v and the saved weights, plus "
    "10%; over base for SAF (one pass): 0.1 P besides its record, and for "
    "MESA its average and 0.2 P; AE-SAM, taking the perturbed pass on "
    "every step, as ASAM.")
MODE_TITLES = {
    "tf": "TensorFlow's allocator counters (bytes of live tensors)",
    "rss": "resident set of the process (VmHWM, VmRSS), system allocator",
    "rss_pool": "resident set of the process (VmHWM, VmRSS), "
                "TensorFlow's default oneDNN pool allocator",
}


def _verdict(variant, row):
    allowed, over = ALLOWED_OVER_FLOOR.get(variant), "floor"
    if variant in ALLOWED_OVER_BASE:
        allowed, over = ALLOWED_OVER_BASE[variant], "base"
    if allowed is None or row["over_" + over] is None:
        return ""
    return (f"{allowed:.1f} over {over} "
            + ("met" if row["over_" + over] <= allowed else "**missed**"))


def _mode_table(key, rows, params):
    """The table of one XLA setting and mode."""
    xla, mode = key.split("/")
    lines = [f"**{'With' if xla == 'xla' else 'Without'} XLA, "
             f"{MODE_TITLES[mode]}**, in P = {4 * params / 2**20:.1f} "
             "MiB (min over repeats; range of `step` in brackets):", "",
             "| variant | state | step | kept | footprint | over base "
             "| over floor | allowed |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in rows.items():
        step = _p(row["step"])
        if row["repeats"] > 1 and row["step"] is not None:
            step += f" [{_p(row['step_max'])}]"
        lines.append(
            f"| {variant} | {_p(row['state'])} | {step} | "
            f"{_p(row['kept'])} | {_p(row['footprint'])} | "
            f"{_p(row['over_base'])} | {_p(row['over_floor'])} | "
            f"{_verdict(variant, row)} |")
    return lines + [""]


def _first_table(summary):
    """`ru_maxrss` growth over the warm-up steps (rss mode), if measured."""
    firsts = [(key, rows) for key, rows in summary.items()
              if key.endswith("/rss")]
    if not firsts:
        return []
    lines = ["`ru_maxrss` growth over the warm-up steps (tracing and "
             "compilation included), in P, min over repeats:", "",
             "| XLA | " + " | ".join(firsts[0][1]) + " |",
             "|---|" + "---|" * len(firsts[0][1])]
    for key, rows in firsts:
        lines.append(f"| {'on' if key.startswith('xla') else 'off'} | "
                     + " | ".join(_p(r["first"]) for r in rows.values())
                     + " |")
    return lines + [""]


def _footer(report):
    arguments, params = report["arguments"], report.get("params")
    versions, commit = report["versions"], harness.commit_of(report)
    changed = harness.library_changes_of(report)
    at_end = report.get("commit_at_end")
    footer = (f"TensorFlow {versions['tensorflow']}, Keras "
              f"{versions['keras']}, {harness.cpu_count_of(report)} CPU "
              f"cores, commit {commit[:10]}"
              + (f" (at the end {str(at_end)[:10]})"
                 if at_end not in (None, report.get("commit")) else "")
              + (" + uncommitted " + ", ".join(
                  line.split()[-1] for line in changed) if changed else "")
              + (f" (library from {arguments['library']})"
                 if arguments.get("library") else "")
              + f", MLP {'-'.join(map(str, arguments['layers']))}-10 "
              f"({params:,} parameters), batch {arguments['batch_size']}, "
              f"{arguments['warmup_steps']} + {arguments['steps']} steps, "
              f"{arguments['repeats']} repeats")
    if arguments.get("setup"):  # Runs of earlier versions of this script.
        footer += f", setup {os.path.basename(arguments['setup'])}"
    if report.get("wall_seconds") is not None:
        footer += f", {report['wall_seconds'] / 60:.1f} minutes in all"
    return footer + "."


def render_markdown(report):
    """Markdown tables of a results report (as written to the JSON)."""
    lines = [LEGEND, ""]
    for key, rows in report["summary"].items():
        lines += _mode_table(key, rows, report.get("params"))
    if report.get("skipped"):
        lines += ["Skipped: " + "; ".join(
            f"{v}: {reason}" for v, reason in report["skipped"].items())
            + ".", ""]
    lines += _first_table(report["summary"])
    lines.append(_footer(report))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Measures every variant in its own process; see the module "
               "docstring for what the columns mean.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="processes per variant, XLA setting and mode "
                             "(default 3; the minimum is reported)")
    parser.add_argument("--warmup-steps", type=int, default=LOOKSAM_EVERY,
                        help="steps before the measurement (tracing, "
                             "compiling; default 5)")
    parser.add_argument("--steps", type=int, default=LOOKSAM_EVERY,
                        help="measured steps (default 5: one perturbed step "
                             "of LookSAM)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, nargs="+",
                        default=DEFAULT_LAYERS,
                        help="input size and hidden widths of the MLP "
                             "(default: %(default)s; 10 outputs)")
    parser.add_argument("--jit", choices=["off", "on", "both"],
                        default="both")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES,
                        help="tf: TensorFlow's counters (BFC allocator); "
                             "rss: resident set, system allocator; "
                             "rss_pool: resident set, TensorFlow's default "
                             "pool allocator (default: all)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=VARIANTS, metavar="VARIANT",
                        help="measure only these (default: all of "
                             + ", ".join(VARIANTS) + ")")
    parser.add_argument("--library", default=None, metavar="DIR",
                        help="a checkout whose keras_asam the children "
                             "import (default: this repository's)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of about a minute: MLP "
                             + "-".join(map(str, QUICK_LAYERS))
                             + "-10, tf mode, no XLA, one repeat; writes "
                               "memory_quick.json/.md")
    parser.add_argument("--output", default=None,
                        help="results JSON (default "
                             "benchmarks/results/memory.json)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="only print the Markdown tables of a results "
                             "JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.modes, args.jit, args.repeats = (
            QUICK_LAYERS, ["tf"], "off", 1)
    args.output = args.output or harness.results_path(
        "memory_quick" if args.quick else "memory")
    if args.library:
        args.library = os.path.abspath(args.library)
    args.variants = [v for v in VARIANTS if v in args.variants]
    if "saf" in args.variants and args.batch_size > SAF_EXAMPLES:
        parser.error(f"--batch-size must be at most {SAF_EXAMPLES} (SAF's "
                     f"record) with the saf variant. Received: "
                     f"{args.batch_size}")
    return args


def _configs(args):
    """Every child's configuration, in the order they run."""
    variants = [v for v in VARIANTS if v in args.variants]
    modes = [m for m in MODES if m in args.modes]
    jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    return [(repeat, {"variant": variant, "jit": jit, "mode": mode,
                      "layers": args.layers, "batch_size": args.batch_size,
                      "warmup_steps": args.warmup_steps,
                      "steps": args.steps, "library": args.library})
            for repeat in range(args.repeats) for jit in jits
            for mode in modes for variant in variants]


def measure_all(configs):
    """Runs every child; the runs and the variants skipped (with why)."""
    runs, skipped = [], {}
    for repeat, config in configs:
        variant, mode = config["variant"], config["mode"]
        if variant in skipped:
            continue
        child_start = time.perf_counter()
        raw = run_child(config)
        if "skipped" in raw:
            skipped[variant] = raw["skipped"]
            print(f"{variant}: skipped ({raw['skipped']})", flush=True)
            continue
        q = quantities(raw, mode)
        unit = 4.0 * raw["params"]
        runs.append({"variant": variant, "jit": config["jit"], "mode": mode,
                     "repeat": repeat, "quantities": q, "raw": raw,
                     "wall_seconds": time.perf_counter() - child_start})
        print(f"[{len(runs)}/{len(configs)}] repeat {repeat} XLA "
              f"{'on' if config['jit'] else 'off'} {mode} {variant}: "
              + ", ".join(f"{k} {_p(None if v is None else v / unit)}"
                          for k, v in q.items())
              + f" P ({runs[-1]['wall_seconds']:.0f} s)", flush=True)
    return runs, skipped


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.render:
        report = harness.load(args.render)
        report["summary"] = summarize(report["runs"], VARIANTS)
        print(render_markdown(report), end="")
        return
    record = harness.provenance(args, checkout=args.library or ROOT)
    start = time.perf_counter()
    runs, skipped = measure_all(_configs(args))
    # The library as the children imported it (`--library`).
    record["versions"]["keras_asam"] = runs[0]["raw"]["keras_asam_version"]
    report = {
        **record,
        "commit_at_end": harness.git("rev-parse", "HEAD",
                                     cwd=args.library or ROOT),
        "params": runs[0]["raw"]["params"],
        "parameter_bytes": 4 * runs[0]["raw"]["params"],
        "allowed_over_floor": ALLOWED_OVER_FLOOR,
        "wall_seconds": time.perf_counter() - start,
        "summary": summarize(runs, args.variants),
        "skipped": skipped,
        "runs": runs,
    }
    markdown_text = render_markdown(report)
    print("\nPeak memory of a training step, in parameter bytes P\n")
    print(markdown_text)
    harness.write_results(report, args.output, markdown_text)


if __name__ == "__main__":
    main()
