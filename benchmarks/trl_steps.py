"""Timing one training step of ours against one step of a TRL trainer (bench_dpo, bench_grpo, bench_reward).

:func:`time_steps` times any step callable the same way; :class:`TRLSteps` makes one
optimiser step of ``trainer.train()`` such a callable; :func:`child_result` runs one side
of a benchmark in a process of its own, so that its peak memory is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

from llmbook.utils import peak_memory_since, peak_memory_start, time_interleaved


def child_result(script: str, *args: str) -> dict:
    """Run ``python script *args`` and return the JSON object its last line of output prints."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_steps(step, device, ready=lambda: None, *, warmup: int, steps: int) -> dict:
    """``warmup`` untimed calls of ``step``, then the median seconds of ``steps`` more and the
    peak memory (MiB) they add. ``step`` is called exactly ``warmup + steps`` times, each time
    after ``ready()`` (untimed, and harmless to call twice) returns."""
    for _ in range(warmup):
        ready()
        step()
    ready()
    start = peak_memory_start(device)
    seconds = time_interleaved({"step": step}, setup={"step": ready}, repeat=steps, warmup=0, device=device)
    return {"seconds": seconds["step"], "peak_mib": peak_memory_since(device, start) / 2**20}


class TRLSteps:
    """One optimiser step of ``trainer.train()`` per call, so it can be timed like any callable.

    ``trainer.train()`` runs in a thread of its own, which a callback holds at both ends of
    every step: at ``on_step_begin`` (the step's batch loaded) until the step is called,
    and at ``on_step_end`` until :meth:`ready` is called. A call therefore covers what TRL
    runs between those two events (forward, backward, clipping, the optimiser and
    scheduler steps), as a callback timing them would, and nothing else runs while the
    caller reads a clock or the peak memory; :meth:`ready` (untimed) lets the trainer log
    the step and load the next batch. Call ``ready()`` before each step, ``max_steps``
    steps in all, then :meth:`close`.
    """

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self._held = threading.Event()  # the trainer waits at a step's beginning, or has ended
        self._go, self._ended, self._resume = (threading.Semaphore(0) for _ in range(3))
        self._at_end, self._finished, self._failed = False, False, []
        outer = self

        class HoldAtBothEnds(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                outer._held.set()
                outer._go.acquire()

            def on_step_end(self, args, state, control, **kwargs):
                outer._ended.release()
                outer._resume.acquire()

        def run():
            try:
                trainer.train()
            except BaseException as error:  # re-raised in the calling thread
                self._failed.append(error)
            finally:  # wake a ready() or a step waiting for a step that will not come
                self._finished = True
                self._held.set()
                self._ended.release()

        trainer.add_callback(HoldAtBothEnds())
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def _raise_if_failed(self):
        if self._failed:
            raise RuntimeError("TRL's training failed") from self._failed[0]

    def ready(self) -> None:
        """Let the trainer finish the last step and wait until it holds at the next one (untimed)."""
        if self._at_end:
            self._at_end = False
            self._resume.release()
        self._held.wait()

    def __call__(self) -> None:
        if self._at_end or not self._held.is_set():
            raise RuntimeError("call ready() before each step")
        self._raise_if_failed()
        if self._finished:
            raise RuntimeError("TRL's training has ended: more steps than max_steps")
        self._held.clear()
        self._go.release()
        self._ended.acquire()
        self._at_end = True
        self._raise_if_failed()

    def close(self) -> None:
        """Let ``trainer.train()`` finish, and wait for it."""
        self.ready()
        self._thread.join()
        self._raise_if_failed()
