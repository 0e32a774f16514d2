"""Run every benchmarks/bench_*.py and write the results the performance appendix shows.

Usage: python scripts/run_benchmarks.py [bench_lora ...]     (`make bench` runs them all)
       python scripts/run_benchmarks.py --render     (rewrite the table from the last results)

Each benchmark runs in its own process and prints one line per measurement,
``what: ours, reference, ratio R`` (R = ours / reference, measured in the same run).
Every time in them comes from one timer, ``llmbook.utils.time_interleaved`` (or
``time_call``, its case of one callable): the median (bench_sampling: the fastest) of
repeated runs after untimed warm-up, synchronised on a GPU, with ours and the reference
run in turns wherever they share a process, so that other load hits both alike.
This script collects those lines with the machine they ran on into
``benchmarks/results.json`` and renders ``benchmarks/results.md``, which
``performance.md`` includes. Naming some benchmarks reruns only those and keeps the
others' last results (each keeps its own machine and date). A benchmark that fails is
recorded as failed, and the script exits non-zero after writing everything.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import machine_info

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "results.md"
LOG_DIR = BENCH_DIR / "results"  # full outputs, not committed
TIMEOUT_S = 600

# "what: ours, reference, ratio 1.03" - `what` may hold commas inside parentheses.
LINE = re.compile(r"^(?P<what>[^:]+?):\s*(?P<ours>.+?),\s*(?P<reference>[^,]+?),\s*ratio\s*(?P<ratio>[-+0-9.eE]+x?)\s*$")


def parse_lines(stdout: str) -> tuple[list[dict], list[str]]:
    """Split a benchmark's output into measurements and other lines."""
    rows, other = [], []
    for line in stdout.splitlines():
        line = line.strip()
        if not line:
            continue
        match = LINE.match(line)
        if match:
            rows.append({k: v.strip() for k, v in match.groupdict().items()})
        else:
            other.append(line)
    return rows, other


def run_one(script: Path) -> dict:
    start, load = time.perf_counter(), machine_info.load_average()
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        returncode, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as err:
        returncode, stdout, stderr = "timeout", err.stdout or "", f"timed out after {TIMEOUT_S} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    seconds = time.perf_counter() - start
    LOG_DIR.mkdir(exist_ok=True)
    (LOG_DIR / f"{script.stem}.log").write_text(f"$ python {script.name}\n{stdout}\n--- stderr ---\n{stderr}")
    rows, other = parse_lines(stdout)
    error = None
    if returncode != 0:
        tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [""]
        error = f"exit {returncode}: {tail[0][:200]}"
    elif not rows:
        error = "printed no `what: ours, reference, ratio R` line"
    return {"rows": rows, "other": other, "error": error, "seconds": round(seconds, 1),
            "load_before": load, "machine": machine_info.describe()}


def cell(text) -> str:
    return str(text).replace("|", "\\|")


def render(results: dict) -> str:
    machines = {}
    for name in sorted(results):
        key = machine_info.one_line(results[name]["machine"])
        machines.setdefault(key, []).append(name)
    out = ["<!-- Written by scripts/run_benchmarks.py (make bench); edits here are overwritten. -->", ""]
    for number, (machine, names) in enumerate(machines.items(), start=1):
        dates = sorted({results[n]["machine"]["date"] for n in names})
        loads = [results[n]["load_before"] for n in names if results[n]["load_before"] is not None]
        load = ""
        if loads:
            spread = f"{min(loads)}" if min(loads) == max(loads) else f"{min(loads)} to {max(loads)}"
            cores = results[names[0]]["machine"]["cores"]
            busy = f" (above {cores}: other work shared the CPU)" if max(loads) > cores else f" (at most {cores}: a quiet machine)"
            load = f"; 1-minute load average before the run: {spread}{busy}"
        out.append(f"**Machine {number}**: {machine}. Measured {', '.join(dates)}{load}.")
        out.append("")
    out += ["| benchmark | what | ours | reference | ratio ours / reference | machine |",
            "|---|---|---|---|---|---|"]
    machine_number = {n: i for i, names in enumerate(machines.values(), start=1) for n in names}
    for name in sorted(results):
        result = results[name]
        for row in result["rows"]:
            out.append(f"| `{name}` | {cell(row['what'])} | {cell(row['ours'])} | {cell(row['reference'])} "
                       f"| **{cell(row['ratio'])}** | {machine_number[name]} |")
        if result["error"]:
            out.append(f"| `{name}` | failed: {cell(result['error'])} | | | | {machine_number[name]} |")
    notes = [(n, line) for n in sorted(results) for line in results[n]["other"]]
    if notes:
        out += ["", "Other lines the benchmarks printed:", ""]
        out += [f"- `{n}`: {line}" for n, line in notes]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="benchmarks to run (bench_lora or bench_lora.py); default all")
    parser.add_argument("--render", action="store_true",
                        help="run nothing: rewrite benchmarks/results.md from benchmarks/results.json")
    args = parser.parse_args(argv)
    if args.render and not RESULTS_JSON.is_file():
        parser.error(f"no measurements in {RESULTS_JSON} yet: run `make bench`")
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        return 0
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if args.names:
        wanted = {n.removesuffix(".py") for n in args.names}
        unknown = wanted - {s.stem for s in scripts}
        if unknown:
            parser.error(f"no such benchmark: {sorted(unknown)}; have {[s.stem for s in scripts]}")
        scripts = [s for s in scripts if s.stem in wanted]
    results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.is_file() and args.names else {}
    existing = {s.stem for s in BENCH_DIR.glob("bench_*.py")}
    results = {k: v for k, v in results.items() if k in existing}  # drop benchmarks that are gone
    failed = []
    for script in scripts:
        print(f"{script.name} ...", flush=True)
        result = run_one(script)
        results[script.stem] = result
        for row in result["rows"]:
            print(f"  {row['what']}: {row['ours']}, {row['reference']}, ratio {row['ratio']}")
        if result["error"]:
            failed.append(script.name)
            print(f"  FAILED ({result['error']}); full output in {LOG_DIR / (script.stem + '.log')}")
        print(f"  ({result['seconds']} s)", flush=True)
    RESULTS_JSON.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    RESULTS_MD.write_text(render(results))
    print(f"wrote {RESULTS_MD.relative_to(ROOT)} and {RESULTS_JSON.relative_to(ROOT)}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
