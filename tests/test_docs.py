"""The docs site: its Python code blocks run as written, and every public
name of keras_asam has an entry in the API reference. (`mkdocs build
--strict` runs in `.ci/run`.)

Blocks fenced as ```python run, each page's in order in one namespace;
fragments that leave something out (`loss=...`) are fenced as ```py."""

import glob
import os
import re
import subprocess
import sys

import pytest

import keras_asam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))


def python_blocks(path):
    with open(path) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_pages_have_code_to_run():
    assert len([p for p in PAGES if python_blocks(p)]) >= 6


@pytest.mark.slow
def test_docs_code_blocks_run(tmp_path):
    # Each page's blocks in order, in one namespace per page, all pages in
    # one subprocess to start TensorFlow once.
    script = "\n".join([
        "import runpy, sys",
        "for path in sys.argv[1:]:",
        "    print('page', path, flush=True)",
        "    runpy.run_path(path)",
    ])
    folder = str(tmp_path)
    files = []
    for page in PAGES:
        blocks = python_blocks(page)
        if blocks:
            name = os.path.splitext(os.path.basename(page))[0]
            path = os.path.join(folder, f"{name.replace('-', '_')}.py")
            with open(path, "w") as f:
                f.write("\n\n".join(blocks))
            files.append(path)
    done = subprocess.run(
        [sys.executable, "-c", script, *files], capture_output=True,
        text=True, timeout=600, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("page ") == len(files)
    assert "2.0" in done.stdout  # own-variant.md's count after two steps


def public_names():
    names = {f"keras_asam.{n}" for n in ("ASAMModel", "SAMModel",
                                         "sharpness", "indexed")}
    names |= {f"keras_asam.variants.{n}"
              for n in keras_asam.variants.__all__}
    for module in ("callbacks", "custom_loop", "perturbation", "schedules",
                   "directions"):
        exported = getattr(getattr(keras_asam, module), "__all__", None)
        if exported is None:
            exported = [n for n, v in vars(getattr(keras_asam, module)).items()
                        if not n.startswith("_") and callable(v)
                        and getattr(v, "__module__", "") ==
                        f"keras_asam.{module}"]
        names |= {f"keras_asam.{module}.{n}" for n in exported}
    return names


def test_every_public_name_is_in_the_api_reference():
    documented = set()
    for page in glob.glob(os.path.join(DOCS, "api", "*.md")):
        with open(page) as f:
            text = f.read()
        for target, options in re.findall(
                r"^::: (\S+)\n((?:    .*\n)*)", text, flags=re.M):
            members = re.search(r"members: \[(.*)\]", options)
            if members:  # A module's page: these of its names.
                documented |= {f"{target}.{m.strip()}"
                               for m in members.group(1).split(",")}
            documented.add(target)
            if target == "keras_asam.directions":
                documented |= {f"{target}.{n}"
                               for n in keras_asam.directions.__all__}
    missing = sorted(n for n in public_names() if n not in documented)
    assert not missing, missing
