"""Smoke tests: every example runs end to end with tiny settings."""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SCRIPTS = ["quickstart.py", "toy_trajectories.py", "tfhub_finetune.py",
           "multiworker.py", "cifar.py", "custom_loop.py", "sharded.py"]
# Benchmarks run as modules of the `benchmarks` package, from the root.
MODULES = ["benchmarks.step_time"]


def _run(script, *args, timeout=600, env=None):
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env=None if env is None else dict(os.environ, **env),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _import_example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Runs examples/quickstart.py as `python examples/quickstart.py ARGS` would,
# then prints which of the heavy modules the process imported.
_QUICKSTART_THEN_MODULES = """
import runpy, sys
path = sys.argv[1]
sys.argv = sys.argv[1:]
try:
    scope = runpy.run_path(path, run_name="__main__")
except SystemExit as exit:
    print("exit code:", exit.code)
    scope = None
if scope is not None and scope["keras"].backend.backend() != "tensorflow":
    # Without TensorFlow's seeding the weights still follow the seed.
    def weights(seed):
        scope["set_seed"](seed)
        return [w.tolist() for w in scope["build_network"]().get_weights()]
    print("same weights for a seed:", weights(3) == weights(3),
          "other seed:", weights(3) == weights(4))
print("imported:", sorted(name for name in
                          ("tensorflow", "keras", "jax", "keras_asam")
                          if name in sys.modules))
"""


def _run_quickstart(*args, env=None, expect_exit=0):
    """(stdout, stderr, modules imported) of the quickstart with ARGS."""
    done = subprocess.run(
        [sys.executable, "-c", _QUICKSTART_THEN_MODULES,
         os.path.join(EXAMPLES, "quickstart.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=None if env is None else dict(os.environ, **env))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    if expect_exit is not None:
        assert f"exit code: {expect_exit}" in done.stdout, done.stdout
    imported = done.stdout.strip().splitlines()[-1]
    assert imported.startswith("imported: "), done.stdout[-3000:]
    return done.stdout, done.stderr, imported[len("imported: "):]


def test_quickstart_answers_help_before_importing_tensorflow():
    # --help and bad arguments need neither TensorFlow nor Keras (seconds of
    # import and a block of TensorFlow log lines).
    out, err, imported = _run_quickstart("--help")
    assert "usage" in out and "--label-noise" in out, out
    assert imported == "[]", imported
    assert "oneDNN" not in err and "cuda" not in err, err
    out, err, imported = _run_quickstart("--label-noise", "2",
                                         expect_exit=2)
    assert "--label-noise must be in [0, 1)" in err, err
    assert imported == "[]", imported


def test_quickstart_output_files_name_the_run_and_the_backend():
    quickstart = _import_example("quickstart")
    stem = quickstart.file_stem
    names = {stem(noise, quick, backend)
             for noise in (quickstart.LABEL_NOISE, 0.0, 0.2)
             for quick in (False, True)
             for backend in ("tensorflow", "jax", "torch")}
    assert len(names) == 18  # No two runs share a file.
    assert stem(0.4, False, "tensorflow") == "quickstart_tensorflow"
    assert stem(0.4, True, "jax") == "quickstart_quick_jax"
    assert stem(0.0, False, "torch") == "quickstart_noise0_torch"


@pytest.mark.tensorflow
@pytest.mark.slow
def test_quickstart_quick_run(tmp_path):
    out = _run("quickstart.py", "--quick", "--epochs", "2", "--verbose", "0",
               "--output-dir", str(tmp_path))
    rows = {line.split()[0]: line for line in out.splitlines()
            if line.split()[:1] in (["sgd"], ["sam"], ["asam"])}
    assert set(rows) == {"sgd", "sam", "asam"}, out
    assert "40% of the training labels wrong" in out
    # One seed: means only, no spread, and a warning instead.
    assert not any("+/-" in row for row in rows.values()), out
    assert "one seed: no spread" in out
    # The plain SGD model has no rho.
    assert "== SGD, seed 0," in out and "rho=None" not in out, out
    assert "== ASAM (rho=0.5), seed 0," in out, out
    # --quick writes its own files, named after the backend, and leaves the
    # main run's alone.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quickstart_quick_tensorflow.json", "quickstart_quick_tensorflow.png"]
    assert (tmp_path / "quickstart_quick_tensorflow.png").stat().st_size > 0
    assert str(tmp_path) in out
    with open(tmp_path / "quickstart_quick_tensorflow.json") as f:
        record = json.load(f)
    # The figure says it is a smoke run; the JSON keeps the printed table.
    assert record["figure_title"].startswith("Smoke run (--quick, "
                                             "tensorflow)")
    assert "say nothing about the methods" in record["figure_title"]
    assert record["backend"] == "tensorflow"
    assert record["table"] in out


@pytest.mark.tensorflow
@pytest.mark.slow
def test_quickstart_other_noise_level_writes_its_own_files(tmp_path):
    out = _run("quickstart.py", "--label-noise", "0", "--epochs", "1",
               "--seeds", "0", "--verbose", "2",
               "--output-dir", str(tmp_path))
    assert "0% of the training labels wrong" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quickstart_noise0_tensorflow.json",
        "quickstart_noise0_tensorflow.png"]
    # No wrong labels: neither the table nor the progress lines show how
    # many of them were learnt.
    assert "wrong labels fit" not in out and "wrong_labels_fit" not in out
    assert "test_accuracy" in out


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_quickstart_runs_on_jax_without_tensorflow(tmp_path):
    pytest.importorskip("jax")
    out, err, imported = _run_quickstart(
        "--quick", "--epochs", "1", "--verbose", "0",
        "--output-dir", str(tmp_path), env={"KERAS_BACKEND": "jax"},
        expect_exit=None)
    assert "one seed: no spread" in out
    # Its own files: a TensorFlow run's stay as they are.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quickstart_quick_jax.json", "quickstart_quick_jax.png"]
    with open(tmp_path / "quickstart_quick_jax.json") as f:
        assert "jax" in json.load(f)["versions"]
    # keras_asam does not import TensorFlow on JAX, and neither does the
    # example (keras.utils.set_random_seed would, to seed it): no TensorFlow
    # log lines, and the seed still fixes the initial weights.
    assert imported == "['jax', 'keras', 'keras_asam']", imported
    assert "oneDNN" not in err and "cuda drivers" not in err, err
    assert "same weights for a seed: True other seed: False" in out, out


def test_quickstart_table_spread():
    quickstart = _import_example("quickstart")

    def runs(accuracies):
        return [{"test_accuracy": a, "test_at_best_val": a,
                 "wrong_labels_fit": 0.1, quickstart.METER_KEY: 0.001,
                 "seconds_per_epoch": 0.2}
                for a in accuracies]

    table = quickstart.summarize({"sgd": runs([0.97, 0.98, 0.99]),
                                  "asam": runs([0.98, 0.98, 0.98])})
    sgd = next(line for line in table.splitlines() if line.startswith("sgd"))
    # Mean and sample standard deviation (ddof=1) over the seeds, in %.
    assert re.match(r"sgd\s+98\.00 \+/- 1\.00\s", sgd), table
    assert "mean +/- sample std over 3 seeds" in table
    # Differences to SGD, paired by seed.
    assert ("asam - sgd, test acc (final), per seed: +1.0 +0.0 -1.0  "
            "(mean +0.0)") in table, table
    single = quickstart.summarize({"sgd": runs([0.97])})
    assert "+/-" not in single and "97.00" in single, single
    assert "per seed" not in single
    assert "wrong labels fit %" in table


def test_quickstart_table_without_wrong_labels():
    # With clean labels the runs record no wrong_labels_fit, and the table
    # has no column for it.
    quickstart = _import_example("quickstart")
    runs = [{"test_accuracy": a, "test_at_best_val": a,
             quickstart.METER_KEY: 0.001, "seconds_per_epoch": 0.2}
            for a in (0.97, 0.98)]
    table = quickstart.summarize({"sgd": runs, "asam": runs})
    assert "wrong labels fit" not in table, table
    header = table.splitlines()[0].split("  ")
    assert [cell.strip() for cell in header if cell.strip()] == [
        "method", "test acc % (final)", "test acc % (best val)",
        "adaptive sharpness (rho 0.5)", "s/epoch"]


def test_quickstart_meter_is_the_same_for_every_method():
    quickstart = _import_example("quickstart")
    import keras_asam

    x, _, y, _ = quickstart.load_data()
    x, y = x[:128], y[:128]
    values = {}
    for method in ("sgd", "sam", "asam"):
        model = quickstart.build_model(method)
        values[method] = quickstart.meter(model, x, y)
        # ASAM's adaptive sharpness at rho 0.5, also for the SAMModel (whose
        # own defaults, a fixed ball of rho 0.05, would measure another thing).
        adaptive = keras_asam.sharpness(
            model, x, y, rho=0.5, adaptive=True, eta=0.01, batch_size=256,
            loss=quickstart.LOSS)
        assert values[method] == pytest.approx(adaptive, rel=1e-6), method
    sam = quickstart.build_model("sam")
    own = keras_asam.sharpness(sam, x, y, batch_size=256,
                               loss=quickstart.LOSS)
    assert own != pytest.approx(quickstart.meter(sam, x, y), rel=1e-3)


def test_quickstart_label_noise_is_the_benchmarks():
    # The quickstart's setting is a cell of the generalization benchmark:
    # the same noisy labels and validation split for every seed.
    quickstart = _import_example("quickstart")
    from benchmarks import generalization as benchmark

    x_pool, _, y_pool, y_test = quickstart.load_data()
    pool, want_y_pool, _, want_y_test = benchmark.load_pool_and_test(
        "digits")
    np.testing.assert_array_equal(x_pool.reshape(len(x_pool), -1), pool)
    np.testing.assert_array_equal(y_pool, want_y_pool)
    np.testing.assert_array_equal(y_test, want_y_test)
    # One noise function serves both (examples/label_noise.py), imported
    # as `label_noise` by the script and `examples.label_noise` by the
    # package.
    assert (quickstart.noisy_split.__code__.co_filename
            == benchmark.label_noise.noisy_split.__code__.co_filename
            == os.path.join(EXAMPLES, "label_noise.py"))


def test_quickstart_starts_from_the_benchmarks_initial_weights():
    # On TensorFlow a seed's initial weights are the generalization
    # benchmark's, as the README says.
    from benchmarks import generalization as benchmark

    quickstart = _import_example("quickstart")
    for seed in (0, 3):
        quickstart.set_seed(seed)
        ours = quickstart.build_network().get_weights()
        theirs = benchmark.initial_weights("digits", seed)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(a, b)


def test_label_noise_corrupts_the_stated_fraction_nested_across_levels():
    label_noise = _import_example("label_noise")
    y = np.arange(1000) % 10
    _, _, at_20 = label_noise.noisy_split(y, 0.2, 3)
    train, val, at_40 = label_noise.noisy_split(y, 0.4, 3)
    wrong_20, wrong_40 = at_20 != y, at_40 != y
    # Exactly round(noise * n) labels change, each to another class, and
    # the 20% set is inside the 40% set (same seed).
    assert wrong_20.sum() == 200 and wrong_40.sum() == 400
    assert np.all(wrong_40[wrong_20])
    assert np.all((at_40 >= 0) & (at_40 < 10))
    # Wrong labels are spread over the other nine classes.
    counts = np.bincount((at_40[wrong_40] - y[wrong_40]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 20
    # The validation split: 20% of the pool, disjoint from training, and the
    # same at every noise level for a seed.
    assert len(val) == 200 and len(train) == 800
    assert not set(train) & set(val)
    _, val_clean, clean = label_noise.noisy_split(y, 0.0, 3)
    np.testing.assert_array_equal(val, val_clean)
    np.testing.assert_array_equal(clean, y)


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_sharded_example():
    # A (2, 4) mesh of virtual CPU devices against one device: the same
    # weights to float32 rounding, every state buffer sharded like its
    # weight (a quarter of each split kernel on a device).
    out = _run("sharded.py", "--steps", "3", timeout=300,
               env={"XLA_FLAGS": ""})
    difference = float(re.search(r"largest weight difference ([-+.\de]+)",
                                 out).group(1))
    assert difference < 1e-6, out
    rows = [line for line in out.splitlines() if "sharded like its weight"
            in line]
    assert len(rows) == 6 and all(r.endswith("True") for r in rows), out
    kernel = next(r for r in rows if "middle/kernel" in r)
    assert "262,144 of 1,048,576" in kernel, out


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_sharded_example_refuses_a_mesh_that_does_not_cover_the_devices():
    # Before any training: an argparse error (exit 2) naming both counts.
    done = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "sharded.py"), "--mesh", "2",
         "2"], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=""))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--mesh 2 2 has 4 places, but there are 8 devices" in done.stderr
    assert "one device" not in done.stdout


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_multiworker_launcher():
    out = _run("multiworker.py", "--workers", "2", timeout=300)
    finals = [line.split(": ", 1)[1] for line in out.splitlines()
              if line.startswith("worker ") and "final loss" in line]
    assert len(finals) == 2 and finals[0] == finals[1], out
    assert "TF_CONFIG=" in out


def _endpoints(out):
    """{(method, start): (w1^2 - w2^2 at the end, at the start)}."""
    pattern = re.compile(r"^(\w+)\s+from (\(.*?\)): ends at .*"
                         r"w1\^2 - w2\^2 ([-+.\d]+) \(start ([-+.\d]+)\)$")
    found = {}
    for line in out.splitlines():
        match = pattern.match(line)
        if match:
            found[match[1], match[2]] = (float(match[3]), float(match[4]))
    return found


@pytest.mark.tensorflow
@pytest.mark.slow
def test_toy_trajectories(tmp_path):
    out = _run("toy_trajectories.py", "--output-dir", str(tmp_path))
    # ASAM's perturbation maps onto the rescaled one: equal perturbed losses.
    asam = next(line for line in out.splitlines()
                if line.startswith("ASAM   ("))
    losses = asam.split(")")[-1].split()
    assert losses[0] == losses[1], out
    sam = next(line for line in out.splitlines()
               if line.startswith("SAM    ("))
    losses = sam.split(")")[-1].split()
    assert losses[0] != losses[1], out
    assert "eps1 ratio twin/w = 4.000000" in out
    assert (tmp_path / "toy_trajectories.png").stat().st_size > 0
    # What the figure shows: gradient descent keeps the balance w1^2 - w2^2,
    # ASAM nearly keeps it (a step-size effect), SAM slides along the valley
    # towards (1, 1), where it is 0.
    ends = _endpoints(out)
    starts = {start for _, start in ends}
    assert len(ends) == 9 and len(starts) == 3, out
    for start in starts:
        initial = ends["GD", start][1]
        gd, sam, asam = (ends[method, start][0]
                         for method in ("GD", "SAM", "ASAM"))
        assert abs(gd - initial) < 0.05 * abs(initial), out
        assert abs(asam - initial) < 0.05 * abs(initial), out
        assert abs(sam) < 0.3 * abs(initial), out


@pytest.mark.tensorflow
@pytest.mark.slow
def test_default_output_dir_is_next_to_the_script(tmp_path):
    # A copy of the script, run from another directory without --output-dir,
    # writes next to itself, not under the working directory.
    script_dir = tmp_path / "scripts"
    script_dir.mkdir()
    shutil.copy(os.path.join(EXAMPLES, "toy_trajectories.py"), script_dir)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, str(script_dir / "toy_trajectories.py"),
         "--steps", "5"],
        capture_output=True, text=True, timeout=300, cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    png = script_dir / "outputs" / "toy_trajectories.png"
    assert f"Wrote {png}" in done.stdout, done.stdout
    assert png.stat().st_size > 0 and not list(workdir.iterdir())
    for name in ("quickstart", "toy_trajectories", "cifar"):
        module = _import_example(name)
        assert module.OUTPUT_DIR == os.path.join(EXAMPLES, "outputs"), name


@pytest.mark.tensorflow
@pytest.mark.slow
def test_tfhub_finetune(tmp_path):
    # The temporary backbone directory must not outlive the run: give the
    # script a temp folder of its own and look there afterwards.
    out = _run("tfhub_finetune.py", "--epochs", "2", "--pretrain-epochs", "1",
               env={"TMPDIR": str(tmp_path)})
    assert "before fine-tuning" in out
    moved = next(line for line in out.splitlines()
                 if line.startswith("SavedModel variables updated"))
    updated, total = moved.split(": ")[1].split(" of ")
    assert int(updated) == int(total) > 0, out
    exported = next(line for line in out.splitlines()
                    if line.startswith("Exported the backbone SavedModel"))
    assert str(tmp_path) in exported, out
    assert not glob.glob(str(tmp_path / "keras_asam_backbone_*")), out
    assert "Removed the temporary backbone SavedModel" in out


@pytest.mark.slow
def test_cifar_recipe_on_synthetic_data(tmp_path):
    output = tmp_path / "cifar.json"
    out = _run("cifar.py", "--data", "synthetic", "--synthetic-size", "128",
               "--epochs", "1", "--batch-size", "64", "--model", "resnet20",
               "--optimizer", "asam", "--output", str(output))
    assert "rho=0.5" in out and str(output) in out
    assert output.stat().st_size > 0


@pytest.mark.fixed_backend
@pytest.mark.slow
def test_scripts_take_help():
    for script in SCRIPTS:
        out = _run(script, "--help")
        assert "usage" in out, script
    for module in MODULES:
        done = subprocess.run([sys.executable, "-m", module, "--help"],
                              capture_output=True, text=True, timeout=600,
                              cwd=ROOT)
        assert done.returncode == 0 and "usage" in done.stdout, module
