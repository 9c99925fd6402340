"""Startup on the GPU: lazy capture replays what capturing every size replays, with a pool no larger and fewer
captures; a warm start on a "new machine" (all of torch's caches empty) from cache_dir alone: every piece from the
loaded entry (Triton kernels bundled), inductor's autotuning results kept, the same output. Run on the device:
python3 -m pytest -m gpu tests/compiler/test_startup_gpu.py"""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import fresh_cache
from torch.compiler._cache import CacheArtifactManager

import hattn
import hattn.compiler.artifacts as artifacts
from hattn.models.toy import toy_model
from tests.compiler.test_warm_start import PATTERN, cold_then_warm, ids_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SAME = {"rtol": 1e-5, "atol": 1e-5}  # the same kernels at other addresses (padding bugs are far larger)


def _ids(n, seed=0):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_lazy_capture_replays_equal_capture_all_with_fewer_captures_and_no_larger_pool(mode):
    sizes, counts = [4, 8, 16, 32, 64], [5, 3, 5, 7]
    outs, stats = {}, {}
    for lazy in (True, False):
        torch._dynamo.reset()
        # cuBLAS allocates its workspace (32 MiB on Hopper) per stream at the first GEMM, and the capture stream is
        # shared: without clearing, the run that captures first holds it in its pool and the other does not (the
        # H200 saw 34 MiB lazily vs 2 MiB). Cleared, each run's pool holds its own; small_m_gemm off, so every
        # linear is cuBLAS (the Triton-or-cuBLAS choice is timed, per process)
        torch._C._cuda_clearCublasWorkspaces()
        model = toy_model(pattern=PATTERN, device="cuda")
        be = hattn.backend(mode=mode, capture_sizes=sizes, inner_compiler="eager", progress=False,
                           lazy_capture=lazy, small_m_gemm=False)
        fn = torch.compile(model, backend=be, dynamic=True)
        with torch.no_grad():
            outs[lazy] = [fn(_ids(n, n)) for n in counts]
        stats[lazy] = be.stats
    for got, want in zip(outs[True], outs[False], strict=True):
        torch.testing.assert_close(got, want, **SAME)
    lazy, every = stats[True], stats[False]
    assert (lazy.capture_sizes_done, every.capture_sizes_done) == (3, 5)  # lazily 64 (sizes the pool), 8, 4
    assert lazy.replays == every.replays == len(counts)
    assert 0 < lazy.pool_bytes <= every.pool_bytes
    assert lazy.first_replay_seconds > 0 and lazy.capture_seconds > 0


def _run(model, cache_dir):
    torch._dynamo.reset()
    be = hattn.backend(mode="pcg", capture_sizes=[8, 16], progress=False, cache_dir=cache_dir)
    with torch.no_grad():
        return torch.compile(model, backend=be, dynamic=True)(_ids(6)), be.stats


def test_warm_start_on_a_new_machine_from_cache_dir_alone(tmp_path):
    model = toy_model(pattern=PATTERN, device="cuda")
    with CacheArtifactManager.with_fresh_cache():
        with fresh_cache():  # a cold machine: inductor, AOTAutograd, Triton and autotuning caches empty
            cold_out, cold = _run(model, str(tmp_path))
        with fresh_cache():  # another cold machine, given the cache directory
            warm_out, warm = _run(model, str(tmp_path))
    assert (cold.cache_misses, warm.cache_hits) == (1, 1)
    assert cold.pieces_compiled == warm.pieces_compiled == warm.pieces_from_cache > 0
    torch.testing.assert_close(warm_out, cold_out, **SAME)
    assert warm.compile_seconds < cold.compile_seconds
    for s in (cold, warm):
        assert min(s.dynamo_seconds, s.split_seconds, s.fake_run_seconds, s.compile_seconds, s.capture_seconds,
                   s.first_replay_seconds) > 0, s.startup()
    [entry] = artifacts.entries(tmp_path)
    kept = CacheArtifactManager.deserialize((entry / "artifacts.bin").read_bytes())
    assert kept.get("autotune"), {kind: len(a) for kind, a in kept.items()}  # saved after the first run


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_a_new_process_warm_starts_from_the_snapshot_without_dynamo(tmp_path, mode, caplog):
    """The dispatcher's warm start (hattn.compiler.snapshot) on the GPU: the second "process" (Dynamo reset, torch's
    caches empty, the model built again) traces nothing, compiles the snapshot's graph with every piece from
    cache_dir, captures, and replays the first's outputs at sizes it saw and sizes it did not."""
    caplog.set_level("INFO", logger="hattn")
    (cold_outs, cold, cold_traces), (warm_outs, warm, warm_traces) = cold_then_warm(
        tmp_path, mode, "cuda", [6, 3], [6, 3, 11, 1], capture_sizes=[1, 4, 8, 16])
    why = "\n".join(r.getMessage() for r in caplog.records)  # a fallback's reason, logged by the dispatcher
    assert (cold_traces, cold.graphs_from_snapshots, warm_traces, warm.graphs_from_snapshots) == (1, 0, 0, 1), why
    assert warm.pieces_compiled == warm.pieces_from_cache > 0 and warm.dynamo_seconds == 0
    for got, want in zip(warm_outs, cold_outs):
        torch.testing.assert_close(got, want, **SAME)
    model = toy_model(pattern=PATTERN, device="cuda")
    with torch.inference_mode():
        for n, got in zip([11, 1], warm_outs[2:]):
            torch.testing.assert_close(got, model(ids_of(n, "cuda")), rtol=2e-3, atol=2e-3)
