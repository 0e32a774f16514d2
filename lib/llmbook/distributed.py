r"""Several processes: launching them from a notebook, and what each of them holds.

Chapter 10. A job is a module of :mod:`llmbook.jobs` that every process runs (rank 0 writes
the result); :func:`launch` starts its processes on this machine (or runs ``accelerate
launch``), talking over 127.0.0.1, and always ends every process it started, even when a
worker fails, the time runs out, or the notebook's cell is interrupted.

Inside a job, :func:`init` joins the process group (gloo on CPUs, NCCL on GPUs),
:func:`shard` gives each rank its slice of the global batch, and :func:`held_bytes`
counts what this process holds: parameters, gradients and optimiser state, counting a
sharded tensor (FSDP2's ``DTensor``) by its local shard.

:func:`zero_bytes_per_device` is the ZeRO paper's memory model (Rajbhandari et al., 2020):
mixed-precision Adam keeps 2 bytes of half-precision weights, 2 of gradients and 12 of
optimiser state (fp32 weights, momentum, variance) per parameter, 16 in all; stage 1
splits the optimiser state over $N$ devices, stage 2 the gradients too, stage 3 the
weights as well.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import torch

from llmbook._checks import check_int

__all__ = ["LAUNCHERS", "ZERO_BYTES", "ZERO_STAGES", "DistributedJobError", "config_path", "device", "held_bytes", "init",
           "launch", "shard", "zero_bytes_per_device"]

LOCALHOST = "127.0.0.1"
JOB_MARKER = "LLMBOOK_JOB"  # an environment variable that marks every process of one job
LAUNCHERS = ("local", "accelerate")
# Bytes per parameter in mixed-precision Adam: weights, gradients, optimiser state.
ZERO_BYTES = {"weights": 2, "gradients": 2, "optimizer": 12}
ZERO_STAGES = (0, 1, 2, 3)


def config_path(name: str) -> Path:
    """The committed accelerate config ``configs/accelerate/<name>.yaml`` (ddp, fsdp2, zero2, zero3)."""
    folder = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}")
    return folder / f"{name}.yaml"


class DistributedJobError(RuntimeError):
    """A job of several processes failed; the message names the rank and its error.

    ``statuses`` holds each process's exit status once the job was ended: 0 for a clean
    exit, a positive code for an error, ``-15`` for a process ended by SIGTERM.
    """

    def __init__(self, message: str, *, statuses: list[int | None] | None = None):
        super().__init__(message)
        self.statuses = statuses or []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return probe.getsockname()[1]


def _end_group(pgid: int, processes: Sequence[subprocess.Popen]) -> None:
    """Stop every process of the job's process group: SIGTERM, then SIGKILL after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for process in processes:
                process.poll()
            try:
                os.killpg(pgid, 0)  # anything left in the group (a worker's own children too)?
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _marked(marker: str) -> list[int]:
    """The processes whose environment holds ``marker`` (Linux's /proc; only this user's are readable)."""
    found, needle = [], marker.encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def _end_marked(marker: str) -> None:
    """SIGTERM, then SIGKILL after 10 s, every process that still carries the job's marker."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _marked(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = _marked(marker)
        if not pids:
            return


def _running(processes: Sequence[subprocess.Popen]) -> bool:
    """Whether any process still runs; every one is polled (so each exit status is recorded)."""
    return any([p.poll() is None for p in processes])


def _a_peer_failed(log: str) -> bool:
    return any(sign in _last_error(log) for sign in ("Connection closed by peer", "remote worker",
                                                     "Connection reset by peer"))


def _last_error(log: str) -> str:
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0] or line.startswith("AssertionError")]
    return errors[-1] if errors else (lines[-1] if lines else "(no output)")


def _commands(module: str, args: Sequence[str], nproc: int, launcher: str, config, port: str) -> list[list[str]]:
    if launcher == "local":
        return [[sys.executable, "-m", module, *args] for _ in range(nproc)]
    return [[sys.executable, "-m", "accelerate.commands.launch", "--config-file", str(config), "--num-processes",
             str(nproc), "--main-process-ip", LOCALHOST, "--main-process-port", port, "-m", module, *args]]


def launch(module: str, *args: str, nproc: int = 2, launcher: str = "local",
           config: str | os.PathLike | None = None, timeout: float = 600, threads: int = 1) -> str:
    """Run ``python -m module *args`` in ``nproc`` processes on this machine; returns their output.

    Args:
        module: a module with a ``__main__`` block, ``"llmbook.jobs.gradients"`` say.
        args: its command-line arguments (strings).
        nproc: processes (1 to 64); on a GPU machine, one per GPU.
        launcher: ``"local"`` starts the processes itself: they meet through a file (a
            ``FileStore``) and gloo talks over the loopback interface, so nothing listens
            beyond 127.0.0.1. ``"accelerate"`` runs ``accelerate launch --config-file config``,
            which starts torchrun; torchrun's rendezvous store listens on every interface
            (PyTorch offers no address to bind it to) for as long as the job runs.
        config: an accelerate config file (only with ``launcher="accelerate"``).
        timeout: seconds before the job is stopped.
        threads: CPU threads per process (``OMP_NUM_THREADS``).

    The processes of a ``"local"`` job share one new POSIX process group, which is ended
    (SIGTERM, then SIGKILL) on every way out of this function: success, a failed worker,
    the timeout, or an interrupted notebook cell. Under ``"accelerate"``, torchrun starts
    its workers in sessions of their own, outside that group: every process that carries the
    job's mark in its environment (``LLMBOOK_JOB``, inherited by all) is ended as well.

    Raises:
        ValueError / TypeError: bad arguments.
        DistributedJobError: a worker failed (the message names its rank and its error) or
            the time ran out.
    """
    if not isinstance(module, str) or not module.replace(".", "").replace("_", "").isalnum():
        raise ValueError(f"module must be a dotted module name such as 'llmbook.jobs.gradients', got {module!r:.60}")
    if not all(isinstance(a, str) for a in args):
        raise TypeError("args must be strings (the module's command line)")
    nproc = check_int(nproc, "nproc", minimum=1, maximum=64)
    threads = check_int(threads, "threads", minimum=1)
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if (config is None) != (launcher == "local"):
        raise ValueError("config: an accelerate config file is needed with launcher='accelerate', and "
                         f"none with 'local'; got launcher={launcher!r}, config={config!r}")
    if config is not None and not Path(config).is_file():
        raise ValueError(f"config must be an accelerate config file, got {str(config)!r} (not a file)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="llmbook-job-") as tmp:
        commands = _commands(module, args, nproc, launcher, config, port)
        job = uuid.uuid4().hex  # in the environment of every process of this job, whatever its group
        marker = f"{JOB_MARKER}={job}"
        base = dict(os.environ, OMP_NUM_THREADS=str(threads), MASTER_ADDR=LOCALHOST, MASTER_PORT=port,
                    GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        base[JOB_MARKER] = job
        processes, logs, pgid = [], [], None
        try:
            for rank, command in enumerate(commands):
                env = dict(base)
                if launcher == "local":
                    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                               LOCAL_WORLD_SIZE=str(nproc), LLMBOOK_STORE=str(Path(tmp) / "store"))
                logs.append(open(Path(tmp) / f"rank{rank}.log", "w+"))
                group = pgid or 0  # the first process leads a new group; the others join it
                processes.append(subprocess.Popen(command, stdout=logs[-1], stderr=subprocess.STDOUT, env=env,
                                                  preexec_fn=lambda group=group: os.setpgid(0, group)))
                pgid = pgid or processes[0].pid
            deadline = time.monotonic() + timeout
            failed: list[int] = []  # in the order their failures were seen
            while _running(processes) and time.monotonic() < deadline:
                failed += [r for r, p in enumerate(processes) if p.returncode not in (None, 0) and r not in failed]
                if failed:
                    break  # the others would wait for it in their next collective: end them
                time.sleep(0.05)
            if failed:  # give the others a moment to fail with their own errors, or end
                settle = time.monotonic() + 2
                while _running(processes) and time.monotonic() < settle:
                    time.sleep(0.05)
            failed += [r for r, p in enumerate(processes) if p.returncode not in (None, 0) and r not in failed]
            timed_out = not failed and any(p.returncode is None for p in processes)
            _end_group(pgid, processes)  # before reading the statuses: a stopped rank shows -15
            texts = []
            for log in logs:
                log.seek(0)
                texts.append(log.read())
            statuses = [p.returncode for p in processes]
            if failed:
                # A rank that failed because a peer went away is a consequence, not the cause.
                rank = min(failed, key=lambda r: (_a_peer_failed(texts[r]), failed.index(r)))
                who = f"rank {rank}" if launcher == "local" else "accelerate launch"
                raise DistributedJobError(f"the job {module} failed in {who}: {_last_error(texts[rank])}\n"
                                          f"exit statuses by rank: {statuses}\nlast lines of its output:\n"
                                          + "\n".join(texts[rank].splitlines()[-12:]), statuses=statuses)
            if timed_out:
                tails = "".join(f"\nrank {r}: {_last_error(t)}" for r, t in enumerate(texts) if t.strip())
                raise DistributedJobError(f"the job {module} ran past its timeout of {timeout:g} s and was stopped\n"
                                          f"exit statuses by rank: {statuses}{tails}", statuses=statuses)
            return "".join(texts)
        finally:
            if pgid is not None:
                _end_group(pgid, processes)
            _end_marked(marker)  # workers that left the group (torchrun starts its own sessions)
            for log in logs:
                log.close()


# ---------------------------------------------------------------------------- inside a job


def _exit_at_once(hook):
    """An excepthook that reports the error, then ends the process without its usual teardown.

    A worker whose error goes up to the top would otherwise wait in the process group's
    teardown for peers that may be busy for a long time: the launcher would see it alive.
    """

    def report_and_exit(kind, value, traceback):
        hook(kind, value, traceback)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)

    return report_and_exit


def _use_nccl(local_world_size: int) -> bool:
    """NCCL when every process on this machine can have a GPU of its own; gloo (CPU) otherwise."""
    return torch.cuda.is_available() and local_world_size <= torch.cuda.device_count()


def init() -> tuple[int, int]:
    """Join the job's process group; returns ``(rank, world_size)``.

    NCCL with one GPU per process where this machine has a GPU for each of its processes,
    gloo on the CPU otherwise (2 processes on a 1-GPU machine included: NCCL refuses two
    ranks on one GPU).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        # the processes on this machine (torchrun and launch set it; several machines: fewer than all)
        backend = "nccl" if _use_nccl(int(os.environ.get("LOCAL_WORLD_SIZE", world_size))) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        store = os.environ.get("LLMBOOK_STORE")  # launch(launcher="local"): meet through a file
        if store:
            dist.init_process_group(backend, init_method=f"file://{store}", rank=int(os.environ["RANK"]),
                                    world_size=world_size)
        else:
            dist.init_process_group(backend)
        sys.excepthook = _exit_at_once(sys.excepthook)  # around torch's own, which marks the rank
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """Where a job's tensors live: this process's GPU under NCCL, else the CPU (gloo).

    Outside a job (no process group), the device one process would pick
    (:func:`llmbook.models.pick_device`).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        from llmbook.models import pick_device

        return pick_device()
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous slice of ``items``, whose length must divide evenly."""
    world_size = check_int(world_size, "world_size", minimum=1)
    rank = check_int(rank, "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if len(items) % world_size:
        raise ValueError(f"items: {len(items)} do not split evenly over {world_size} processes")
    size = len(items) // world_size
    return list(items[rank * size:(rank + 1) * size])


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's own shard
    return local.numel() * local.element_size()


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds of the trainable parameters, their gradients and the optimiser state."""
    params = [p for p in model.parameters() if p.requires_grad]
    state = optimizer.state.values() if optimizer is not None else []
    return {
        "parameters": sum(_local_bytes(p) for p in params),
        "gradients": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for s in state for v in s.values() if torch.is_tensor(v) and v.dim() > 0),
    }


def zero_bytes_per_device(n_params: int, n_devices: int, stage: int,
                          bytes_per_param: dict[str, int] | None = None) -> dict[str, float]:
    """Bytes per device of Adam training under ZeRO ``stage`` (0 is plain data parallelism).

    Returns ``{"weights", "gradients", "optimizer", "total"}``: ``bytes_per_param`` (default
    :data:`ZERO_BYTES`, mixed precision: 2, 2 and 12) times ``n_params``, each divided by
    ``n_devices`` from the stage that partitions it on (optimiser state from 1, gradients
    from 2, weights at 3). Plain fp32 Adam is ``{"weights": 4, "gradients": 4, "optimizer": 8}``.
    """
    n_params = check_int(n_params, "n_params", minimum=1)
    n_devices = check_int(n_devices, "n_devices", minimum=1)
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        raise ValueError(f"stage must be one of {ZERO_STAGES} (0: no partitioning), got {stage!r}")
    sizes = dict(ZERO_BYTES if bytes_per_param is None else bytes_per_param)
    if set(sizes) != set(ZERO_BYTES) or not all(isinstance(v, int) and v > 0 for v in sizes.values()):
        raise ValueError(f"bytes_per_param must give a positive int for each of {sorted(ZERO_BYTES)}, got {sizes!r}")
    split_from = {"optimizer": 1, "gradients": 2, "weights": 3}
    out = {k: n_params * b / (n_devices if stage >= split_from[k] else 1) for k, b in sizes.items()}
    out["total"] = sum(out.values())
    return out
