"""Sections of the project's documents (the README and the pages of
`docs/`), for tests that check what they say against committed results."""

import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def section(title):
    """The section `## title`, up to the next `## ` heading, of the one
    document that has it."""
    found = []
    for name in DOCUMENTS:
        with open(os.path.join(ROOT, name)) as f:
            text = f.read()
        start = text.find(f"\n## {title}\n")
        if start >= 0:
            end = text.find("\n## ", start + 1)
            found.append((name, text[start:end if end > 0 else None]))
    assert len(found) == 1, (
        f"section '## {title}' should be in exactly one of {DOCUMENTS}; "
        f"found in {[name for name, _ in found]}")
    return found[0][1]
