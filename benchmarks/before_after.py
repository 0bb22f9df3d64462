"""Step time and memory of two versions of keras_asam, measured in one run.

`--before DIR` is a checkout of the earlier version (e.g. `git worktree add
/tmp/before 94c68a4`); the later one is `--after DIR`, by default this
repository's `keras_asam` (its working tree: pin a checkout if the tree
may change during the run; each process records the commits it imported).
Per backend, one
process (`python -m benchmarks.before_after --backend NAME`) imports both:
the earlier package is copied to a temporary directory (outside the
repository) as `keras_asam_before`, with every `keras_asam` in its sources
renamed, so its imports resolve to the copy and its Keras registrations
(`package="keras_asam"`) do not collide with the later version's; the
children run from that directory, which also links the later `keras_asam`. Both
build the same variants, and each variant's two versions are timed
interleaved, before and after in turn in every round (their order reversed
in every other round), the same way as `step_time.py` (a callback
bracketing each compiled step inside `fit` over a cached, repeated
`tf.data` dataset; a variant's time in a round is its mean step time).
`base` and `floor` do not depend on the library and are built once. A
third copy of ASAM (`asam` of the later version, built again: `asam_aa`)
runs in the same rounds as an A/A control: its ratio to `asam` is what two
identical steps read on these cores.

Reported per backend, model and XLA setting, for each variant: the median
over rounds of each version's step time, after/before as the median of the
per-round ratios (and their range over rounds), and the ratios of
`step_time.py` (asam/floor, gsam/asam, looksam5/base, sam/floor) for each
version; wall and process CPU time.

Memory: `memory.py`'s children (one process per measurement), the earlier
and the later version alternately (`memory.py --library`), at the sizes of
`memory.py --quick` (small MLP, live tensors, no XLA), `--memory-repeats`
repeats each, minimum reported; a variant whose class one version lacks
(`memory.VARIANT_CLASSES`) is reported as not measured.

    python -m benchmarks.before_after --before /tmp/before
    python -m benchmarks.before_after --before /tmp/before --after /tmp/after
    python -m benchmarks.before_after --before /tmp/before --backends jax \\
        --no-memory
    python -m benchmarks.before_after --render \\
        benchmarks/results/before_after.json

Writes benchmarks/results/before_after.json and .md (each backend's
process also `before_after.<backend>.json`).
"""

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time

from benchmarks import harness

ROOT = harness.ROOT
BACKENDS = ["tensorflow", "jax", "torch"]
# Variants from the library, per backend; base and floor are always timed.
DEFAULT_VARIANTS = {"tensorflow": ["sam", "asam", "gsam", "looksam5"],
                    "jax": ["sam", "asam", "gsam", "looksam5"],
                    "torch": ["sam", "asam"]}
# The ratios of step_time.py compared between the versions.
RATIOS = [("asam/floor", "asam", "floor"), ("sam/floor", "sam", "floor"),
          ("gsam/asam", "gsam", "asam"), ("looksam5/base", "looksam5", "base")]
VERSIONS = ["before", "after"]
AA = "asam_aa"  # A second copy of the later ASAM: the A/A control.


def source(before, after=None):
    """Commits and uncommitted library files of both checkouts."""
    return {name: {"path": path, **harness.source(path)}
            for name, path in (("before", before), ("after", after or ROOT))}


def copy_renamed(before, destination):
    """Copies `before`/keras_asam to `destination`/keras_asam_before with
    every `keras_asam` in its Python sources renamed."""
    target = os.path.join(destination, "keras_asam_before")
    shutil.copytree(os.path.join(before, "keras_asam"), target,
                    ignore=shutil.ignore_patterns("__pycache__"))
    pattern = re.compile(r"\bkeras_asam\b")
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(pattern.sub("keras_asam_before", text))
    return target


@contextlib.contextmanager
def staged(before, after=None):
    """A temporary directory holding the earlier package, renamed, and a
    link to the later `keras_asam`: the children run from it."""
    with tempfile.TemporaryDirectory(prefix="keras_asam_before_") as tmp:
        copy_renamed(before, tmp)
        os.symlink(os.path.join(after or ROOT, "keras_asam"),
                   os.path.join(tmp, "keras_asam"))
        yield tmp


def _median(values):
    import numpy as np

    return float(np.median(values)) if values else None


def _quartiles(values):
    import numpy as np

    return [float(q) for q in np.percentile(values, [0, 25, 75, 100])]


# -- one backend, one process -------------------------------------------------

def run_backend(args):
    """Times both versions on the backend of this process (a child run from
    a `staged` directory)."""
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # What this process imports (a working tree may move during a run).
    imported = source(args.before, args.after)
    import keras
    import keras_asam_before

    import keras_asam
    from benchmarks import step_time

    assert os.path.samefile(
        os.path.dirname(os.path.dirname(os.path.realpath(
            keras_asam_before.__file__))), os.getcwd())
    assert os.path.samefile(
        os.path.dirname(os.path.dirname(os.path.realpath(
            keras_asam.__file__))), args.after or ROOT)
    report = _time_backend(args, keras, step_time,
                           {"before": keras_asam_before,
                            "after": keras_asam})
    report["source"] = imported
    return report


def _models(args, step_time, libs, setting, variants):
    """base, floor, each variant before and after, and the A/A copy; and
    the groups timed together (alternating their order)."""
    models = {v: step_time.build(v, *setting, batch_size=args.batch_size)
              for v in ["base", "floor"]}
    groups = []
    for v in variants:
        group = []
        for version in VERSIONS:
            key = f"{version}:{v}"
            models[key] = step_time.build(v, *setting,
                                          batch_size=args.batch_size,
                                          lib=libs[version])
            group.append(key)
        if v == "asam" and args.aa:
            models[AA] = step_time.build(v, *setting,
                                         batch_size=args.batch_size,
                                         lib=libs["after"])
            group.append(AA)
        groups.append(group)
    return models, groups


def _time_setting(args, step_time, libs, setting, variants, backend):
    """The record of one (architecture, XLA) setting."""
    architecture, _, jit = setting
    slow = architecture == "cnn" and (jit or backend == "torch")
    steps = args.slow_steps if slow else args.steps
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    data = step_time.dataset(args.batch_size)
    models, groups = _models(args, step_time, libs, setting, variants)
    per_round, per_round_cpu = step_time.time_interleaved(
        models, data, args.rounds, lambda key: steps, alternate=groups)
    result = {
        "architecture": architecture, "width": 1, "jit": jit,
        "compiled_as": step_time.compile_mode(backend, jit),
        "steps": steps, "params": models["base"].count_params(),
        "per_round_seconds": per_round,
        "per_round_cpu_seconds": per_round_cpu,
        "wall_seconds": time.perf_counter() - start,
        "load_average": [load_before, os.getloadavg()[0]],
    }
    result.update(summarize_setting(per_round, per_round_cpu, variants))
    med = result["median_step_seconds"]
    print(f"{backend} {architecture} XLA {'on' if jit else 'off'} "
          f"({result['wall_seconds']:.0f} s, load "
          f"{load_before:.1f}-{os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{k} {1000 * t:.1f} ms" for k, t in med.items()),
          flush=True)
    for v, r in result["after_over_before"].items():
        print(f"  {v}: after/before wall {r['wall']:.3f} "
              f"[{r['wall_range'][0]:.3f}-{r['wall_range'][-1]:.3f}]"
              f", CPU {r['cpu']:.3f}", flush=True)
    return result


def _time_backend(args, keras, step_time, libs):
    backend = keras.backend.backend()
    jits = {"tensorflow": [False, True], "jax": [True],
            "torch": [False]}[backend]
    if args.jit != "auto":
        jits = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    variants = args.variants or DEFAULT_VARIANTS[backend]
    start = time.perf_counter()
    results = [_time_setting(args, step_time, libs, (architecture, 1, jit),
                             variants, backend)
               for architecture in args.architectures for jit in jits]
    versions = {**harness.versions(),
                "keras_asam_before": libs["before"].__version__,
                "keras_asam_after": libs["after"].__version__}
    return {"backend": backend, "versions": versions, "results": results,
            "variants": variants,
            "wall_seconds": time.perf_counter() - start}


def summarize_setting(per_round, per_round_cpu, variants):
    """Medians, per-round after/before ratios and each version's ratios."""
    out = {"median_step_seconds": {k: _median(v)
                                   for k, v in per_round.items()},
           "median_step_cpu_seconds": {k: _median(v)
                                       for k, v in per_round_cpu.items()},
           "after_over_before": {}, "ratios": {}}
    pairs = [(v, f"before:{v}", f"after:{v}") for v in variants]
    if AA in per_round:
        pairs.append((f"{AA} (A/A)", "after:asam", AA))
    for name, first, second in pairs:
        entry = {}
        for label, rounds in [("wall", per_round), ("cpu", per_round_cpu)]:
            paired = [b / a for a, b in zip(rounds[first], rounds[second])]
            entry[label] = _median(paired)
            entry[label + "_range"] = _quartiles(paired)
            entry[label + "_per_round"] = paired
        out["after_over_before"][name] = entry
    for version in VERSIONS:
        ratios = {}
        for name, numerator, denominator in RATIOS:
            keys = [k if k in ("base", "floor") else f"{version}:{k}"
                    for k in (numerator, denominator)]
            if not all(k in per_round for k in keys):
                continue
            entry = {}
            for label, rounds in [("wall", per_round),
                                  ("cpu", per_round_cpu)]:
                # Median of the medians' ratio (as step_time.py) and of the
                # per-round ratios.
                entry[label] = (_median(rounds[keys[0]])
                                / _median(rounds[keys[1]]))
                entry[label + "_paired"] = _median(
                    [a / b for a, b in zip(rounds[keys[0]],
                                           rounds[keys[1]])])
            ratios[name] = entry
        out["ratios"][version] = ratios
    return out


# -- memory: memory.py's children, before and after alternately -------------

def run_memory(args):
    from benchmarks import memory

    variants = [v for v in memory.VARIANTS
                if not args.memory_variants or v in args.memory_variants]
    libraries = {"before": args.before, "after": args.after or ROOT}
    layers = args.memory_layers or memory.QUICK_LAYERS
    jits = {"off": [False], "on": [True],
            "both": [False, True]}[args.memory_jit]
    runs = {version: [] for version in VERSIONS}
    skipped = {}
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]
    for repeat in range(args.memory_repeats):
        for jit, variant in [(j, v) for j in jits for v in variants]:
            order = VERSIONS if repeat % 2 == 0 else VERSIONS[::-1]
            for version in order:
                config = {"variant": variant, "jit": jit, "mode": "tf",
                          "layers": layers,
                          "batch_size": 32,
                          "warmup_steps": memory.LOOKSAM_EVERY,
                          "steps": memory.LOOKSAM_EVERY,
                          "library": libraries[version]}
                raw = memory.run_child(config)
                assert os.path.samefile(raw["library"], libraries[version])
                if "skipped" in raw:
                    # A variant whose class one version lacks.
                    skipped[variant] = raw["skipped"]
                    continue
                runs[version].append({
                    "variant": variant, "jit": jit, "mode": "tf",
                    "repeat": repeat,
                    "quantities": memory.quantities(raw, "tf"), "raw": raw})
                unit = 4.0 * raw["params"]
                q = runs[version][-1]["quantities"]
                print(f"memory repeat {repeat} XLA {'on' if jit else 'off'} "
                      f"{variant} {version}: step "
                      f"{q['step'] / unit:.2f} P", flush=True)
        loads.append(os.getloadavg()[0])
    summary = {version: memory.summarize(runs[version], variants)
               for version in VERSIONS}
    return {"variants": variants, "layers": layers,
            "repeats": args.memory_repeats, "summary": summary,
            "runs": runs, "skipped": skipped,
            "params": runs["after"][0]["raw"]["params"],
            "load_average": [min(loads), max(loads)],
            "wall_seconds": time.perf_counter() - start}


# -- the report ----------------------------------------------------------------

def _r(value):
    return "n/a" if value is None else f"{value:.3f}"


def _paired_table(report):
    """after/before per variant, wall / CPU."""
    lines = []
    lines += ["Step time, after/before: median over rounds of the per-round "
              "ratio, wall / process CPU time; in brackets the "
              "interquartile range of the per-round wall ratios. `asam_aa "
              "(A/A)`: a second copy of the later ASAM over the first (what "
              "identical steps read).", ""]
    names = []
    for b in report["backends"].values():
        for r in b.get("results", []):
            for name in r["after_over_before"]:
                if name not in names:
                    names.append(name)
    lines += ["| model | backend | compiled as | " + " | ".join(names)
              + " |", "|---|---|---|" + "---|" * len(names)]
    for backend, b in report["backends"].items():
        for r in b.get("results", []):
            cells = []
            for name in names:
                e = r["after_over_before"].get(name)
                cells.append("n/a" if e is None else
                             f"{e['wall']:.2f} / {e['cpu']:.2f} "
                             f"[{e['wall_range'][1]:.2f}-"
                             f"{e['wall_range'][2]:.2f}]")
            lines.append(f"| {r['architecture']} | {backend} | "
                         f"{r['compiled_as']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _ratio_table(report):
    """step_time's ratios for each version."""
    lines = []
    ratio_names = [n for n, _, _ in RATIOS]
    lines += ["Ratios of step_time.py for each version (ratio of the "
              "medians), wall / CPU, before -> after:", "",
              "| model | backend | compiled as | " + " | ".join(ratio_names)
              + " |", "|---|---|---|" + "---|" * len(ratio_names)]
    for backend, b in report["backends"].items():
        for r in b.get("results", []):
            cells = []
            for name in ratio_names:
                before = r["ratios"]["before"].get(name)
                after = r["ratios"]["after"].get(name)
                cells.append("n/a" if before is None or after is None else
                             f"{before['wall']:.2f} / {before['cpu']:.2f} "
                             f"-> {after['wall']:.2f} / {after['cpu']:.2f}")
            lines.append(f"| {r['architecture']} | {backend} | "
                         f"{r['compiled_as']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _median_table(report):
    """Each version's median step times."""
    lines = []
    lines += ["Median step time in ms (wall), before -> after:", ""]
    keys = ["base", "floor"]
    for b in report["backends"].values():
        keys += [v for v in b.get("variants", []) if v not in keys]
    lines += ["| model | backend | compiled as | " + " | ".join(keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for backend, b in report["backends"].items():
        for r in b.get("results", []):
            med = r["median_step_seconds"]
            cells = []
            for k in keys:
                if k in med:
                    cells.append(f"{1000 * med[k]:.1f}")
                elif f"before:{k}" in med:
                    cells.append(f"{1000 * med[f'before:{k}']:.1f} -> "
                                 f"{1000 * med[f'after:{k}']:.1f}")
                else:
                    cells.append("n/a")
            lines.append(f"| {r['architecture']} | {backend} | "
                         f"{r['compiled_as']} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _backend_lines(report):
    """One line per backend's process."""
    lines = []
    for backend, b in report["backends"].items():
        if "results" not in b:
            lines.append(f"- {backend}: failed ({b.get('error')}).")
            continue
        loads = [x for r in b["results"] for x in r["load_average"]]
        v = b["versions"]
        engine = {"tensorflow": "TensorFlow " + v["tensorflow"],
                  "jax": "JAX " + v.get("jax", "?"),
                  "torch": "PyTorch " + v.get("torch", "?")}[backend]
        steps = sorted({r["steps"] for r in b["results"]})
        imported = b.get("source", {}).get("after", {})
        lines.append(
            f"- {backend}: {engine}, Keras {v['keras']}, "
            + (f"after = {str(imported['commit'])[:7]}"
               + (" + uncommitted " + ", ".join(
                   harness.library_changes_of(imported))
                  if harness.library_changes_of(imported) else "") + ", "
               if imported else "")
            + f"{report['arguments']['rounds']} rounds of "
            + (f"{steps[0]} steps" if len(steps) == 1 else
               ", ".join(f"{r['steps']} ({r['architecture']}, "
                         f"{r['compiled_as']})" for r in b["results"])
               + " steps")
            + f", batch {report['arguments']['batch_size']}, "
            f"{b['wall_seconds'] / 60:.1f} minutes, 1-minute load average "
            f"{min(loads):.1f}-{max(loads):.1f}.")
    lines.append("")
    return lines


def _render_steps(report):
    """The step-time tables of `render`."""
    return (_paired_table(report) + _ratio_table(report)
            + _median_table(report) + _backend_lines(report))


def render(report):
    lines = []
    src = report["source"]
    end = str(report.get("source_at_end", src)["after"]["commit"])
    lines.append(
        f"Before: {str(src['before']['commit'])[:7]} (as the package "
        f"`keras_asam_before`), after: {str(src['after']['commit'])[:7]}"
        + (" with uncommitted library files "
           + ", ".join(harness.library_changes_of(src["after"]))
           if harness.library_changes_of(src["after"]) else "")
        + (f" (at the end of the run {end[:7]}: the later version moved "
           "during the run"
           + ("; each backend's line says what it imported"
              if any("source" in b for b in report["backends"].values())
              else "") + ")"
           if end and end != src["after"]["commit"] else "")
        + "; one process per backend, both versions interleaved in every "
        "round.")
    lines.append("")
    if any("results" in b for b in report["backends"].values()):
        lines += _render_steps(report)
    if report.get("memory"):
        m = report["memory"]
        summaries = m["summary"]
        if "before" in summaries and "base" in summaries["before"]:
            # Written before XLA settings were options: no XLA only.
            summaries = {v: {"no_xla/tf": s} for v, s in summaries.items()}
        for key in summaries["after"]:
            lines += [
                "Memory (`memory.py`'s children, before and after "
                f"alternately, MLP {'-'.join(map(str, m['layers']))}-10, "
                f"{m['params']:,} parameters, live tensors from "
                "TensorFlow's allocator counters, "
                + ("with" if key.startswith("xla") else "no") + " XLA, "
                f"min over {m['repeats']} repeats), in P:", "",
                "| variant | footprint before | after | after - before | "
                "over floor before | after |", "|---|---|---|---|---|---|"]
            for variant in m["variants"]:
                before = summaries["before"].get(key, {}).get(variant)
                after = summaries["after"][key].get(variant)
                if before is None or after is None:
                    continue
                lines.append(
                    f"| {variant} | {before['footprint']:.2f} | "
                    f"{after['footprint']:.2f} | "
                    f"{after['footprint'] - before['footprint']:+.2f} | "
                    f"{_p(before['over_floor'])} | "
                    f"{_p(after['over_floor'])} |")
            lines.append("")
        lines += [f"Not measured: {variant} ({reason})."
                  for variant, reason in m.get("skipped", {}).items()]
        lines += [f"Memory: {m['wall_seconds'] / 60:.1f} minutes, "
                  f"1-minute load average {m['load_average'][0]:.1f}-"
                  f"{m['load_average'][1]:.1f}.", ""]
    lines.append(
        f"{report['machine']['cpu_count']} CPU cores, "
        f"{report['wall_seconds'] / 60:.1f} minutes in all.")
    return "\n".join(lines) + "\n"


def _p(value):
    return "n/a" if value is None else f"{value:.2f}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default=None,
                        help="a checkout of the earlier version (its "
                             "keras_asam/ is copied and renamed)")
    parser.add_argument("--after", default=None,
                        help="a checkout of the later version (default: the "
                             "keras_asam this Python imports, i.e. this "
                             "repository's working tree); pin one, e.g. "
                             "`git worktree add /tmp/after HEAD`, if the "
                             "working tree may change during the run")
    parser.add_argument("--backends", nargs="*", choices=BACKENDS,
                        default=BACKENDS,
                        help="step time on these (none: memory only)")
    parser.add_argument("--architectures", nargs="+", default=["cnn", "mlp"])
    parser.add_argument("--jit", choices=["auto", "off", "on", "both"],
                        default="auto",
                        help="auto: both on TensorFlow, on for JAX, off "
                             "for PyTorch")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="library variants of step_time.py (default: "
                             "sam asam gsam looksam5; sam asam on torch)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--slow-steps", type=int, default=5,
                        help="steps per round where a step is slow (the CNN "
                             "with XLA, and on PyTorch)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-aa", dest="aa", action="store_false",
                        help="without the A/A control (a second later ASAM)")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--memory-repeats", type=int, default=2)
    parser.add_argument("--memory-layers", type=int, nargs="+", default=None,
                        help="the MLP of the memory children (default: "
                             "memory.py --quick's)")
    parser.add_argument("--memory-jit", choices=["off", "on", "both"],
                        default="off")
    parser.add_argument("--memory-variants", nargs="+", default=None,
                        help="default: every variant of memory.py that both "
                             "versions have")
    parser.add_argument("--output",
                        default=harness.results_path("before_after"))
    parser.add_argument("--render", metavar="JSON", default=None)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        return args
    if args.before is None:
        parser.error("--before DIR is required")
    args.before = os.path.abspath(args.before)
    if args.after:
        args.after = os.path.abspath(args.after)
    return args


def _passed(args):
    """The arguments every backend's child gets."""
    passed = ["--before", args.before, *(["--after", args.after]
                                         if args.after else []),
              "--rounds", args.rounds, "--steps", args.steps,
              "--slow-steps", args.slow_steps,
              "--batch-size", args.batch_size, "--jit", args.jit,
              "--architectures", *args.architectures]
    if args.variants:
        passed += ["--variants", *args.variants]
    if not args.aa:
        passed.append("--no-aa")
    return passed


def run_backends(args, stem):
    """One child per backend, run from a `staged` directory; their reports
    by backend."""
    reports = {}
    with staged(args.before, args.after) as directory:
        for backend in args.backends:
            child_output = f"{stem}.{backend}.json"
            command = harness.module_command(
                "before_after", "--backend", backend, "--output",
                child_output, *_passed(args))
            print("$", " ".join(command[1:]), flush=True)
            done = subprocess.run(command, cwd=directory, env=harness.child_env(
                directory, KERAS_BACKEND=backend))
            reports[backend] = (
                harness.load(child_output) if done.returncode == 0
                else {"error": f"exit status {done.returncode}"})
    return reports


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        print(render(harness.load(args.render)), end="")
        return
    if args.backend:  # A child: one backend.
        harness.dump_json(run_backend(args), args.output)
        return
    start = time.perf_counter()
    report = {**harness.provenance(args, checkout=args.after or ROOT),
              "source": source(args.before, args.after)}
    stem = os.path.splitext(args.output)[0]
    report["backends"] = run_backends(args, stem)
    if args.memory:
        report["memory"] = run_memory(args)
    report["source_at_end"] = source(args.before, args.after)
    report["wall_seconds"] = time.perf_counter() - start
    text = render(report)
    print()
    print(text)
    harness.write_results(report, args.output, text)


if __name__ == "__main__":
    main()
