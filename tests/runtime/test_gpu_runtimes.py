"""PCG, BCG and full graph on the GPU: replay == eager, split ops eager on every replay, segments, pool sharing,
side streams, the seed-000 regression, the Triton decode attention. Run on the device:
python3 -m pytest -m gpu tests/runtime."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hattn
from hattn.kernels.attention.decode import decode_attention_reference
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_cache, toy_model
from hattn.registry import UnregisteredAttentionError, split_op_of
from hattn.runtime import BreakableGraphRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SIZES = [1, 2, 4, 8, 16, 32]
PATTERN = ["linear", "linear", "full", "linear"]
TOL = dict(rtol=2e-4, atol=2e-4)


def _ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


_COMPILED = {}


def _compiled(mode, inner="eager"):
    """One compiled model per (mode, inner compiler), shared by a test's hypothesis examples (the suite's
    per-test Dynamo reset makes a later test recompile it: Dynamo's recompile limit is never reached)."""
    if (mode, inner) not in _COMPILED:
        model = toy_model(pattern=PATTERN, device="cuda")
        be = hattn.backend(mode=mode, capture_sizes=SIZES, inner_compiler=inner, progress=False)
        _COMPILED[mode, inner] = (model, torch.compile(model, backend=be, dynamic=True), be)
    return _COMPILED[mode, inner]


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 1000), fresh=st.booleans())
def test_replay_equals_eager_for_random_token_counts(mode, n, seed, fresh):
    model, fn, be = _compiled(mode)
    ids = _ids(n, seed)
    if fresh:  # the same content at a new address
        ids = ids.clone()
    replays, eager_runs = be.stats.replays, be.stats.eager_runs
    with torch.no_grad():
        torch.testing.assert_close(fn(ids), model(ids), **TOL)
    served = n <= SIZES[-1]  # up to the largest capture size a graph replays, above it the graph runs graph-free
    assert be.stats.cuda_graphs > 0
    assert (be.stats.replays - replays, be.stats.eager_runs - eager_runs) == ((1, 0) if served else (0, 1))


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_inductor_pieces_replay_equals_eager(mode):
    model, fn, be = _compiled(mode, "inductor")
    with torch.no_grad():
        for n, seed in [(5, 0), (5, 1), (17, 2), (40, 3)]:
            torch.testing.assert_close(fn(_ids(n, seed)), model(_ids(n, seed)), rtol=2e-3, atol=2e-3)
    assert be.stats.replays == 3 and be.stats.eager_runs == 1  # 40 > 32: graph-free, counted


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_outputs_are_owned_across_replays(mode):
    model, fn, _ = _compiled(mode)
    with torch.no_grad():
        first = fn(_ids(5, 1))
        kept = first.clone()
        fn(_ids(5, 2))  # same size: same graphs replayed
    torch.testing.assert_close(first, kept)


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_static_graph_owns_its_inputs(mode):
    model = toy_model(pattern=["linear", "full"], device="cuda")
    fn = torch.compile(model, backend=hattn.backend(mode=mode, capture_sizes=SIZES, inner_compiler="eager",
                                                     progress=False), dynamic=False)
    a, b = _ids(6, 0), _ids(6, 1)
    a_kept = a.clone()
    with torch.no_grad():
        torch.testing.assert_close(fn(a), model(a), **TOL)
        torch.testing.assert_close(fn(b), model(b), **TOL)
    assert torch.equal(a, a_kept)  # the first call's input was not used as the graph's static buffer


# -- split ops run eagerly on every replay: an op reading a per-step host value -----------------------------------
@torch.library.custom_op("hattn_test::add_step_bias", mutates_args=())
def add_step_bias(x: torch.Tensor) -> torch.Tensor:
    ctx = hattn.context.get_forward_context()
    return x + float(ctx.extra.get("bias", 0.0) if ctx is not None else 0.0)


@add_step_bias.register_fake
def _(x):
    return torch.empty_like(x)


hattn.register_split_op(torch.ops.hattn_test.add_step_bias, "stepbias")


class StepBias(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x):
        return self.proj(torch.ops.hattn_test.add_step_bias(x))


def _step_bias_model(pattern=("stepbias", "linear", "stepbias"), mixer=StepBias):
    torch.manual_seed(0)
    return ToyHybridModel(ToyConfig(pattern=list(pattern)), {"stepbias": mixer}).cuda().eval()


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_split_ops_run_eagerly_on_every_replay(mode):
    model = _step_bias_model()
    be = hattn.backend(mode=mode, capture_sizes=[8], inner_compiler="eager", progress=False)
    fn = torch.compile(model, backend=be)
    ids = _ids(6, 0)
    for bias in (0.0, 1.5, -3.0, 1.5):
        ctx = hattn.ForwardContext(seq_lens=[6], extra={"bias": bias})
        with torch.no_grad(), hattn.forward_context(ctx):
            got = fn(ids)
            want = model(ids)
        torch.testing.assert_close(got, want, **TOL)
    assert be.stats.replays == 4


def test_full_mode_rejects_a_split_op_that_is_not_capture_safe():
    fn = torch.compile(_step_bias_model(), backend=hattn.backend(mode="full", capture_sizes=[8],
                                                                  inner_compiler="eager"))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                       match="hattn_test::add_step_bias is not registered capture-safe"):
        with hattn.forward_context(hattn.ForwardContext(seq_lens=[6], extra={"bias": 0.0})):
            fn(_ids(6, 0))


# -- BCG on a plain module ----------------------------------------------------------------------------------------
def test_bcg_segments_equal_split_calls_plus_one_and_match_eager():
    model = toy_model(pattern=PATTERN, device="cuda")
    runner = BreakableGraphRunner(model, capture_sizes=[4, 8], progress=False)
    with torch.no_grad():
        for n, seed in [(3, 0), (8, 1), (5, 2), (11, 3)]:
            torch.testing.assert_close(runner(_ids(n, seed)), model(_ids(n, seed)), **TOL)
    assert runner.segments(4) == runner.segments(8) == len(PATTERN) + 1
    assert runner.stats.cuda_graphs == 2 * (len(PATTERN) + 1)
    assert runner.stats.eager_runs == 1  # 11 tokens > 8


@torch.library.custom_op("hattn_test::add_late_bias", mutates_args=())
def add_late_bias(x: torch.Tensor) -> torch.Tensor:
    return add_step_bias(x)


@add_late_bias.register_fake
def _(x):
    return torch.empty_like(x)


class LateBias(StepBias):
    def forward(self, x):
        return self.proj(torch.ops.hattn_test.add_late_bias(x))


def test_bcg_runner_captures_again_after_a_split_op_is_registered():
    """Captured while add_late_bias was not a split op, the segment froze its bias; registered since, the runner
    captures again and runs it between segments. A registration of an op its forward never called keeps the graphs."""
    model = _step_bias_model(("stepbias", "linear"), LateBias)
    runner = BreakableGraphRunner(model, capture_sizes=[8], progress=False)
    try:
        for bias, segments, graphs in ((0.0, 2, 2), (0.0, 2, 2), (1.5, 3, 5), (-2.0, 3, 5)):
            if bias == 1.5:
                hattn.register_split_op(torch.ops.hattn_test.add_late_bias, "latebias")
            elif runner.runtime is not None:
                hattn.register_split_op(torch.ops.hattn_test.add_into, "testmix")  # again: the generation moves
            with torch.no_grad(), hattn.forward_context(hattn.ForwardContext(seq_lens=[6], extra={"bias": bias})):
                torch.testing.assert_close(runner(_ids(6, 0)), model(_ids(6, 0)), **TOL)
            assert runner.segments(8) == segments and runner.stats.cuda_graphs == graphs
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test.add_late_bias)


class SideStreamBias(nn.Module):
    """Forks a side stream in one segment, joins it after the split op (in the next segment)."""

    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj, self.side_proj = nn.Linear(c.hidden, c.hidden, bias=False), nn.Linear(c.hidden, c.hidden)
        self.side = torch.cuda.Stream()

    def forward(self, x):
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            y = torch.tanh(self.side_proj(x))
        z = self.proj(torch.ops.hattn_test.add_step_bias(x))
        main.wait_stream(self.side)
        return z + y


def test_bcg_joins_side_streams_forked_inside_a_segment():
    model = _step_bias_model(("stepbias", "linear", "stepbias"), SideStreamBias)
    runner = BreakableGraphRunner(model, capture_sizes=[8], progress=False)
    with torch.no_grad():
        for n, seed in [(6, 0), (7, 1)]:
            torch.testing.assert_close(runner(_ids(n, seed)), model(_ids(n, seed)), **TOL)
    assert runner.segments(8) == 4


def test_seed000_unregistered_linear_attention_rejected_before_capture():
    model = toy_model(pattern=["linear", "full", "linear"], device="cuda")
    with torch.no_grad():
        want = model(_ids(3, 0))
        entry = split_op_of(torch.ops.hattn.linear_attention)
        hattn.unregister_split_op(torch.ops.hattn.linear_attention)
        try:
            runner = BreakableGraphRunner(model, capture_sizes=[4], progress=False)
            with pytest.raises(UnregisteredAttentionError, match="custom op hattn::linear_attention"):
                runner(_ids(3, 0))
            assert runner.stats.cuda_graphs == 0  # rejected in the warm-up: nothing was captured
        finally:
            hattn.register_split_op(torch.ops.hattn.linear_attention, entry.kind, capture_safe=entry.capture_safe,
                                    direct=entry.direct, prepare=entry.prepare,
                                    strided_inputs=entry.strided_inputs)  # as it was
        runner = BreakableGraphRunner(model, capture_sizes=[4], progress=False)  # registered: correct under BCG
        torch.testing.assert_close(runner(_ids(3, 0)), want, **TOL)
        assert runner.segments(4) == 4


def test_seed000_unregistered_sdpa_rejected_before_capture(sdpa_mixer):
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["linear", "sdpa"]), {"sdpa": sdpa_mixer}).cuda().eval()
    with torch.no_grad(), pytest.raises(UnregisteredAttentionError, match="scaled_dot_product"):
        BreakableGraphRunner(model, capture_sizes=[4], progress=False)(_ids(3, 0))
    with torch.no_grad(), pytest.raises(torch._dynamo.exc.BackendCompilerFailed,
                                        match="not a registered hattn split op"):
        torch.compile(model, backend=hattn.backend(mode="bcg", capture_sizes=[4]))(_ids(3, 0))
    good = toy_model(pattern=["linear", "full"], device="cuda")  # a later capture still works
    with torch.no_grad():
        torch.testing.assert_close(BreakableGraphRunner(good, [4], progress=False)(_ids(3, 0)), good(_ids(3, 0)),
                                   **TOL)


@pytest.mark.parametrize("mode", ["bcg-runner", "pcg"])
def test_one_pool_for_sixteen_sizes(mode):
    sizes = [8 * i for i in range(1, 17)]
    pools = {}
    for name, sz in (("largest", sizes[-1:]), ("all16", sizes)):
        torch._dynamo.reset()
        model = toy_model(pattern=PATTERN, device="cuda", hidden=256, intermediate=1024)
        if mode == "pcg":
            be = hattn.backend(mode="pcg", capture_sizes=sz, inner_compiler="eager", progress=False,
                               lazy_capture=False)
            fn = torch.compile(model, backend=be, dynamic=True)
        else:
            fn = BreakableGraphRunner(model, capture_sizes=sz, progress=False, lazy_capture=False)
        with torch.no_grad():
            fn(_ids(5, 0))
        stats = be.stats if mode == "pcg" else fn.stats
        assert stats.capture_sizes_done == len(sz)
        pools[name] = stats.pool_bytes
    assert 0 < pools["all16"] <= 2 * max(pools["largest"], 2 << 20), pools


def _pool_blocks(pool) -> list[int]:
    """Sizes of the allocated blocks of graph pool `pool`."""
    return [b["size"] for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", ())) == tuple(pool)
            for b in seg["blocks"] if b["state"] == "active_allocated"]


def test_blas_workspaces_stay_out_of_a_capture_on_a_warmed_stream():
    """cuBLAS and cuBLASLt take a workspace at their first GEMM on a stream and keep it: inside a capture it comes
    from the graph's pool and stays there (32 MiB on Hopper). `warm_blas` takes both before the capture; without
    it the same capture on a fresh stream keeps the workspace in its pool (the control)."""
    from hattn.runtime.graphs import pool_bytes, warm_blas

    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16), torch.randn(512, device="cuda",
                                                                                   dtype=torch.bfloat16)
    held = {}
    for warm in (True, False):
        stream, pool, graph = torch.cuda.Stream(), torch.cuda.graph_pool_handle(), torch.cuda.CUDAGraph()
        if warm:
            warm_blas(stream)
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = (torch.nn.functional.linear(x, w, b), x @ w.t())
        held[warm] = pool_bytes(pool)
        graph.replay()
        torch.testing.assert_close(out[0], torch.nn.functional.linear(x, w, b))
        del graph, out
    assert held[True] < 8 << 20 < held[False], held


def test_graphs_keep_their_blas_workspace_when_torch_forgets_it():
    """inductor's CUDA graph trees clear cuBLAS's workspaces (`torch._C._cuda_clearCublasWorkspaces`) at each warm-up
    and recording, in the same process; a graph captured before keeps their address, and its GEMMs write there at
    every replay. So the freed workspace must never become a tensor's memory. Graphs of small-M, large-K GEMMs (split
    over K: they use the workspace) captured before and after a clear; then the cache emptied (a freed block
    of the ordinary allocator goes back to the driver) and 1 GiB of eager tensors filled with a pattern: replays of
    both leave the pattern and their outputs as they were."""
    from hattn.runtime.graphs import capture_graph

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.randn(1024, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, generator=gen)

    def gemms(x):
        return torch.nn.functional.linear(x, w, b) + x @ w.t()

    pool = torch.cuda.graph_pool_handle()
    first, out1 = capture_graph(gemms, [x], 16, pool)
    torch._C._cuda_clearCublasWorkspaces()  # what cudagraph trees do
    second, out2 = capture_graph(gemms, [x], 16, pool)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()  # a freed workspace's segment goes back to the driver, unless a pool keeps it
    first.replay()
    second.replay()
    expected = gemms(x)
    fill = [torch.full((1 << 22,), 7, dtype=torch.int32, device="cuda") for _ in range(64)]
    for _ in range(3):
        first.replay()
        second.replay()
    torch.cuda.synchronize()
    assert all(bool((f == 7).all()) for f in fill), "a graph's GEMM wrote into memory that eager tensors now hold"
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)


def test_graphs_replayed_on_two_streams_at_once_keep_their_own_blas_workspace():
    """cuBLAS keeps a workspace per (handle, stream), and a captured GEMM keeps its address: graphs captured on one
    stream share it. Two graphs of eight split-K GEMMs (small M, K = 8192: partial sums in the workspace), captured
    under two replay streams as two-batch overlap's two instances are, then replayed on both streams at once 200
    times, must give the bits of their replays alone (a shared workspace: wrong values, no error)."""
    from hattn.runtime.graphs import capture_graph

    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(8, 1024, 8192, device="cuda", dtype=torch.bfloat16, generator=gen)

    def gemms(x):
        return torch.stack([x @ w[i].t() for i in range(8)])

    main, streams = torch.cuda.current_stream(), [torch.cuda.Stream(), torch.cuda.Stream()]
    xs = [torch.randn(16, 8192, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in streams]
    captured = []
    for stream, x in zip(streams, xs):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            captured.append(capture_graph(gemms, [x], 16, torch.cuda.graph_pool_handle()))
        main.wait_stream(stream)
    refs = []
    for graph, out in captured:  # each alone
        graph.replay()
        torch.cuda.synchronize()
        refs.append(out.clone())
    torch.testing.assert_close(refs[0], gemms(xs[0]))
    wrong = [torch.zeros((), dtype=torch.int64, device="cuda") for _ in streams]
    for stream in streams:
        stream.wait_stream(main)
    for _ in range(200):
        for stream, (graph, out), ref, count in zip(streams, captured, refs, wrong):
            with torch.cuda.stream(stream):
                graph.replay()
                count += (out != ref).sum()
    for stream in streams:
        main.wait_stream(stream)
    torch.cuda.synchronize()
    assert [int(c) for c in wrong] == [0, 0], "graphs replayed at once wrote one cuBLAS workspace"


def test_a_backend_captures_on_a_stream_of_its_own_per_replay_stream():
    """Two backends, each asked under two replay streams: four capture streams, all distinct, and (with
    cuda-python) none a stream torch's pool hands out: it hands its 32 per device out in turn, so a capture stream
    from there could be any code's side stream too. The stream a backend's graphs were captured on is the one it
    gives for their replay stream."""
    from hattn.runtime import stitch

    torch._dynamo.reset()
    main, replay = torch.cuda.current_stream(), [torch.cuda.Stream(), torch.cuda.Stream()]
    found = []
    for _ in range(2):
        model = toy_model(pattern=PATTERN, device="cuda")
        be = hattn.backend(mode="pcg", capture_sizes=[4], inner_compiler="eager", progress=False)
        fn = torch.compile(model, backend=be, dynamic=True)
        replay[0].wait_stream(main)
        with torch.cuda.stream(replay[0]), torch.no_grad():
            got, want = fn(_ids(3, 0)), model(_ids(3, 0))
        main.wait_stream(replay[0])
        torch.testing.assert_close(got, want, **TOL)
        assert be.stats.cuda_graphs > 0
        captured_on = list(be.pools.streams.values())
        streams = []
        for stream in replay:
            with torch.cuda.stream(stream):
                streams.append(be.pools.capture_stream())
        assert captured_on == streams[:1]
        found += streams
    assert len({s.cuda_stream for s in found}) == 4
    if stitch.cudart() is not None:
        pooled = {torch.cuda.Stream().cuda_stream for _ in range(64)}
        assert not pooled & {s.cuda_stream for s in found}


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_graph_pools_hold_no_blas_workspace(mode, monkeypatch):
    """Each runtime warms cuBLAS on its capture stream first: captured on fresh streams (no workspace yet), a toy
    model's decode step of 100 sequences (GEMMs of 100 rows: cuBLAS) leaves only small blocks in its pools. A
    failure names where each large block was allocated (the allocator's recorded Python stacks)."""
    from hattn.runtime import graphs

    monkeypatch.setattr(graphs, "_FREE_STREAMS", {})  # the backend's capture streams, fresh (no earlier workspace)
    torch._dynamo.reset()
    model = toy_model(pattern=PATTERN, device="cuda")
    be = hattn.backend(mode=mode, capture_sizes=[128], inner_compiler="eager", progress=False, lazy_capture=False)
    fn = torch.compile(model, backend=be, dynamic=True)
    n, slots = 100, list(range(100))
    before = {tuple(seg["segment_pool_id"]) for seg in torch.cuda.memory_snapshot()}
    outs = []
    torch.cuda.memory._record_memory_history(stacks="python")
    try:
        with torch.no_grad():
            for run in (fn, model):
                cache = _toy_cache(model.config, slots=128, max_len=8)
                with hattn.forward_context(hattn.ForwardContext(seq_lens=[1] * n, slots=slots, cache=cache)):
                    model(_ids(n, 0))  # the prompts' one token each, eagerly
                with hattn.forward_context(hattn.ForwardContext(seq_lens=[1] * n, context_lens=[1] * n,
                                                                slots=slots, cache=cache)):
                    outs.append(run(_ids(n, 1)))
        segments = torch.cuda.memory._snapshot()["segments"]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert be.stats.cuda_graphs > 0
    torch.testing.assert_close(*outs, **TOL)
    blas = {tuple(pool.id) for pool in graphs._BLAS_POOLS.values()}  # where warm_blas keeps the workspaces
    pools = {tuple(seg["segment_pool_id"]) for seg in segments} - before - blas - {(0, 0)}
    large = [(b["size"], [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in b.get("frames", [])
                          if f["filename"].endswith(".py")][:12])
             for seg in segments if tuple(seg["segment_pool_id"]) in pools
             for b in seg["blocks"] if b["state"] == "active_allocated" and b["size"] >= 4 << 20]
    assert pools and not large, large


# -- full graph: decode steps with a cache ------------------------------------------------------------------------
def _toy_cache(c: ToyConfig, slots=8, max_len=64):
    return toy_cache(c, slots, max_len, torch.float32, "cuda")


@pytest.mark.parametrize("mode", ["full", "pcg", "bcg"])
def test_decode_steps_with_cache_equal_eager(mode):
    model = toy_model(pattern=PATTERN, device="cuda")
    be = hattn.backend(mode=mode, capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False)
    fn = torch.compile(model, backend=be, dynamic=True)
    caches = [_toy_cache(model.config), _toy_cache(model.config)]
    prompts = [[3, 5, 7], [11, 2], [9]]
    lens = [len(p) for p in prompts]
    ids = torch.tensor(sum(prompts, []), device="cuda")
    outs = []
    with torch.no_grad():
        for cache, run in zip(caches, (model, fn)):
            ctx = hattn.ForwardContext(seq_lens=lens, slots=[0, 1, 2], cache=cache)
            with hattn.forward_context(ctx):
                logits = [model(ids)]  # prefill eagerly in both
            ctx_lens, tok = list(lens), torch.tensor([1, 2, 3], device="cuda")
            for _ in range(5):
                ctx = hattn.ForwardContext(seq_lens=[1, 1, 1], context_lens=ctx_lens, slots=[0, 1, 2], cache=cache)
                with hattn.forward_context(ctx):
                    out = run(tok)
                logits.append(out)
                tok = out.argmax(-1)
                ctx_lens = [c + 1 for c in ctx_lens]
            outs.append(logits)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, **TOL)
    assert be.stats.cuda_graphs > 0 and be.stats.replays == 5


@pytest.mark.parametrize("mode", ["full", "pcg", "bcg"])
def test_decode_steps_that_ask_for_gradients_replay_graphs_for_inference(mode):
    """Grad mode on and trainable parameters (no torch.no_grad() around the steps): the graphs are captured and
    replayed with eager's values, linears fused as for inference, and a backward through a step's output raises."""
    model = toy_model(pattern=PATTERN, device="cuda")
    be = hattn.backend(mode=mode, capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False)
    fn = torch.compile(model, backend=be, dynamic=True)
    caches = [_toy_cache(model.config), _toy_cache(model.config)]
    ids, tok = torch.tensor([3, 5, 7, 11, 2], device="cuda"), torch.tensor([1, 2], device="cuda")
    for cache in caches:
        with torch.no_grad(), hattn.forward_context(hattn.ForwardContext(seq_lens=[3, 2], slots=[0, 1], cache=cache)):
            model(ids)
    for step in range(3):
        outs = []
        for cache, run, grad in zip(caches, (model, fn), (False, True)):  # eager's saved views would stop fusion
            ctx = hattn.ForwardContext(seq_lens=[1, 1], context_lens=[3 + step, 2 + step], slots=[0, 1], cache=cache)
            with hattn.forward_context(ctx), torch.set_grad_enabled(grad):
                outs.append(run(tok))
        torch.testing.assert_close(outs[1], outs[0], **TOL)
        assert outs[1].requires_grad
        with pytest.raises(RuntimeError, match="compiles for inference"):
            outs[1].sum().backward()
        tok = outs[0].argmax(-1)
    assert be.stats.cuda_graphs > 0 and be.stats.replays == 3 and be.stats.fused_linears > 0


def _randomize(cache, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for i in cache.specs:
        for t in cache.state(i):
            t.copy_(torch.randn(t.shape, device="cuda", generator=gen) * 0.3)


_FULL = {}


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_full_graph_decode_equals_eager_for_random_batches(data):
    """Random batch (inside and above the sizes), random slots and context lengths, random cache contents (the
    graphs keep reading the cache they were captured with: the same two caches, refilled per example)."""
    if not _FULL:
        model = toy_model(pattern=PATTERN, device="cuda")
        be = hattn.backend(mode="full", capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False)
        _FULL.update(model=model, fn=torch.compile(model, backend=be, dynamic=True), be=be,
                     caches=(_toy_cache(model.config), _toy_cache(model.config)))
    model, fn = _FULL["model"], _FULL["fn"]
    b = data.draw(st.integers(1, 6), label="batch")
    slots = data.draw(st.permutations(range(8)), label="slots")[:b]
    lens = data.draw(st.lists(st.integers(0, 60), min_size=b, max_size=b), label="context_lens")
    seed = data.draw(st.integers(0, 1000), label="seed")
    tok = _ids(b, seed)
    results = []
    with torch.no_grad():
        for run, cache in zip((model, fn), _FULL["caches"]):
            _randomize(cache, seed)
            with hattn.forward_context(hattn.ForwardContext([1] * b, lens, list(slots), cache)):
                results.append(run(tok.clone()))
    torch.testing.assert_close(results[1], results[0], **TOL)
    for i in range(len(PATTERN)):  # the caches were updated alike (padding rows only touched the scratch slot)
        for a, g in zip(*(c.state(i) for c in _FULL["caches"])):
            torch.testing.assert_close(g[:8], a[:8], **TOL)


def test_full_graph_captures_again_for_another_cache():
    model = toy_model(pattern=PATTERN, device="cuda")
    be = hattn.backend(mode="full", capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False,
                       lazy_capture=False)
    fn = torch.compile(model, backend=be, dynamic=True)
    tok = _ids(3, 0)
    with torch.no_grad():
        for seed in (1, 2):
            eager_cache, graph_cache = _toy_cache(model.config, slots=3), _toy_cache(model.config, slots=3)
            outs = []
            for run, cache in ((model, eager_cache), (fn, graph_cache)):
                _randomize(cache, seed)
                with hattn.forward_context(hattn.ForwardContext([1] * 3, [5, 0, 9], [2, 0, 1], cache)):
                    outs.append(run(tok))
            torch.testing.assert_close(outs[1], outs[0], **TOL)
    s = be.stats
    assert s.replays == 2 and s.capture_sizes_done == 2 * 3  # sizes 1, 2, 4 (4 holds the 3 slots), twice


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq, hkv, d", [(8, 2, 128), (4, 4, 16), (6, 2, 80)])
def test_triton_decode_attention_equals_reference(dtype, hq, hkv, d):
    from hattn.kernels.attention.decode_triton import decode_attention

    gen = torch.Generator(device="cuda").manual_seed(hq + d)
    slots_n, max_len, b = 9, 300, 7
    k_cache = torch.randn(slots_n, max_len, hkv, d, device="cuda", generator=gen).to(dtype)
    v_cache = torch.randn(slots_n, max_len, hkv, d, device="cuda", generator=gen).to(dtype)
    q = torch.randn(b, 2 * hq, d, device="cuda", generator=gen).to(dtype)[:, ::2]  # strided q
    slots = torch.randperm(slots_n, device="cuda", generator=gen)[:b]
    lens = torch.tensor([0, 1, 63, 64, 65, 200, 299], device="cuda")
    got, want = torch.full((b, hq, d), float("nan"), device="cuda", dtype=dtype), torch.empty(b, hq, d, device="cuda",
                                                                                            dtype=dtype)
    decode_attention(q, k_cache, v_cache, slots, lens, got, d**-0.5)
    decode_attention_reference(q, k_cache, v_cache, slots, lens, want, d**-0.5)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, **tol)


# -- full graph: packed steps (prefill, extend, mixed) -------------------------------------------------------------
_PACKED = {}
HYBRID = dict(pattern=["linear", "full", "linear"], k_heads=2, v_heads=4, k_dim=64, v_dim=64, head_dim=64)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_full_graph_packed_steps_equal_eager_for_random_packings(data):
    """A hybrid model in mode=full: packed steps captured per token bucket (linear attention through our conv and
    fla's chunked rule, full attention through the varlen prefill kernel, both over the bucket's padded layout):
    random prefill / extend / mixed packings (lengths straddling fla's 64-token chunk, empty sequences, decode
    rows), slots and cache contents, inside a bucket and above the largest; full mode == eager, and only the step's
    slots and the scratch slot change."""
    if not _PACKED:
        model = toy_model(device="cuda", **HYBRID)
        be = hattn.backend(mode="full", capture_sizes=[16, 64, 128], inner_compiler="eager", progress=False)
        _PACKED.update(model=model, fn=torch.compile(model, backend=be, dynamic=True), be=be,
                       caches=(_toy_cache(model.config, max_len=256), _toy_cache(model.config, max_len=256)))
    model, fn, be = _PACKED["model"], _PACKED["fn"], _PACKED["be"]
    n = data.draw(st.integers(1, 4), label="sequences")
    lens = data.draw(st.lists(st.integers(0, 70), min_size=n, max_size=n).filter(lambda s: any(x != 1 for x in s)
                                                                                  and sum(s) > 0), label="lens")
    past = data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n), label="context_lens")
    slots = data.draw(st.permutations(range(8)), label="slots")[:n]
    seed = data.draw(st.integers(0, 1000), label="seed")
    ids = _ids(sum(lens), seed)
    results, replays = [], be.stats.replays
    with torch.no_grad():
        for run, cache in zip((model, fn), _PACKED["caches"]):
            _randomize(cache, seed)
            with hattn.forward_context(hattn.ForwardContext(lens, past, list(slots), cache)):
                results.append(run(ids.clone()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-3)
    # above the largest bucket: graph-free; so is a 1-token step that is not a decode step (an empty sequence
    # beside a one-token one): Dynamo specializes T=1, a graph without a token dimension, which serves decode only
    assert be.stats.replays == replays + (1 < sum(lens) <= 128)
    untouched = [s for s in range(8) if s not in [sl for sl, m in zip(slots, lens) if m]]
    eager_cache, graph_cache = _PACKED["caches"]
    for i in range(len(HYBRID["pattern"])):
        for a, b in zip(eager_cache.state(i), graph_cache.state(i)):
            torch.testing.assert_close(b[untouched], a[untouched], rtol=0, atol=0)
            torch.testing.assert_close(b[:8], a[:8], rtol=1e-3, atol=1e-3)


def test_full_graph_packed_steps_run_graph_free_when_an_op_cannot_serve_them_in_a_graph(monkeypatch, caplog):
    """Without fla the linear-attention op cannot run a packed step inside a graph: it says so in the warm-up
    (CaptureUnsupported), nothing is captured for packed steps, they run graph-free (logged) and stay correct."""
    monkeypatch.setattr("hattn.ops.linear.fla_chunk", lambda: None)
    model = toy_model(device="cuda", **HYBRID)
    be = hattn.backend(mode="full", capture_sizes=[16, 32], inner_compiler="eager", progress=False)
    fn = torch.compile(model, backend=be, dynamic=True)
    caches = (_toy_cache(model.config), _toy_cache(model.config))
    ids = _ids(9, 0)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="hattn"):
        results = []
        for run, cache in zip((model, fn), caches):
            with hattn.forward_context(hattn.ForwardContext([4, 5], [0, 0], [0, 1], cache)):
                results.append(run(ids))
    torch.testing.assert_close(results[1], results[0], **TOL)
    assert be.stats.eager_runs == 1 and be.stats.replays == 0
    assert "serves prefill and mixed steps graph-free" in caplog.text and "flash-linear-attention" in caplog.text
