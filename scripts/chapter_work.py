"""Count the work each chapter's cells ask of PyTorch, and say where the chapters' time goes.

Usage: python scripts/chapter_work.py [--jobs 2] [chapters/05_sft_hallucination.ipynb ...]  (make work)
       python scripts/chapter_work.py --render     (rewrite the page from the last counts)

A time says how long a chapter took on one machine; a count says what it asked the machine
to do, and does not move with the load. Each chapter runs top to bottom in a fresh kernel
with a ``llmbook.utils.WorkCounter`` around every code cell: its floating-point operations
(matrix products and attention), and every operator call PyTorch dispatched. Work done in
other processes (chapter 10's jobs) is not seen. The counter slows the cells down (every
operator call passes through Python), so the times come from ``make times``
(``docs/chapter_times.json``), whose cells are matched by their first line of code.

Two rates, measured first on this machine with the kernels of the environment, turn counts
into seconds: the model's training step on a wide batch (arithmetic at the rate the
matrix products reach) and the cost of one operator call when decoding one token at a
time (what a step costs beyond its arithmetic: dispatch, and reading every weight for a
few rows). ``docs/chapter_work.md`` compares each long cell's time with
``flops / rate + ops * cost``; what is left is work no count covers (Python, the
tokenizer, starting processes).
"""

from __future__ import annotations

import argparse
import multiprocessing
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import machine_info
import nbformat
from chapter_times import ROOT, TIMES_JSON, code_fingerprint, first_code_line, minutes, toc_notebooks
from nbclient import NotebookClient

WORK_JSON = ROOT / "docs" / "chapter_work.json"
WORK_MD = ROOT / "docs" / "chapter_work.md"
CELL_TIMEOUT_S = 3600

# Run in the kernel before the chapter's first cell: a counter around every later cell, each
# cell's counts written to $LLMBOOK_WORK_OUT as soon as it ends (so a failure keeps them).
HOOK = """
import json as _json, os as _os, time as _time
from llmbook.utils import WorkCounter as _WorkCounter
_work_cells, _work_now = [], {}
def _work_pre(info):
    counter = _WorkCounter()
    counter.__enter__()
    _work_now.update(counter=counter, start=_time.perf_counter(), source=info.raw_cell)
def _work_post(result):
    counter = _work_now.pop("counter", None)
    if counter is None:
        return
    counter.__exit__(None, None, None)
    _work_cells.append({"source": _work_now["source"], "flops": counter.flops,
                        "products": counter.products, "ops": counter.ops,
                        "counted_seconds": round(_time.perf_counter() - _work_now["start"], 2)})
    with open(_os.environ["LLMBOOK_WORK_OUT"], "w") as f:
        _json.dump(_work_cells, f)
get_ipython().events.register("pre_run_cell", _work_pre)
get_ipython().events.register("post_run_cell", _work_post)
"""


def count_one(path: str, threads: int) -> dict:
    """Runs one chapter with the counter; its code cells' counts, in order."""
    nb, code = nbformat.read(ROOT / path, as_version=4), code_fingerprint(path)
    sources = [c.source for c in nb.cells if c.cell_type == "code"]
    nb.cells.insert(0, nbformat.v4.new_code_cell(HOOK))
    out = ROOT / "build" / "work" / (Path(path).stem + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    os.environ.update(LLMBOOK_WORK_OUT=str(out), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=kernel,
                            resources={"metadata": {"path": str((ROOT / path).parent)}})
    start, error = time.perf_counter(), None
    try:
        client.execute()
    except Exception as err:  # record what ran and why it stopped
        error = f"{getattr(err, 'ename', type(err).__name__)}: {' '.join(str(getattr(err, 'evalue', err)).split())[:160]}"
    counted = json.loads(out.read_text()) if out.is_file() else []
    cells, ran = [], iter(counted)
    for index, source in enumerate(sources):
        if not source.strip():
            continue  # nbclient does not send an empty cell to the kernel
        row = next(ran, None)
        if row is None:
            break
        if row.pop("source") != source:
            raise RuntimeError(f"{path}: the counts of code cell {index} are not its own")
        cells.append({"cell": index, "first_line": first_code_line(source), **row})
    return {"cells": cells, "error": error, "counted_seconds": round(time.perf_counter() - start, 1),
            "threads": threads, "code": code}


def reference_rates() -> dict:
    """The two rates: a training step on a wide batch, and a decoding step of a few rows."""
    import torch

    from llmbook import models, sampling, utils

    model, _ = models.load_model()
    gen = torch.Generator().manual_seed(0)
    wide = torch.randint(100, model.config.vocab_size, (8, 128), generator=gen)
    prompts = torch.randint(100, model.config.vocab_size, (8, 64), generator=gen)

    def train_step():
        model.zero_grad(set_to_none=True)
        model(wide, labels=wide).loss.backward()

    def decode():
        with torch.no_grad():
            sampling.generate(model, prompts, max_new_tokens=32, temperature=0.0)

    def prompt_pass():  # the part of decode() that is one wide pass, to take out of it
        with torch.no_grad():
            sampling.generate(model, prompts, max_new_tokens=1, temperature=0.0)

    rates = {}
    for name, fn in [("training step, 8 x 128 tokens", train_step), ("decoding, 8 rows x 32 tokens", decode),
                     ("prompt pass of the decoding, 8 x 64 tokens", prompt_pass)]:
        with utils.WorkCounter() as c:
            fn()
        seconds = utils.time_call(fn, repeat=3, warmup=1)
        rates[name] = {"flops": c.flops, "ops": c.ops, "seconds": round(seconds, 4)}
        print(f"  {name}: {c.flops / 1e9:.1f} GFLOP, {c.ops} operator calls, {seconds:.3f} s", flush=True)
    train, dec, pre = (rates[k] for k in rates)
    flops_per_s = train["flops"] / train["seconds"]
    # the decoding steps alone: what they cost beyond their arithmetic, per operator call
    steps_s, steps_flops, steps_ops = dec["seconds"] - pre["seconds"], dec["flops"] - pre["flops"], dec["ops"] - pre["ops"]
    per_op_s = (steps_s - steps_flops / flops_per_s) / steps_ops
    return {"measurements": rates, "flops_per_s": flops_per_s, "per_op_s": per_op_s,
            "threads": torch.get_num_threads(), "kernels": utils.cpu_capability(), "machine": machine_info.describe()}


def same_machine(a: dict, b: dict) -> bool:
    """Whether two of ``machine_info.describe()``'s records name the same kind of machine."""
    return all(a.get(k) == b.get(k) for k in ("cpu", "cores", "torch"))


def render(work: dict, order: list[str], times: dict) -> str:
    """docs/chapter_work.md from the counts and the times of ``make times``.

    A chapter timed on another machine than the one the rates were measured on gets no
    split (its row says so): the rates of one CPU do not explain the times of another.
    Nor does a chapter whose counts and time come from different code (the chapter's code
    cells or llmbook changed in between: ``code_fingerprint``).
    """
    ref = work["reference"]
    counted_code = {p: c.get("code") for p, c in work["chapters"].items()}
    times = {p: t for p, t in times.items() if same_machine(t.get("machine", {}), ref["machine"])
             and t.get("code") is not None and t.get("code") == counted_code.get(p)}
    rate, per_op = ref["flops_per_s"], ref["per_op_s"]
    out = ["<!-- Written by scripts/chapter_work.py (make work); edits here are overwritten. -->", "",
           "# Where the chapters' time goes, counted", "",
           "Times are from the last `make times` (`docs/chapter_times.json`); the counts from `make work`: each "
           "chapter run with `llmbook.utils.WorkCounter` around every cell. FLOPs are those of matrix products "
           "and attention (forward and backward); operator calls are every call PyTorch dispatched. Two rates, "
           f"measured on the machine the chapters were timed on ({ref['machine']['cores']} cores of "
           f"{ref['machine']['cpu']}, {ref['machine']['date']}) with {ref['kernels']} kernels and {ref['threads']} "
           "threads, turn counts into seconds (a chapter timed on another machine, or on other code than it was "
           "counted on, shows no split):", "",
           "| measurement | GFLOP | operator calls | seconds |", "|---|---|---|---|"]
    for name, m in ref["measurements"].items():
        out.append(f"| {name} | {m['flops'] / 1e9:.1f} | {m['ops']:,} | {m['seconds']:.3f} |")
    out += ["", f"- **arithmetic**: the training step's rate, **{rate / 1e9:.0f} GFLOP/s**;",
            f"- **per operator call**: what a decoding step costs beyond its arithmetic at that rate, divided by "
            f"its operator calls (the prompt pass taken out): **{per_op * 1e6:.0f} µs**. It is the price of "
            "small steps: Python and dispatch, and, for a few rows, reading every weight from memory once "
            "per step.", "",
            "A cell's *explained* time is `GFLOP / rate + calls × cost`; *other* is the rest of its measured "
            "time (Python, the tokenizer, plotting, starting processes; negative where a cell's products ran "
            "faster than the training step's).", "",
            "| chapter | run time | GFLOP | operator calls | arithmetic | per call | other |",
            "|---|---|---|---|---|---|---|"]
    totals = [0.0, 0.0, 0.0, 0.0, 0, 0]  # seconds, arithmetic, calls, other, flops, ops
    for path in (p for p in order if p in work["chapters"]):
        cells = work["chapters"][path]["cells"]
        flops, ops = sum(c["flops"] for c in cells), sum(c["ops"] for c in cells)
        seconds = times.get(path, {}).get("seconds")
        arith, calls = flops / rate, ops * per_op
        other = seconds - arith - calls if seconds else None
        for i, v in enumerate([seconds or 0, arith, calls, other or 0, flops, ops]):
            totals[i] += v
        out.append(f"| {Path(path).stem} | {signed(seconds)} | {flops / 1e9:,.0f} | "
                   f"{ops / 1e6:.2f} M | {minutes(arith)} | {minutes(calls)} | {signed(other)} |")
    seconds, arith, calls, other, flops, ops = totals
    every_split = all(p in times for p in work["chapters"])  # else the sums of time and other are partial
    seconds, other = (seconds, other) if every_split else (None, None)
    out.append(f"| **all** | **{signed(seconds)}** | **{flops / 1e9:,.0f}** | **{ops / 1e6:.2f} M** | "
               f"**{minutes(arith)}** | **{minutes(calls)}** | **{signed(other)}** |")
    if seconds:
        out += ["", f"Of the chapters' {minutes(seconds)}: arithmetic {arith / seconds:.0%}, operator calls "
                f"{calls / seconds:.0%}, other {other / seconds:.0%}."]
    out += ["", "The longest cells of each chapter (`docs/chapter_profile.md`), counted:", "",
            "| chapter | cell | first line | seconds | GFLOP | GFLOP/s | operator calls | explained |",
            "|---|---|---|---|---|---|---|---|"]
    for path in (p for p in order if p in work["chapters"]):
        counted = {c["cell"]: c for c in work["chapters"][path]["cells"]}
        for rank, p in enumerate(times.get(path, {}).get("profile", [])):
            c = counted.get(p["cell"])
            if c is None or c["first_line"] != p["first_line"]:
                continue  # the chapter changed since it was timed
            name = Path(path).stem if rank == 0 else ""
            explained = c["flops"] / rate + c["ops"] * per_op
            line = p["first_line"].replace("|", "\\|")
            out.append(f"| {name} | {p['cell']} | `{line}` | {p['seconds']:.1f} | {c['flops'] / 1e9:,.0f} | "
                       f"{c['flops'] / 1e9 / p['seconds']:.0f} | {c['ops'] / 1e6:.2f} M | {explained:.1f} s |")
    return "\n".join(out) + "\n"


def signed(seconds: float | None) -> str:
    """``1 min 02.0 s``, ``-2.0 s`` or ``—`` (no time measured)."""
    if seconds is None:
        return "—"
    return minutes(seconds) if seconds >= 0 else f"{seconds:.1f} s"


def last_times() -> dict:
    return json.loads(TIMES_JSON.read_text()) if TIMES_JSON.is_file() else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="chapters to count (default: every chapter in _toc.yml)")
    parser.add_argument("--jobs", type=int, default=2, help="chapters counted at once, one thread each if > 1")
    parser.add_argument("--render", action="store_true", help="count nothing: rewrite the page from the last counts")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    order = toc_notebooks()
    if args.render:
        if not WORK_JSON.is_file():
            parser.error(f"no counts in {WORK_JSON} yet: run `make work`")
        WORK_MD.write_text(render(json.loads(WORK_JSON.read_text()), order, last_times()))
        return 0
    wanted = [str(Path(n)) for n in args.notebooks] or order
    unknown = [n for n in wanted if n not in order]
    if unknown:
        parser.error(f"not a chapter of _toc.yml: {unknown}; have {order}")
    work = json.loads(WORK_JSON.read_text()) if WORK_JSON.is_file() and args.notebooks else {"chapters": {}}
    print("rates ...", flush=True)
    work["reference"] = reference_rates()
    threads = 1 if args.jobs > 1 else work["reference"]["threads"]
    failed = []
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        # the longest chapters first, so that the last to finish is a short one
        known = last_times()
        queue = sorted(wanted, key=lambda p: -known.get(p, {}).get("seconds", 0))
        for path, result in zip(queue, pool.map(count_one, queue, [threads] * len(queue))):
            work["chapters"][path] = result
            flops = sum(c["flops"] for c in result["cells"])
            print(f"{path}: {flops / 1e9:,.0f} GFLOP, {len(result['cells'])} cells, counted in "
                  f"{minutes(result['counted_seconds'])}" + (f"; FAILED: {result['error']}" if result["error"] else ""),
                  flush=True)
            if result["error"]:
                failed.append(path)
    work["chapters"] = {p: work["chapters"][p] for p in order if p in work["chapters"]}
    WORK_JSON.write_text(json.dumps(work, indent=1) + "\n")
    WORK_MD.write_text(render(work, order, last_times()))
    print(f"wrote {WORK_MD.relative_to(ROOT)} and {WORK_JSON.relative_to(ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
