#!/usr/bin/env python
"""Rewrite docs/methods/NAME.md, one page per registered method, from the registry (after adding a method or changing
its docstring, defaults or options); the tests fail when a page differs from `cliptune.methods.method_page`.

    python scripts/write_method_pages.py
"""

from pathlib import Path

from cliptune.methods import METHODS, method_page

PAGES = Path(__file__).resolve().parents[1] / "docs" / "methods"

if __name__ == "__main__":
    for name in METHODS:
        (PAGES / f"{name}.md").write_text(method_page(name))
    print(f"wrote {len(METHODS)} pages to {PAGES}")
