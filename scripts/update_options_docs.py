"""Regenerate the options table of docs/README.md from tvm.contrib.torch.options.OPTIONS.

Run after changing the option table: ``.venv/bin/python scripts/update_options_docs.py``
(``test_options.py`` fails while the docs and the table differ).
"""
from __future__ import annotations

import logging
import os

from tvm.contrib.torch.options import replace_docs_section

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "README.md")


def main() -> None:
    """Rewrite the generated section in place."""
    with open(DOCS, encoding="utf-8") as f:
        text = f.read()
    updated = replace_docs_section(text)
    if updated != text:
        with open(DOCS, "w", encoding="utf-8") as f:
            f.write(updated)
    logging.info("%s: options table %s", DOCS, "updated" if updated != text else "unchanged")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
