"""Starting tensor-parallel processes: one process per rank, launched by torchrun.

`hattn generate --tp N` and `hattn bench --tp N` relaunch themselves as `torchrun --standalone --nproc-per-node N
-m hattn.cli ...` (`relaunch`); each process then joins the group with `init` (NCCL on GPUs, one GPU per local rank;
gloo on CPUs) and runs the same steps as the others, rank 0 printing. Running torchrun yourself works the same:

    torchrun --nproc-per-node 2 -m hattn.cli generate --preset qwen3.5-1b --tp 2 --mode pcg --prompt-ids 1,2,3
"""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from hattn.parallel.group import TPGroup


def under_torchrun() -> bool:
    """This process was started by torchrun (it set the rank variables)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(tp: int, argv: list[str]) -> int:
    """Run `hattn <argv>` as `tp` processes under torchrun; returns their exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
           "-m", "hattn.cli", *argv]
    return subprocess.call(cmd)


def init(tp: int, device: str) -> tuple[TPGroup, str]:
    """This process's tensor-parallel group and device: under torchrun, join the process group (NCCL and GPU
    `cuda:<local rank>` for a CUDA device, gloo on CPU); otherwise a group of one on `device`."""
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if not under_torchrun():
        if tp > 1:
            raise ValueError(f"--tp {tp} needs {tp} processes: start them with torchrun --nproc-per-node {tp} "
                             f"(hattn generate/bench do when run directly)")
        return TPGroup.single(), device
    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise ValueError(f"--tp {tp} but torchrun started {world} processes; use --nproc-per-node {tp}")
    if torch.device(device).type == "cuda":
        device = _rank_gpu(int(os.environ["LOCAL_RANK"]), tp)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    group = TPGroup.of()
    group.warm_up(device)
    return group, device


def _rank_gpu(local_rank: int, tp: int) -> str:
    if torch.cuda.device_count() <= local_rank:
        raise ValueError(f"--tp {tp} needs {tp} GPUs on this host, it has {torch.cuda.device_count()}")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def finish() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
