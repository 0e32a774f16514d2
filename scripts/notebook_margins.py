"""Run chapters and report how close each numeric comparison came to failing, and each cell's time.

Usage: python scripts/notebook_margins.py [--out FILE.json] chapters/03_lora.ipynb ...

Every ``torch.testing.assert_close`` a chapter calls is measured on the way through: the
margin is max |actual - expected| / (atol + rtol |expected|), so 1.0 is the edge of
failure and 0.01 means the tolerance is 100x what this run needed. Run it under other
kernel paths to shake the tolerances, for example:

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python scripts/notebook_margins.py ...
    ATEN_CPU_CAPABILITY=default python scripts/notebook_margins.py ...
    OMP_NUM_THREADS=1 python scripts/notebook_margins.py ...

Nothing is written back to the notebooks. A failing cell is reported and the script exits 1.

    python scripts/notebook_margins.py --table a.json b.json ...

prints a Markdown table of the worst margin and the run time of each chapter, one column
per report written with --out (docs/portability.md shows one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]

# Runs first in the chapter's kernel: wraps assert_close so that each call also records its margin.
PROBE = r'''
import json as _json, time as _time, torch as _torch
_MARGINS_FILE = {path!r}
_assert_close = _torch.testing.assert_close
def _measured_assert_close(actual, expected, *args, **kwargs):
    try:
        a = _torch.as_tensor(actual).detach().double().cpu()
        e = _torch.as_tensor(expected).detach().double().cpu()
        if "rtol" in kwargs:
            rtol, atol = kwargs["rtol"], kwargs["atol"]
        else:
            from torch.testing._comparison import default_tolerances
            rtol, atol = default_tolerances(_torch.as_tensor(actual), _torch.as_tensor(expected))
        finite = _torch.isfinite(a) & _torch.isfinite(e)
        diff = (a - e).abs()[finite]
        bound = (atol + rtol * e.abs())[finite]
        margin = (diff / bound).max().item() if diff.numel() and (rtol or atol) else 0.0
        with open(_MARGINS_FILE, "a") as _f:
            _f.write(_json.dumps({{"t": _time.time(), "max_abs": diff.max().item() if diff.numel() else 0.0,
                                  "rtol": rtol, "atol": atol, "margin": margin,
                                  "dtype": str(_torch.as_tensor(actual).dtype)}}) + "\n")
    except Exception:
        pass
    return _assert_close(actual, expected, *args, **kwargs)
_torch.testing.assert_close = _measured_assert_close
'''


def run(path: Path, log: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE.format(path=str(log))))
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    client = NotebookClient(nb, timeout=1800, kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                            resources={"metadata": {"path": str(path.parent)}},
                            on_cell_execute=lambda cell, cell_index: starts.__setitem__(cell_index, time.time()),
                            on_cell_executed=lambda cell, cell_index, execute_reply: ends.__setitem__(cell_index, time.time()))
    error = None
    t0 = time.perf_counter()
    try:
        client.execute()
    except Exception as err:  # report, keep what ran
        error = f"{getattr(err, 'ename', type(err).__name__)}: {' '.join(str(getattr(err, 'evalue', err)).split())[:200]}"
    seconds = time.perf_counter() - t0
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    cells = []
    for index in sorted(starts):
        if index == 0:
            continue
        begin, end = starts[index], ends.get(index, time.time())
        mine = [r for r in records if begin <= r["t"] <= end]
        cells.append({"cell": index - 1, "seconds": round(end - begin, 2),
                      "comparisons": [{k: r[k] for k in ("max_abs", "rtol", "atol", "margin", "dtype")} for r in mine]})
    return {"notebook": str(path.relative_to(ROOT)), "seconds": round(seconds, 1), "error": error, "cells": cells}


def label(report: dict) -> str:
    """``AVX2 (emulated), 1 thread`` for a report's kernel path."""
    env = report["env"]
    text = report["capability"] + (" (emulated)" if env.get("ATEN_CPU_CAPABILITY") else "")
    threads = env.get("OMP_NUM_THREADS")
    return text + (f", {threads} thread{'s' if threads != '1' else ''}" if threads else "")


def table(paths: list[str]) -> str:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    chapters = list(dict.fromkeys(r["notebook"] for rep in reports for r in rep["reports"]))
    lines = ["| chapter | " + " | ".join(label(rep) for rep in reports) + " |",
             "|---|" + "---|" * len(reports)]
    for chapter in chapters:
        cells = []
        for rep in reports:
            run = next((r for r in rep["reports"] if r["notebook"] == chapter), None)
            if run is None:
                cells.append("not run")
                continue
            worst = max((c["margin"] for cell in run["cells"] for c in cell["comparisons"]), default=0.0)
            count = sum(len(cell["comparisons"]) for cell in run["cells"])
            state = "**failed**" if run["error"] else f"{worst:.2f} of {count}"
            cells.append(f"{state}, {run['seconds']:.0f} s")
        lines.append(f"| {Path(chapter).stem} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*")
    parser.add_argument("--out", help="write the full report as JSON here")
    parser.add_argument("--table", nargs="+", metavar="REPORT", help="print a table of reports written with --out")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    if not args.notebooks:
        parser.error("name the chapters to run (or --table REPORT ...)")
    import tempfile

    from machine_info import kernel_path

    kernels = kernel_path()
    env = kernels["env"]
    print(f"kernel path: {kernels['capability']} {env or ''}", flush=True)
    reports, failed = [], False
    for name in args.notebooks:
        with tempfile.TemporaryDirectory() as tmp:
            report = run(Path(name).resolve(), Path(tmp) / "margins.jsonl")
        reports.append(report)
        worst = max((c for cell in report["cells"] for c in cell["comparisons"]), key=lambda c: c["margin"], default=None)
        slow = sorted(report["cells"], key=lambda c: -c["seconds"])[:3]
        print(f"{report['notebook']}: {report['seconds']:.1f} s" + (f"; FAILED {report['error']}" if report["error"] else ""))
        print("  slowest cells: " + ", ".join(f"{c['cell']} ({c['seconds']:.1f} s)" for c in slow))
        for cell in report["cells"]:
            for c in cell["comparisons"]:
                if c["margin"] > 0.1:
                    print(f"  cell {cell['cell']}: |diff| {c['max_abs']:.2e} is {c['margin']:.2f} of the tolerance "
                          f"(rtol {c['rtol']:.1e}, atol {c['atol']:.1e}, {c['dtype']})")
        if worst:
            print(f"  worst margin {worst['margin']:.3f}")
        failed |= report["error"] is not None
    if args.out:
        Path(args.out).write_text(json.dumps({"capability": kernels["capability"], "env": env,
                                              "reports": reports}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
