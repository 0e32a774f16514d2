"""Write the data sets in ``data/`` from their builders: ``python data/build.py [name ...]``.

Every builder ``data/build_<name>.py`` defines ``OUTPUT`` (its file name, ``<name>.jsonl``)
and ``build()``, which returns the rows and writes nothing; this script is the one place
that writes them, with :func:`llmbook.data.write_jsonl` (atomic). With no names it writes
all of them (``make data`` runs that); ``python data/build_<name>.py`` writes its own file
through here. The defaults reproduce the committed files byte for byte, and
``tests/test_data_builders.py`` checks that they do.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from types import ModuleType

from llmbook.data import load_builder, write_jsonl

HERE = Path(__file__).resolve().parent
NAMES = ("sft", "lora_task", "closed_book_qa", "knowledge_probe", "sampling_task", "preferences", "harmlessness", "arithmetic_rl")  # in chapter order


def load(name: str) -> ModuleType:
    """The builder module ``data/build_<name>.py`` (:func:`llmbook.data.load_builder`)."""
    module = load_builder(name)
    if module.OUTPUT != f"{name}.jsonl":
        raise ValueError(f"data/build_{name}.py: OUTPUT is {module.OUTPUT!r}, expected '{name}.jsonl'")
    return module


def write(name: str, out_dir: Path = HERE) -> tuple[Path, list[dict]]:
    """Build one data set and write it to ``out_dir / OUTPUT``; returns the path and the rows."""
    module = load(name)
    rows = module.build()
    return write_jsonl(Path(out_dir) / module.OUTPUT, rows), rows


def _name(arg: str) -> str:
    """``sft``, ``sft.jsonl``, ``build_sft.py`` or a path to one of them: the builder's name."""
    name = Path(arg).name.removeprefix("build_").removesuffix(".py").removesuffix(".jsonl")
    if name not in NAMES:
        raise argparse.ArgumentTypeError(f"no builder {arg!r}; choose from {', '.join(NAMES)}")
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", type=_name, metavar="name",
                        help=f"data sets to write (default: all): {', '.join(NAMES)}")
    parser.add_argument("--out-dir", type=Path, default=HERE, help="folder to write to (default: data/)")
    args = parser.parse_args(argv)
    for name in dict.fromkeys(args.names or NAMES):  # each once, in the order asked
        path, rows = write(name, args.out_dir)
        splits = Counter(row["split"] for row in rows if "split" in row)
        detail = ": " + ", ".join(f"{n} {s}" for s, n in splits.items()) if splits else ""
        print(f"wrote {len(rows)} rows to {path}{detail}", flush=True)


if __name__ == "__main__":
    main()
