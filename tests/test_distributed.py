"""Several processes on this CPU: equal to one process, cleaned up on every way out, loopback only.

The jobs run with 2 processes over gloo. The reference for the training job is plain
torch in this process on the whole batch; the ZeRO formula is checked against the
numbers of the ZeRO paper (Rajbhandari et al., 2020, Figure 1: 7.5 B parameters, 64
devices).
"""

from __future__ import annotations

import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llmbook import distributed
from llmbook.utils import tolerance

sys.path.insert(0, str(Path(__file__).parent))
from test_lab import listening_sockets  # noqa: E402

WORKER = """
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from llmbook import distributed

def main():
    rank, world = distributed.init()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    mine = torch.stack(distributed.shard(list(x), rank, world)), torch.stack(distributed.shard(list(y), rank, world))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = None
    for step in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(ddp(mine[0]), mine[1]).backward()
        grads = grads or [p.grad.clone() for p in model.parameters()]
        optimizer.step()
    if rank == 0:
        torch.save({"grads": grads, "weights": [p.detach() for p in model.parameters()], "world": world}, sys.argv[1])
    dist.destroy_process_group()

main()
"""

SLEEPER = """
import sys, time
from pathlib import Path
from llmbook import distributed
import torch.distributed as dist
rank, world = distributed.init()
dist.barrier()
Path(sys.argv[1] + f".{rank}").write_text("ready")
time.sleep(120)
"""


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    """A folder on the workers' import path, for job modules written by a test."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(folder))

    def write(name: str, source: str) -> str:
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def _running(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _interrupted_when_ready(ready: Path, run, look=lambda: None):
    """Run ``run()`` and raise KeyboardInterrupt in it (as a stopped notebook cell does) once both
    processes have written ``ready.<rank>``; returns what ``look()`` saw at that moment."""
    seen = {}

    def interrupt(signum, frame):
        if all(Path(f"{ready}.{rank}").exists() for rank in range(2)):
            seen["value"] = look()
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, 0.2)

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return seen.get("value")


def test_two_processes_train_like_one_process_on_the_whole_batch(jobs, tmp_path):
    module = jobs("ddp_worker", WORKER)
    distributed.launch(module, str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt")
    assert got["world"] == 2
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if step == 0:
            for ours, reference in zip(got["grads"], model.parameters()):
                torch.testing.assert_close(ours, reference.grad, **tolerance(torch.float32, "op"))
        optimizer.step()
    for ours, reference in zip(got["weights"], model.parameters()):
        torch.testing.assert_close(ours, reference.detach(), **tolerance(torch.float32, "op"))
    # The check can fail: one process's half alone is not the whole batch's gradient.
    torch.manual_seed(0)
    half = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    torch.nn.functional.mse_loss(half(x[:4]), y[:4]).backward()
    assert not torch.allclose(half[0].weight.grad, got["grads"][0], **tolerance(torch.float32, "op"))


def test_a_failing_worker_ends_the_job_names_itself_and_leaves_no_process():
    """Rank 1 raises while rank 0 is busy for 10 minutes: the launcher must end rank 0 itself."""
    # the error names rank 1's failure, not the timeout: the launcher did not wait for it
    with pytest.raises(distributed.DistributedJobError,
                       match="failed in rank 1: RuntimeError: rank 1 cannot go on") as error:
        distributed.launch("llmbook.jobs.crash", "--rank1", "fail", timeout=120)
    assert error.value.statuses == [-15, 1]  # rank 0 ended by SIGTERM; rank 1's own error
    assert _running("llmbook.jobs.crash") == []


def test_a_job_past_its_timeout_is_stopped_with_its_processes(jobs, tmp_path):
    module = jobs("sleeper_timeout", SLEEPER)
    with pytest.raises(distributed.DistributedJobError, match="ran past its timeout of 8 s"):
        distributed.launch(module, str(tmp_path / "ready"), timeout=8)
    assert _running(module) == []


def test_an_interrupted_launch_leaves_no_process_and_listened_on_loopback_only(jobs, tmp_path):
    """A KeyboardInterrupt (a notebook cell stopped) during a job; the ports it opened meanwhile."""
    module = jobs("sleeper_interrupted", SLEEPER)
    ready = tmp_path / "ready"
    before = listening_sockets()
    seen = _interrupted_when_ready(ready, lambda: distributed.launch(module, str(ready), timeout=100),
                                   lambda: listening_sockets() - before)
    assert _running(module) == []
    assert seen, "the job's processes opened no port (gloo's pairs listen)"
    # 0100007F is 127.0.0.1 in the kernel's table; nothing on 0.0.0.0 or ::
    assert {address for address, _ in seen} == {"0100007F"}, seen


def test_accelerate_launch_with_the_committed_config_computes_one_processs_gradient(tmp_path):
    """`accelerate launch --config-file configs/accelerate/ddp.yaml` on 2 CPU processes, one step.

    The first step's averaged gradient (scale included, which Adam's first update would
    hide) is compared with one process's gradient of the whole batch, computed here.
    """
    from llmbook import data, losses
    from llmbook.jobs import common

    runs = {}
    for launcher, config in (("local", None), ("accelerate", distributed.config_path("ddp"))):
        out = tmp_path / f"{launcher}.pt"
        distributed.launch("llmbook.jobs.sft_lora", "--out", str(out), "--steps", "1", launcher=launcher,
                           config=config, timeout=300)
        runs[launcher] = torch.load(out)
    assert runs["accelerate"]["world_size"] == runs["local"]["world_size"] == 2
    assert runs["accelerate"]["wrapper"] == "DistributedDataParallel"
    model, tokenizer = common.lora_model(seed=0)
    collate = data.SFTCollator(tokenizer)

    def gradient(rows):
        model.zero_grad(set_to_none=True)
        batch = collate(rows)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.sft_loss(logits, batch["labels"]).backward()
        return torch.cat([g.flatten() for g in common.trainable_grads(model).values()])

    reference = gradient(common.global_batch())
    half = gradient(common.global_batch()[:4])  # one process's slice alone: must not pass
    rtol = tolerance(torch.float32, "model")["rtol"]
    for launcher, run in runs.items():
        got = torch.cat([g.flatten() for g in run["first_gradient"].values()])
        assert float((got - reference).norm() / reference.norm()) < rtol, launcher
    assert float((half - reference).norm() / reference.norm()) > 10 * rtol
    for name, weight in runs["local"]["lora"].items():
        torch.testing.assert_close(runs["accelerate"]["lora"][name], weight, **tolerance(torch.float32, "op"))


def test_a_rank_that_fails_because_its_peer_died_is_not_blamed():
    """Rank 0 waits in an all-reduce, so it fails too ("connection closed by peer"): rank 1 is named."""
    with pytest.raises(distributed.DistributedJobError,
                       match="failed in rank 1: RuntimeError: rank 1 cannot go on") as error:
        distributed.launch("llmbook.jobs.crash", "--rank1", "fail", "--rank0", "collective", timeout=120)
    assert error.value.statuses == [1, 1]
    assert _running("llmbook.jobs.crash") == []


def test_an_interrupted_accelerate_launch_leaves_no_worker(jobs, tmp_path):
    """torchrun starts its workers in sessions of their own; the job's mark finds them."""
    module = jobs("sleeper_accelerate", SLEEPER)
    ready = tmp_path / "ready"
    _interrupted_when_ready(ready, lambda: distributed.launch(
        module, str(ready), launcher="accelerate", config=distributed.config_path("ddp"), timeout=100))
    assert _running(module) == []


def test_nccl_is_chosen_by_the_gpus_of_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert distributed._use_nccl(8)  # 2 machines x 8 GPUs: 16 processes, 8 on this one
    assert not distributed._use_nccl(9)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert not distributed._use_nccl(2)  # NCCL refuses two ranks on one GPU: gloo


@pytest.mark.parametrize("name, kind, sharding", [
    ("ddp", "MULTI_GPU", None), ("fsdp2", "FSDP", ("fsdp_version", 2)),
    ("zero2", "DEEPSPEED", ("zero_stage", 2)), ("zero3", "DEEPSPEED", ("zero_stage", 3))])
def test_the_accelerate_configs_are_valid(name, kind, sharding):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(distributed.config_path(name)))
    assert config.distributed_type.value == kind and config.num_processes == 2
    if sharding:
        key, value = sharding
        assert {**config.fsdp_config, **config.deepspeed_config}[key] == value


def test_the_zero_formula_gives_the_papers_figure():
    # Rajbhandari et al. (2020), Figure 1: Psi = 7.5 B, N_d = 64, K = 12.
    totals = [distributed.zero_bytes_per_device(7_500_000_000, 64, s)["total"] / 1e9 for s in range(4)]
    assert [round(t, 2) for t in totals] == [120.0, 31.41, 16.64, 1.88]
    one = distributed.zero_bytes_per_device(100, 1, 3)
    assert one == distributed.zero_bytes_per_device(100, 1, 0) == {
        "weights": 200, "gradients": 200, "optimizer": 1200, "total": 1600}


def test_held_bytes_counts_parameters_gradients_and_the_optimiser_state():
    # (a sharded DTensor is counted by its local shard: chapter 10's FSDP2 run checks that)
    model = torch.nn.Linear(10, 4)  # 44 float32 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 10)).sum().backward()
    optimizer.step()
    assert distributed.held_bytes(model, optimizer) == {"parameters": 176, "gradients": 176, "optimizer": 352}
    assert distributed.held_bytes(model) == {"parameters": 176, "gradients": 176, "optimizer": 0}


def test_shard_gives_each_rank_its_contiguous_slice():
    items = list(range(6))
    assert [distributed.shard(items, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]
