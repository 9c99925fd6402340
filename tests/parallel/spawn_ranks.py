"""Run a function on N local ranks (torch.multiprocessing, spawn) and collect each rank's result: gloo on CPU for
CI, NCCL with one GPU per rank on the device machine."""
from __future__ import annotations

import os
import queue
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, nprocs: int, backend: str, store: str, fn, args: tuple, results) -> None:
    torch.set_num_threads(1)  # tiny models; two ranks share the CI box's two cores
    try:
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            kwargs["device_id"] = torch.device(f"cuda:{rank}")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=nprocs, **kwargs)
        from hattn.parallel import TPGroup

        tp = TPGroup.of()
        tp.warm_up(f"cuda:{rank}" if backend == "nccl" else "cpu")
        results.put((rank, "ok", fn(tp, *args)))
    except BaseException:  # noqa: BLE001  (reported to the parent with its traceback)
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, *args, nprocs: int = 2, backend: str = "gloo", timeout_s: float = 600.0) -> list:
    """fn(tp: TPGroup, *args) on `nprocs` ranks; returns their results in rank order. `fn` must be a module-level
    function (spawned processes import it). A rank's exception fails the call with its traceback."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, nprocs, backend, store, fn, args, results))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        try:
            got = dict(_collect(results, nprocs, timeout_s))
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    return [got[r] for r in range(nprocs)]


def _collect(results, nprocs: int, timeout_s: float):
    for _ in range(nprocs):
        try:
            rank, status, value = results.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"a rank gave no result within {timeout_s:.0f} s (a collective hangs?)") from None
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        yield rank, value
