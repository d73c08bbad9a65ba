"""Every ``python`` snippet of README.md and docs/*.md runs, in a fresh process."""
from __future__ import annotations

import glob
import os
import re

import pytest

from conftest import run_fresh_python

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def _snippets():
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for index, block in enumerate(re.findall(r"```python\n(.*?)```", text, re.S)):
            yield pytest.param(block, id=f"{os.path.relpath(path, REPO)}#{index}")


SNIPPETS = list(_snippets())


def test_docs_have_snippets():
    assert len(SNIPPETS) >= 5


@pytest.mark.parametrize("code", SNIPPETS)
def test_doc_snippet_runs(code, tmp_path):
    run_fresh_python(code, cwd=str(tmp_path), timeout=600)
