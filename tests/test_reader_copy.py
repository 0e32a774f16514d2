"""The reader's copy that `make lab` opens: made once, updated only where the reader changed nothing.

Runs scripts/reader_copy.py on two small notebooks standing in for the book's chapters, with
the notebook-signature database in a temporary folder.
"""

import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.sign import NotebookNotary

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import reader_copy  # noqa: E402


def _notebook(path: Path, text: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(f"print({text!r})"))
    nbformat.write(nb, path)
    return path


@pytest.fixture
def book(tmp_path, monkeypatch):
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    paths = [_notebook(chapters / "01_a.ipynb", "a"), _notebook(chapters / "02_b.ipynb", "b")]
    monkeypatch.setattr(reader_copy, "book_chapters", lambda: paths)
    notary = NotebookNotary(data_dir=str(tmp_path / "jupyter-data"))
    return paths, tmp_path / "reader", notary


def _sync(book, **kwargs):
    paths, folder, notary = book
    return reader_copy.sync(folder, notary=notary, **kwargs)


def test_the_first_run_copies_every_chapter_and_signs_it(book):
    paths, folder, notary = book
    done = _sync(book)
    assert done["copied"] == ["01_a.ipynb", "02_b.ipynb"]
    for path in paths:
        copy = folder / path.name
        assert copy.read_bytes() == path.read_bytes()
        assert notary.check_signature(nbformat.read(copy, as_version=4))
    # A notebook nobody signed is not trusted by the same notary: the check can fail.
    assert not notary.check_signature(nbformat.read(_notebook(folder / "x.ipynb", "x"), as_version=4))
    assert _sync(book)["current"] == ["01_a.ipynb", "02_b.ipynb"]


def test_a_copy_the_reader_did_not_touch_follows_the_book(book):
    paths, folder, _ = book
    _sync(book)
    _notebook(paths[0], "a, second edition")
    done = _sync(book)
    assert done["updated"] == ["01_a.ipynb"] and done["current"] == ["02_b.ipynb"]
    assert (folder / "01_a.ipynb").read_bytes() == paths[0].read_bytes()


def test_a_copy_the_reader_changed_is_kept_until_refresh_which_backs_it_up(book):
    paths, folder, _ = book
    _sync(book)
    mine = _notebook(folder / "01_a.ipynb", "my own experiment").read_bytes()
    done = _sync(book)  # the book did not change: nothing to say, nothing replaced
    assert done["yours"] == ["01_a.ipynb"] and not done["kept"] and not done["updated"]
    _notebook(paths[0], "a, second edition")
    done = _sync(book)
    assert done["kept"] == ["01_a.ipynb"] and (folder / "01_a.ipynb").read_bytes() == mine
    message = reader_copy.report(folder, done, refresh=False)
    assert "01_a.ipynb" in message and "make lab-refresh" in message
    done = _sync(book, refresh=True)
    assert done["backed up"] == ["01_a.ipynb"] and done["updated"] == ["01_a.ipynb"]
    assert (folder / "01_a.ipynb").read_bytes() == paths[0].read_bytes()
    (backup,) = (folder / "backup").glob("*/01_a.ipynb")
    assert backup.read_bytes() == mine
    assert "backup" in reader_copy.report(folder, done, refresh=True)


def test_the_books_own_chapters_folder_is_opened_as_it_is(capsys):
    before = {p: p.stat().st_mtime_ns for p in (ROOT / "chapters").glob("*.ipynb")}
    assert reader_copy.main(["--dir", str(ROOT / "chapters")]) == 0
    assert "book's own chapters/" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "chapters").glob("*.ipynb")} == before
    assert not (ROOT / "chapters" / reader_copy.RECORD).exists()
