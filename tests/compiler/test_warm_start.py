"""Inductor end to end on CPU: the toy model's identical pieces are compiled once (same output as compiling each),
and a "new process" warm-starts from cache_dir: torch's FX graph and AOTAutograd caches emptied (the compiled C++
kernels kept, as on one machine), every piece then comes out of the entry loaded from cache_dir.

Inductor's C++ compiles make these the slowest CPU tests of the startup work (~20 s each): kept to two, the
Dynamo-traced warm start and the one from a snapshot."""
from __future__ import annotations

import os
import shutil

import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch._inductor.utils import clear_caches, fresh_cache
from torch.compiler._cache import CacheArtifactManager

import hattn.compiler.backend as backend_module
from hattn.compiler.backend import backend
from hattn.models.toy import toy_model

LINEAR3 = ["linear", "linear", "linear"]  # 4 pieces: first, two identical between linear layers, last
PATTERN = ["linear", "linear", "full", "linear"]  # 5 pieces, q/k/v fused before the full layer
IDS = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(0))
TOL = {"rtol": 1e-4, "atol": 1e-4}


def ids_of(n: int, device="cpu") -> torch.Tensor:
    """n token ids drawn from seed n."""
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).to(device)


def cold_then_warm(cache_dir, mode: str, device, cold_sizes, warm_sizes, between=None, **options):
    """Two "processes" on one cache_dir, each with Dynamo reset and all of torch's caches empty (a new machine): the
    toy model compiled with dynamic sizes and called through hattn's dispatcher (so the second may start from the
    first's snapshot) at `ids_of` each size. For each, (outputs, the backend's stats, frames Dynamo traced);
    `between()` runs between the two."""
    from torch._dynamo.utils import counters

    from hattn.compiler.dispatch import Dispatch

    def run(sizes):
        torch._dynamo.reset()
        model = toy_model(pattern=PATTERN, device=device)
        be = backend(mode=mode, progress=False, cache_dir=str(cache_dir), **options)
        call, frames = Dispatch(torch.compile(model, backend=be, dynamic=True)), counters["frames"]["total"]
        with torch.inference_mode():
            outs = [call(ids_of(n, device)).clone() for n in sizes]
        return outs, be.stats, counters["frames"]["total"] - frames

    with CacheArtifactManager.with_fresh_cache():
        with fresh_cache():
            cold = run(cold_sizes)
        if between is not None:
            between()
        with fresh_cache():
            warm = run(warm_sizes)
    return cold, warm


def _compile(model, **options):
    be = backend(mode="eager", progress=False, **options)
    with torch.inference_mode():
        return torch.compile(model, backend=be)(IDS), be.stats


def _new_process_on_this_machine() -> None:
    """What the next process finds: no FX graph or AOTAutograd entries, nothing compiled in memory."""
    for sub in ("fxgraph", "aotautograd"):
        shutil.rmtree(os.path.join(cache_dir(), sub), ignore_errors=True)
    clear_caches()
    torch._dynamo.reset()


def test_identical_pieces_compile_once_and_a_new_process_loads_them_from_cache_dir(tmp_path, monkeypatch,
                                                                                    one_thread):
    model = toy_model(pattern=LINEAR3)
    with CacheArtifactManager.with_fresh_cache(), fresh_cache():
        out, cold = _compile(model, cache_dir=str(tmp_path))
        assert (cold.pieces, cold.pieces_compiled, cold.pieces_from_cache) == (4, 3, 0)
        assert (cold.cache_hits, cold.cache_misses) == (0, 1)
        torch.testing.assert_close(out, model(IDS), **TOL)

        torch._dynamo.reset()
        with monkeypatch.context() as patch:  # every piece compiled on its own: one compile more, the same output
            patch.setattr(backend_module, "signature", lambda piece, args: None)
            alone, each = _compile(model)
        assert each.pieces_compiled == 4 and torch.equal(alone, out)

        _new_process_on_this_machine()
        other = toy_model(seed=1, pattern=LINEAR3)  # same config, other weights
        warm_out, warm = _compile(other, cache_dir=str(tmp_path))
        assert (warm.cache_hits, warm.cache_misses) == (1, 0)
        assert (warm.pieces_compiled, warm.pieces_from_cache) == (3, 3)  # every compile served by the loaded entry
        torch.testing.assert_close(warm_out, other(IDS), **TOL)


def test_a_warm_start_from_the_snapshot_takes_every_piece_from_cache_dir(tmp_path, one_thread):
    """The dispatcher's warm start with inductor: the first process's Dynamo restarts (its tensorify pass) compile
    the graph twice, so fuse_linears concatenates the q/k/v weights once and then spans them; the new process
    compiles the snapshot's graph once, concatenating. Every piece must still come from the loaded entry (a span
    that required grad had another AOTAutograd key: 4 of 5 pieces, seen on the H100 first)."""
    (cold_outs, cold, _), (warm_outs, warm, _) = cold_then_warm(tmp_path, "eager", "cpu", [6, 3], [6, 3, 9])
    assert (cold.graphs_from_snapshots, warm.graphs_from_snapshots, warm.dynamo_seconds) == (0, 1, 0)
    assert warm.pieces_compiled == warm.pieces_from_cache == cold.pieces_compiled > 0
    for got, want in zip(warm_outs, cold_outs):
        torch.testing.assert_close(got, want, **TOL)
