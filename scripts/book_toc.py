"""The book's reading order as ``_toc.yml`` gives it: one parser for the scripts and the tests."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def toc_files(root: Path = ROOT) -> list[str]:
    """Every ``file:`` of ``_toc.yml``, the root page first, in reading order, without suffix."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", [{"chapters": toc.get("chapters", [])}]):
        walk(part.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in files]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--notebooks"]:
        sys.exit("usage: python scripts/book_toc.py --notebooks   (prints the chapter notebooks in reading order)")
    for name in toc_files():
        if (ROOT / f"{name}.ipynb").is_file():
            print(f"{name}.ipynb")
