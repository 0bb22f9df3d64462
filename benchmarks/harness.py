"""What every benchmark records and writes: the provenance of a run and its
results.

A run's provenance (`provenance`) is one record: the commit of the
checkout whose `keras_asam` was imported and whether its tracked files,
and which of the library's files, differed from it; the machine; the
versions of Python and of the libraries installed (read from their
distributions, so nothing is imported for it); the command, its
arguments, the start time and the 1-minute load average. Every script
stores it in its JSON: at the top level of the report (`step_time`,
`memory`, `before_after`, `ascent_cost`, `sharded_memory`) or as `meta`
(`generalization`, `budget`).

Results go to `benchmarks/results/<stem>.json` and `<stem>.md`
(`write_results`); children a script starts run as
`python -m benchmarks.<name>` (`module_command`), from the repository
root, or, to import another checkout's `keras_asam`, from a directory
that holds only that package (`library_dir`).
"""

import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
# Distributions whose versions a record lists when they are installed.
PACKAGES = {"tensorflow": "tensorflow", "keras": "keras", "numpy": "numpy",
            "jax": "jax", "jaxlib": "jaxlib", "torch": "torch",
            "keras_asam": "keras-asam"}


def git(*args, cwd=ROOT):
    """The stripped output of `git ARGS` in `cwd`, or None if it fails."""
    try:
        return subprocess.check_output(["git", *args], cwd=cwd, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def library_root():
    """The checkout of the `keras_asam` Python imports (PYTHONPATH may point
    at another one than this script's)."""
    import keras_asam

    return os.path.dirname(os.path.dirname(os.path.realpath(
        keras_asam.__file__)))


def source(checkout=None):
    """The commit of `checkout` (default: the imported library's), whether
    its tracked files differ from it, and which files of `keras_asam` do
    (`git status --porcelain` lines)."""
    checkout = checkout or library_root()
    return {"commit": git("rev-parse", "HEAD", cwd=checkout),
            "dirty": bool(git("status", "--porcelain",
                              "--untracked-files=no", cwd=checkout)),
            "library_modified": (git("status", "--porcelain", "--",
                                     "keras_asam", cwd=checkout)
                                 or "").splitlines()}


def machine():
    return {"platform": platform.platform(),
            "processor": platform.processor(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def versions(extra=()):
    """Python's version and those of the installed distributions of
    `PACKAGES` and `extra` (None for one that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for key, name in [*PACKAGES.items(), *((e, e) for e in extra)]:
        try:
            found[key] = version(name)
        except PackageNotFoundError:
            if key not in PACKAGES:
                found[key] = None
    if "keras_asam" in sys.modules:  # As imported (PYTHONPATH, --library).
        found["keras_asam"] = sys.modules["keras_asam"].__version__
    if "keras" in sys.modules:  # The backend this process runs on.
        found["backend"] = sys.modules["keras"].backend.backend()
    return found


def provenance(args=None, checkout=None, extra_versions=()):
    """The record of a run, taken when it starts (others may commit while
    it runs). `benchmarks_modified`: this repository's uncommitted
    benchmark files (the scripts that ran, if not the committed ones)."""
    return {**source(checkout),
            "benchmarks_modified": (git("status", "--porcelain", "--",
                                        "benchmarks") or "").splitlines(),
            "machine": machine(),
            "versions": versions(extra_versions),
            "command": list(sys.argv),
            "arguments": dict(vars(args)) if args is not None else {},
            "started": datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_1min_at_start": os.getloadavg()[0]}


# -- reading a record (this one, or the keys of runs written before it) -----


def commit_of(record):
    return str(record.get("commit") or record.get("git_commit") or "")


def dirty_of(record):
    return bool(record.get("dirty", record.get("git_dirty")))


def cpu_count_of(record):
    found = record.get("machine")
    if isinstance(found, dict):
        return found.get("cpu_count")
    return record.get("cpu_count")


def library_changes_of(record):
    """The uncommitted library files the record lists."""
    for key in ("library_modified", "uncommitted_library_files",
                "uncommitted"):
        if isinstance(record.get(key), list):
            return record[key]
    return []


# -- writing results --------------------------------------------------------


def results_path(stem, directory=None):
    """`<directory>/<stem>.json` (default directory: benchmarks/results)."""
    return os.path.join(directory or RESULTS_DIR, stem + ".json")


def dump_json(report, path, compact_key=None):
    """Writes `report` indented; with `compact_key`, that key's list one
    item per line (long lists of runs with their curves)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    parts = []
    for key, value in report.items():
        if key == compact_key:
            lines = ",\n".join("  " + json.dumps(item, separators=(",", ":"))
                               for item in value)
            parts.append(f" {json.dumps(key)}: [\n{lines}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: "
                         + json.dumps(value, indent=1).replace("\n", "\n "))
    with open(path, "w") as f:
        f.write("{\n" + ",\n".join(parts) + "\n}\n")


def write_results(report, path, markdown=None, compact_key=None):
    """Writes `report` to the JSON `path` and `markdown` (if given) next to
    it as .md; returns the paths written."""
    dump_json(report, path, compact_key)
    written = [path]
    if markdown is not None:
        written.append(os.path.splitext(path)[0] + ".md")
        with open(written[-1], "w") as f:
            f.write(markdown)
    print("Wrote " + " and ".join(written), flush=True)
    return written


def load(path):
    with open(path) as f:
        return json.load(f)


# -- child processes --------------------------------------------------------


def module_command(name, *args):
    """The command that runs `benchmarks.<name>` with `args`."""
    return [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)]


@contextlib.contextmanager
def library_dir(checkout=None):
    """A directory to run children from so that they import the
    `keras_asam` of `checkout` and this repository's benchmarks: with
    `checkout`, a temporary directory holding only a link to its
    `keras_asam` (yields it; put it first on PYTHONPATH, before ROOT);
    without, ROOT."""
    if checkout is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="keras_asam_library_") as tmp:
        os.symlink(os.path.join(os.path.abspath(checkout), "keras_asam"),
                   os.path.join(tmp, "keras_asam"))
        yield tmp


def child_env(directory, **extra):
    """The environment of a child run from `directory` (`library_dir`):
    `directory` and ROOT first on PYTHONPATH."""
    paths = [directory] + ([ROOT] if directory != ROOT else [])
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        paths + ([old] if old else [])), **extra)
