"""Time a fresh, top-to-bottom execution of each chapter and write the table the intro shows.

Usage: python scripts/chapter_times.py [chapters/03_lora.ipynb ...]     (`make times` runs all)
       python scripts/chapter_times.py --render     (rewrite the tables from the last measurements)

Each chapter listed in _toc.yml runs in a new kernel of this environment, one after the
other, exactly as a reader's "Run all" would (nothing is written back to the notebook).
The wall-clock time, kernel start included, and the kernel's CPU time go into
``docs/chapter_times.json`` with the machine and its load (on a busy machine the wall
time grows with the load while the CPU time does not); ``docs/chapter_times.md`` (included by intro.md) and the block
between the chapter-times markers in README.md are rendered from it. Naming chapters
reruns only those and keeps the others' last times. A chapter that fails is recorded as
failed and the script exits non-zero.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import machine_info
import nbformat
from book_toc import toc_files
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TIMES_JSON = ROOT / "docs" / "chapter_times.json"
TIMES_MD = ROOT / "docs" / "chapter_times.md"
PROFILE_MD = ROOT / "docs" / "chapter_profile.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- BEGIN chapter-times -->", "<!-- END chapter-times -->"
# The book's budget per chapter on a 2-core AVX2-only CPU (DESIGN.md): 3 minutes; the experiment
# chapters 5, 7, 8 and 9: 8.
LIMIT_S = {"05": 480, "07": 480, "08": 480, "09": 480}
DEFAULT_LIMIT_S = 180
# The slowest CPU of this kind measured so far (an AVX2-only AMD EPYC, Zen 3) ran the chapters
# 1.2 to 1.6 times slower than the AMD EPYC these tables are measured on does under the AVX2
# emulation (chapter 1: 69 s vs 57 s; 6: 77 s vs 49 s; 7: 287 s vs 181 s), in float32 on both.
# A chapter whose headroom (budget / time) is below this may run over its budget there. An Intel
# Xeon at 2.80GHz (2026-12-07) ran them 0.85 to 1.53 times as long as that AMD EPYC (chapter 1:
# 59 s vs 70 s; 5: 600 s vs 458 s; 8: 332 s vs 217 s).
SLOWEST_CPU_FACTOR = 1.6
CELL_TIMEOUT_S = 1800


def toc_notebooks() -> list[str]:
    """The chapter notebooks of _toc.yml, in reading order, as paths relative to the root."""
    paths = [f + ".ipynb" for f in toc_files(ROOT)]
    return [p for p in paths if (ROOT / p).is_file()]


def title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


def limit_s(path: str) -> int:
    return LIMIT_S.get(Path(path).name[:2], DEFAULT_LIMIT_S)


def describe_failure(nb, err: Exception) -> str:
    """``cell 23: AssertionError: the parallel pass should be ...`` for a failed execution."""
    name, value = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    failed = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
              and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    where = f"cell {failed[0]}: " if failed else ""
    return f"{where}{name}: {' '.join(str(value).split())[:160]}"


def first_code_line(source: str) -> str:
    """A cell's first line that is neither blank nor a comment, as the profiles name cells."""
    code = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return (code[0] if code else "").strip()[:70]


def code_fingerprint(path: str) -> str:
    """A hash of what a run of chapter ``path`` executes: its code cells and llmbook's sources.

    ``make work`` splits a chapter's time only where its counts come from the same code."""
    digest = hashlib.sha256()
    for source in sorted((ROOT / "lib" / "llmbook").rglob("*.py")):
        digest.update(source.relative_to(ROOT).as_posix().encode() + b"\0" + source.read_bytes())
    nb = nbformat.read(ROOT / path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(b"\0cell\0" + cell.source.encode())
    return digest.hexdigest()[:16]


def run_one(path: str) -> dict:
    nb, code = nbformat.read(ROOT / path, as_version=4), code_fingerprint(path)
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                            resources={"metadata": {"path": str((ROOT / path).parent)}})
    load_before, error = machine_info.load_average(), None
    # The kernel is our child process: once it has exited, its CPU time shows in os.times().
    cpu_before, start = os.times(), time.perf_counter()
    try:
        client.execute()
    except Exception as err:  # a failing cell: record which and why, time what ran
        error = describe_failure(nb, err)
    seconds, cpu_after = time.perf_counter() - start, os.times()
    cpu = (cpu_after.children_user - cpu_before.children_user) + (cpu_after.children_system - cpu_before.children_system)
    return {"title": title(nb), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1) if cpu > 0 else None,
            "code_cells": sum(c.cell_type == "code" for c in nb.cells), "error": error,
            "load_before": load_before, "load_after": machine_info.load_average(), "machine": machine_info.describe(),
            "kernels": machine_info.kernel_path(), "profile": cell_profile(nb), "code": code}


def cell_profile(nb, top: int = 3) -> list[dict]:
    """The ``top`` code cells that took longest, from the timestamps nbclient records.

    Each: its index among the code cells (counted from 0, as nbval names cells), its first
    line of code, its seconds and its share of the time all code cells took.
    """
    cells = []
    for index, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        stamps = cell.get("metadata", {}).get("execution", {})
        began, ended = stamps.get("iopub.execute_input"), stamps.get("shell.execute_reply")
        if not (began and ended):
            continue
        seconds = (datetime.fromisoformat(ended.replace("Z", "+00:00"))
                   - datetime.fromisoformat(began.replace("Z", "+00:00"))).total_seconds()
        cells.append({"cell": index, "first_line": first_code_line(cell.source), "seconds": round(seconds, 1)})
    total = sum(c["seconds"] for c in cells) or 1.0
    for c in cells:
        c["share"] = round(c["seconds"] / total, 3)
    return sorted(cells, key=lambda c: -c["seconds"])[:top]


def render_profile(times: dict, order: list[str]) -> str:
    """docs/chapter_profile.md: where each chapter spends its time (its three longest cells)."""
    out = ["<!-- Written by scripts/chapter_times.py (make times); edits here are overwritten. -->", "",
           "# Where the chapters spend their time", "",
           "The three longest code cells of each chapter in the last `make times` run (cells counted from 0 "
           "among the code cells, as nbval names them), with their share of the time all the chapter's cells "
           "took. Measure here before making a chapter faster.", "",
           "| chapter | run time | cell | first line | seconds | share |", "|---|---|---|---|---|---|"]
    for path in (p for p in order if p in times):
        t = times[path]
        for rank, c in enumerate(t.get("profile", [])):
            name = f"{Path(path).stem} | {minutes(t['seconds'])}" if rank == 0 else " | "
            line = c["first_line"].replace("|", "\\|")
            out.append(f"| {name} | {c['cell']} | `{line}` | {c['seconds']:.1f} | {c['share']:.0%} |")
    return "\n".join(out) + "\n"


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:04.1f} s" if seconds >= 60 else f"{seconds:.1f} s"


def render_table(times: dict, order: list[str]) -> str:
    rows = [p for p in order if p in times]
    out = ["| chapter | code cells | run time | CPU time | kernels | budget | within it | headroom |",
           "|---|---|---|---|---|---|---|---|"]
    for path in rows:
        t = times[path]
        doc = path.removesuffix(".ipynb")
        ok = "failed: " + t["error"].replace("|", "\\|") if t["error"] else (
            "yes" if t["seconds"] <= limit_s(path) else "**no**")
        cpu = minutes(t["cpu_seconds"]) if t.get("cpu_seconds") else "n/a"
        headroom = limit_s(path) / t["seconds"]
        shown = f"{headroom:.1f}x" if headroom >= SLOWEST_CPU_FACTOR else f"**{headroom:.1f}x**"
        out.append(f"| {{chapter}}`{t['title']} <{doc}>` | {t['code_cells']} | {minutes(t['seconds'])} "
                   f"| {cpu} | {machine_info.kernel_label(t.get('kernels'))} | {limit_s(path) // 60} min | {ok} | {shown} |")
    total = sum(times[p]["seconds"] for p in rows)
    cpu_total = sum(times[p].get("cpu_seconds") or 0 for p in rows)
    out.append(f"| **all {len(rows)} chapter{'s' if len(rows) != 1 else ''}** | {sum(times[p]['code_cells'] for p in rows)} | "
               f"**{minutes(total)}** | {minutes(cpu_total) if cpu_total else 'n/a'} | | | | |")
    return "\n".join(out)


def describe_runs(times: dict, order: list[str]) -> str:
    rows = [p for p in order if p in times]
    machines = sorted({machine_info.one_line(times[p]["machine"]) for p in rows})
    dates = sorted({times[p]["machine"]["date"] for p in rows})
    loads = [times[p][k] for p in rows for k in ("load_before", "load_after") if times[p][k] is not None]
    text = f"Measured {', '.join(dates)} on {'; '.join(machines)}"
    text += ", one chapter at a time in a fresh kernel"
    kernels = sorted({machine_info.kernel_label(times[p].get("kernels")) for p in rows})
    text += (f". Kernels: {', '.join(kernels)}. *AVX2, no native bf16* is what most laptops have; on a faster "
             f"CPU `make times` emulates it (`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`, "
             f"`MKL_ENABLE_INSTRUCTIONS=AVX2`), which selects the same kernels but not a slower clock or memory. "
             f"Headroom is the budget divided by the run time: the slowest CPU of this kind measured so far ran the "
             f"chapters up to {SLOWEST_CPU_FACTOR}x slower than an AMD EPYC does under the same emulation, so a headroom below "
             f"{SLOWEST_CPU_FACTOR}x (in bold) may not be enough there")
    text += "."
    if loads:
        text += (f" The 1-minute load average was {min(loads)} to {max(loads)}. A load above the number "
                 f"of cores means other work shared the CPU and stretched the run times; the CPU time "
                 f"(the kernel's user + system seconds, summed over its threads) is less affected by "
                 f"the load, though not immune to it.")
    return text


def render_markdown(times: dict, order: list[str]) -> str:
    return ("<!-- Written by scripts/chapter_times.py (make times); edits here are overwritten. -->\n\n"
            + render_table(times, order) + "\n\n" + describe_runs(times, order) + "\n")


def update_readme(times: dict, order: list[str]) -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} ... {END} block: left as it is")
        return
    # README is read on GitHub, where the {chapter} role means nothing: plain titles there.
    table = re.sub(r"\{chapter\}`(.+?) <[^>]+>`", r"\1", render_table(times, order))
    block = f"{BEGIN}\n{table}\n\n{describe_runs(times, order)}\n{END}"
    README.write_text(text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="chapters to time (default: every chapter in _toc.yml)")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite the table and the README's block from the last measurements")
    args = parser.parse_args(argv)
    order = toc_notebooks()
    if args.render and not TIMES_JSON.is_file():
        parser.error(f"no measurements in {TIMES_JSON} yet: run `make times`")
    if args.render:
        times = json.loads(TIMES_JSON.read_text())
        TIMES_MD.write_text(render_markdown(times, order))
        PROFILE_MD.write_text(render_profile(times, order))
        update_readme(times, order)
        return 0
    wanted = [str(Path(n)) for n in args.notebooks] or order
    unknown = [n for n in wanted if n not in order]
    if unknown:
        parser.error(f"not a chapter of _toc.yml: {unknown}; have {order}")
    times = json.loads(TIMES_JSON.read_text()) if TIMES_JSON.is_file() and args.notebooks else {}
    failed = []
    for path in wanted:
        print(f"{path} ...", flush=True)
        times[path] = result = run_one(path)
        print(f"  {minutes(result['seconds'])} (budget {limit_s(path) // 60} min)"
              + (f"; FAILED: {result['error']}" if result["error"] else ""), flush=True)
        if result["error"]:
            failed.append(path)
    times = {p: times[p] for p in order if p in times}
    TIMES_JSON.parent.mkdir(exist_ok=True)
    TIMES_JSON.write_text(json.dumps(times, indent=1, ensure_ascii=False) + "\n")
    TIMES_MD.write_text(render_markdown(times, order))
    PROFILE_MD.write_text(render_profile(times, order))
    update_readme(times, order)
    print(f"wrote {TIMES_MD.relative_to(ROOT)}, {PROFILE_MD.relative_to(ROOT)}, "
          f"{TIMES_JSON.relative_to(ROOT)} and the README's table")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
