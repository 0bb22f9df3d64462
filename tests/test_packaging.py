"""What a packager expects: the license file in the sdist and the wheel,
metadata that names every backend, a changelog entry for the version.
(.ci/run also builds the sdist and the wheel with `python -m build`.)"""

import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_file_is_the_declared_license():
    project = _pyproject()["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" \
        in text
    assert "END OF TERMS AND CONDITIONS" in text  # The full text.


def test_description_names_every_backend():
    description = _pyproject()["project"]["description"]
    for backend in ("TensorFlow", "JAX", "PyTorch"):
        assert backend in description, description


def test_changelog_has_the_version_and_unreleased_changes():
    version = _pyproject()["project"]["version"]
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        headings = re.findall(r"^## (.+)$", f.read(), flags=re.M)
    assert headings[0] == "Unreleased", headings
    assert version in headings, (version, headings)


def test_long_description_has_no_relative_links():
    # PyPI shows the long description away from the repository: a link to
    # a file of it would break there.
    readme = _pyproject()["project"]["readme"]
    with open(os.path.join(ROOT, readme)) as f:
        text = f.read()
    targets = re.findall(r"\]\(([^)]*)\)", text)
    targets += re.findall(r"""(?:href|src)=["']([^"']*)""", text)
    assert targets, "no links found: the pattern is broken"
    relative = [t for t in targets if not t.startswith("https://")]
    assert not relative, relative


def _setuptools_builds_license_files():
    try:
        import setuptools
    except ImportError:
        return False
    major = int(setuptools.__version__.split(".")[0])
    return major >= 77


@pytest.mark.fixed_backend
@pytest.mark.slow
@pytest.mark.skipif(not _setuptools_builds_license_files(),
                    reason="needs setuptools >= 77 in this environment")
def test_wheel_carries_the_license(tmp_path):
    # Built from a copy of what the package is made of, so that the
    # repository's own folder gets no build/ or egg-info.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), source)
    shutil.copytree(os.path.join(ROOT, "keras_asam"), source / "keras_asam",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
         "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in text
    assert "JAX" in re.search(r"^Summary: (.*)$", text, flags=re.M)[1]
