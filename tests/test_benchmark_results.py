"""benchmarks/results/ holds no file that nothing references, and the
documents point at no result that is not there: every file under
benchmarks/results/ (the archive too) is named in some Markdown file of
the repository outside benchmarks/results/ (or in the archive's README),
and every `benchmarks/results/...` path in a Markdown file exists (for the
benchmarks' README also the paths relative to it, `results/...`)."""

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
ARCHIVE_README = os.path.join(RESULTS, "archive", "README.md")
SKIPPED_DIRS = {".git", "site", "node_modules", "__pycache__", ".venv"}
PATH = re.compile(r"(?<![\w/.-])(benchmarks/results/[\w.*/<>-]*\w)")
RELATIVE = re.compile(r"(?<![\w/.-])(results/[\w.*/<>-]*\w)")


def _documents():
    """Markdown files outside benchmarks/results/ and the archive's README,
    as {path: text}."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS
                   and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            inside = os.path.commonpath([path, RESULTS]) == RESULTS
            if name.endswith(".md") and (not inside
                                         or path == ARCHIVE_README):
                with open(path, encoding="utf-8") as f:
                    found[path] = f.read()
    return found


def _result_files():
    return sorted(
        os.path.relpath(os.path.join(folder, name), RESULTS)
        for folder, _, files in os.walk(RESULTS) for name in files
        if os.path.join(folder, name) != ARCHIVE_README)


def test_every_result_file_is_referenced():
    text = "\n".join(_documents().values())
    unreferenced = [path for path in _result_files()
                    if os.path.basename(path) not in text]
    assert not unreferenced, unreferenced


def test_archived_files_are_listed_in_the_archive_readme():
    with open(ARCHIVE_README, encoding="utf-8") as f:
        listed = f.read()
    missing = [path for path in _result_files()
               if path.startswith("archive" + os.sep)
               and os.path.basename(path) not in listed]
    assert not missing, missing


def _exists(path):
    """True if `path` (relative to ROOT; a `*` a wildcard) names a file."""
    if "<" in path:  # A pattern such as results/<stem>.json.
        return True
    return bool(glob.glob(os.path.join(ROOT, path)))


def test_every_results_path_in_the_documents_exists():
    missing = []
    for path, text in _documents().items():
        found = PATH.findall(text)
        if path == os.path.join(ROOT, "benchmarks", "README.md"):
            found += ["benchmarks/" + p for p in RELATIVE.findall(text)]
        missing += [(os.path.relpath(path, ROOT), p) for p in found
                    if p.rstrip("/") != "benchmarks/results"
                    and not _exists(p)]
    assert not missing, missing
