"""A job whose rank 1 fails or hangs while rank 0 works or waits (chapter 10's clean-up).

    --rank1 fail        rank 1 raises an error at once
    --rank1 hang        rank 1 never finishes (it sleeps for 10 minutes)
    --rank0 work        rank 0 is busy outside any collective (it sleeps for 10 minutes):
                        gloo cannot tell it that rank 1 is gone, only the launcher can end it
    --rank0 collective  rank 0 waits for rank 1 in an all-reduce: when rank 1 dies, rank 0
                        fails too, with gloo's "connection closed by peer"
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from llmbook import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank1", choices=("fail", "hang"), default="fail")
    parser.add_argument("--rank0", choices=("work", "collective"), default="work")
    args = parser.parse_args()
    rank, _ = distributed.init()
    # Both ranks past the group's set-up: without this, rank 1 can fail while rank 0 is still
    # connecting to it, and rank 0 then fails in its set-up instead of being busy.
    dist.barrier()
    if rank == 1 and args.rank1 == "fail":
        raise RuntimeError("rank 1 cannot go on (a stand-in for a worker's error)")
    if rank == 0 and args.rank0 == "collective":
        dist.all_reduce(torch.ones(1))
    time.sleep(600)


if __name__ == "__main__":
    main()
