"""The reader's copy of the chapters, which `make lab` opens; ``chapters/`` stays the book's.

Usage: python scripts/reader_copy.py [--dir reader]              (`make lab` runs it)
       python scripts/reader_copy.py --refresh [--dir reader]    (`make lab-refresh`)

A reader runs cells, moves sliders and edits code; JupyterLab saves all of it. Saved into
``chapters/``, that would modify the book's tracked files: ``git pull`` would then conflict,
and nobody could tell the reader's changes from the book's. So `make lab` opens ``reader/``
(git-ignored), which holds a copy of every chapter:

- a chapter with no copy yet is copied;
- a copy the reader has not changed is replaced when the book's chapter changes;
- a copy the reader has changed (run or edited) is never replaced silently: this says that
  the book has a newer version, and ``--refresh`` replaces it after moving the reader's
  version to ``reader/backup/<date-time>/``.

``reader/.book-copies.json`` records the hash of each copy as written, which is how a
changed copy is told from an untouched one. Each copy is signed as trusted in this
Jupyter's notebook-signature database, so that JupyterLab shows its saved outputs, the
sliders included, before any cell runs (the book's own notebooks, whose outputs come from
the book's build). The reader's later saves are signed by JupyterLab itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbformat.sign import NotebookNotary

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from book_toc import toc_files  # noqa: E402

RECORD = ".book-copies.json"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def book_chapters() -> list[Path]:
    """The chapter notebooks of the book, in the order of _toc.yml."""
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").is_file()]


def _copy(source: Path, target: Path, notary: NotebookNotary) -> str:
    """Write ``source`` to ``target`` atomically and sign it; returns the copy's hash."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    notary.sign(nbformat.read(target, as_version=nbformat.NO_CONVERT))
    return _sha(target)


def sync(folder: Path, *, refresh: bool = False, notary: NotebookNotary | None = None) -> dict[str, list[str]]:
    """Bring ``folder`` up to date with the book; returns the chapter names by what was done."""
    notary = notary or NotebookNotary()
    Path(notary.data_dir).mkdir(parents=True, exist_ok=True)  # a fresh machine may not have it yet
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    done: dict[str, list[str]] = {"copied": [], "updated": [], "current": [], "yours": [], "kept": [],
                                  "backed up": []}
    backup = folder / "backup" / time.strftime("%Y-%m-%d-%H%M%S")
    for chapter in book_chapters():
        name, target = chapter.name, folder / chapter.name
        book, copied = _sha(chapter), record.get(name)  # copied: the book's version last copied
        if not target.is_file():
            record[name] = _copy(chapter, target, notary)
            done["copied"].append(name)
            continue
        mine = _sha(target)
        if mine == book:
            record[name] = book
            done["current"].append(name)
        elif mine == copied or refresh:  # untouched by the reader, or replaced on request
            if mine != copied:
                backup.mkdir(parents=True, exist_ok=True)
                shutil.copy2(target, backup / name)
                done["backed up"].append(name)
            record[name] = _copy(chapter, target, notary)
            done["updated"].append(name)
        else:  # the reader's runs or edits: kept; said only when the book has changed since
            done["yours" if book == copied else "kept"].append(name)
    tmp = record_path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, record_path)
    return done


def report(folder: Path, done: dict[str, list[str]], *, refresh: bool) -> str:
    """What a reader is told: where their copy is, and what changed in it."""
    try:
        shown = folder.resolve().relative_to(ROOT)
    except ValueError:
        shown = folder
    labels = {"copied": "copied now", "updated": "updated from the book", "current": "as in the book",
              "yours": "with your changes", "kept": "with your changes, kept"}
    total = sum(len(done[k]) for k in labels)
    counts = ", ".join(f"{len(done[k])} {label}" for k, label in labels.items() if done[k])
    lines = [f"make lab: {shown}/ holds your copy of the {total} chapters ({counts}); "
             "chapters/ is the book's and stays as it is."]
    for name in done["backed up"]:
        lines.append(f"  {name}: replaced by the book's version; yours is in {shown}/backup/.")
    for name in done["kept"]:
        lines.append(f"  {name}: the book has a newer version; your copy, with your runs or edits, "
                     f"is kept. `make lab-refresh` replaces it (yours goes to {shown}/backup/).")
    if refresh and not done["backed up"] and not done["updated"]:
        lines.append("  Nothing to refresh: every copy is the book's version.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=ROOT / "reader",
                        help="the reader's folder (default: reader/)")
    parser.add_argument("--refresh", action="store_true",
                        help="replace every copy with the book's, moving changed ones to backup/")
    args = parser.parse_args(argv)
    folder = args.dir.resolve()
    if folder == (ROOT / "chapters").resolve():
        print("make lab: opening the book's own chapters/ (for authors): runs and saves change "
              "the tracked notebooks.")
        return 0
    done = sync(folder, refresh=args.refresh)
    print(report(folder, done, refresh=args.refresh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
