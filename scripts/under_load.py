"""Run a command while busy processes occupy every CPU core, as on a reader's busy laptop.

Usage: python scripts/under_load.py [--workers N] [--max-seconds S] -- COMMAND ...
       make test-under-load        (runs `make test` this way)

The book's checks must not depend on an idle machine: a chapter asserts on counts, never
on a clock, so `make test` has to pass while other work shares the CPU. This starts
``--workers`` processes (default: one per core) that each spin in a Python loop, runs the
command, then stops them (and the command, when it is itself stopped by SIGTERM or Ctrl-C) and reports
the command's wall time and the load average. Each worker also stops by itself after
``--max-seconds`` (default 5 hours), so nothing outlives an interrupted run. The workers'
process ids are passed to the command in ``LLMBOOK_LOAD_PIDS`` (space-separated). The exit
status is the command's.

OpenMP threads that wait for each other spin by default (``OMP_WAIT_POLICY`` unset). That is
the fastest choice on an idle machine, and the slowest on a busy one: a thread spins on a core
that the other thread, descheduled by the busy processes, needs (README, "On a busy machine",
has chapter 1's times both ways). So the command gets ``OMP_WAIT_POLICY=PASSIVE`` unless the
caller set a policy: how a thread waits, not what it computes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import time


def spin(until: float) -> None:
    """Keep one core busy until the monotonic clock passes ``until``."""
    x = 0
    while time.monotonic() < until:
        for _ in range(100_000):
            x = (x * 1_103_515_245 + 12_345) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="busy processes to start (default: one per core)")
    parser.add_argument("--max-seconds", type=float, default=5 * 3600,
                        help="each worker stops by itself after this long (default 18000)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: give the command to run after --, e.g. -- make test")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be > 0, got {args.max_seconds}")

    # Stopped from outside (SIGTERM), still stop the workers: the finally below runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    until = time.monotonic() + args.max_seconds
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=spin, args=(until,), daemon=True) for _ in range(args.workers)]
    for worker in workers:
        worker.start()
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ,
           "LLMBOOK_LOAD_PIDS": " ".join(str(w.pid) for w in workers)}
    print(f"under_load: {args.workers} busy process(es) on {os.cpu_count()} core(s); running "
          f"{' '.join(command)} with OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}", flush=True)
    start = time.monotonic()
    status, child = 143, subprocess.Popen(command, env=env)
    try:
        status = child.wait()
    finally:
        if child.poll() is None:  # stopped from outside: stop the command too
            child.terminate()
            child.wait()
        load = os.getloadavg()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    print(f"under_load: exit status {status} after {minutes} min {seconds:02d} s; load average "
          f"at the end {load[0]:.1f} (1 min), {load[1]:.1f} (5 min), {load[2]:.1f} (15 min)")
    return status


if __name__ == "__main__":
    sys.exit(main())
