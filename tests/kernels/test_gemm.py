"""The small-M GEMM: the Triton skinny GEMM == `linear_reference` (hypothesis over M, N, K, bias, dtypes, strided x,
launch configs; GPU, or CPU under TRITON_INTERPRET=1), and the `hattn_kernels::linear` op: F.linear on CPU, for
M > 64 and under torch.compile (CPU tests), per-shape timing, pinned choices and CUDA-graph capture (CUDA tests).

Tolerances, relative to the largest |output|: 1e-4 fp32 (full-precision multiplies), 1e-2 bf16/fp16 (outputs
rounded to the input dtype). Outputs are NaN-filled before each call, so an element the kernel never writes fails.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.gemm import choices, linear, load_choices, op
from hattn.kernels.gemm.reference import gated_input_reference, linear_reference
from hattn.kernels.launch import interpreting, sm_count
from hattn.registry import split_op_of, unregistered_mixer

try:
    from hattn.kernels.gemm import skinny
except ImportError:  # no triton: a CPU install
    skinny = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def triton_test(fn):
    """A test of the Triton kernel: GPU-marked, run on CUDA or on CPU under TRITON_INTERPRET=1."""
    for mark in (pytest.mark.gpu, pytest.mark.skipif(skinny is None, reason="needs triton"),
                 pytest.mark.skipif(DEV != "cuda" and not interpreting(),
                                    reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)")):
        fn = mark(fn)
    return fn


def cuda_test(fn):
    """A test of the op's CUDA path (timing, CUDA graphs): GPU-marked, CUDA only."""
    for mark in (pytest.mark.gpu, pytest.mark.skipif(DEV != "cuda" or skinny is None, reason="needs CUDA, triton")):
        fn = mark(fn)
    return fn


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty choice table for the test's duration (the process's table is left as it was)."""
    monkeypatch.setattr(op, "_CHOICES", {})


def _case(m, n, k, dtype, seed, bias=True, layout="contiguous"):
    """x [m, k] (layout "rows": the first k columns of [m, k + 7]; "columns": every other column of [m, 2k]),
    weight [n, k], bias [n] or None."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)  # noqa: E731
    x = {"contiguous": lambda: r(m, k), "rows": lambda: r(m, k + 7)[:, :k], "columns": lambda: r(m, 2 * k)[:, ::2]}
    return x[layout](), r(n, k) * k**-0.5, r(n) if bias else None


def _assert_matches(y, x, weight, bias):
    want = linear_reference(x, weight, bias)
    assert y.dtype == x.dtype and y.shape == want.shape
    tol = TOL[x.dtype] * want.abs().max().item()
    torch.testing.assert_close(y.float().cpu(), want.cpu(), rtol=0, atol=tol)


def _launches():
    return st.one_of(st.none(), st.builds(
        lambda bn, bk, s, dot: skinny.Launch(max(bn, 16) if dot else bn, bk, s, dot=dot),
        st.sampled_from([4, 16, 32, 64]), st.sampled_from([16, 32, 128]), st.sampled_from([1, 2, 3, 5]), st.booleans()))


# -- the Triton kernel (GPU, or the interpreter) ------------------------------------------------------------------
@triton_test
@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 64), n=st.one_of(st.sampled_from([1, 16, 1000]), st.integers(1, 130)),
       k=st.one_of(st.sampled_from([1, 96, 300]), st.integers(1, 140)), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "rows", "columns"]), data=st.data(), seed=st.integers(0, 2**16))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_skinny_linear_matches_reference(dtype, m, n, k, bias, layout, data, seed, nan_empty):
    config = data.draw(_launches())
    x, weight, b = _case(m, n, k, dtype, seed, bias, layout)
    _assert_matches(skinny.skinny_linear(x, weight, b, config=config), x, weight, b)


@triton_test
@pytest.mark.parametrize("m, n, k", [(1, 512, 3584), (8, 512, 1024), (64, 520, 1024)])
def test_skinny_linear_default_launch_at_model_shapes(m, n, k, nan_empty):
    """bf16 at the qwen3.5-1b step's shapes (the MLP's down projection at half its N, k_proj, a fused k/v + 8 rows):
    FMA and dot launches, split-K across 4 and 8 ranges and none."""
    x, weight, bias = _case(m, n, k, torch.bfloat16, seed=m)
    config = skinny.default_launch(m, n, k, torch.bfloat16, x.device)
    assert (config.dot, config.split_k) == {1: (False, 4), 8: (True, 8), 64: (True, 1)}[m]
    _assert_matches(skinny.skinny_linear(x, weight, bias), x, weight, bias)


@triton_test
@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(1, 4), n=st.one_of(st.sampled_from([1, 1000]), st.integers(1, 70)),
       k=st.one_of(st.sampled_from([1, 300, 3584]), st.integers(1, 140)), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "columns"]), seed=st.integers(0, 2**16),
       split_k=st.sampled_from([1, 3, 4]))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_skinny_linear_of_a_constant_weight_preloads_and_matches_reference(dtype, m, n, k, bias, layout, seed,
                                                                           split_k, nan_empty):
    """The preload form (the weight slice loaded in one tile before the PDL wait) on odd shapes and split-K."""
    x, weight, b = _case(m, n, k, dtype, seed, bias, layout)
    config = skinny.Launch(4, 512 // weight.element_size(), split_k, dot=False)
    k_per_split, _ = skinny.split_plan(k, config.block_k, config.split_k)
    assert skinny.preload_block(config, k_per_split) >= k_per_split  # the preload form serves these shapes
    _assert_matches(skinny.skinny_linear(x, weight, b, config=config, constant_weight=True), x, weight, b)


@triton_test
@pytest.mark.parametrize("dtype", DTYPES)
@given(m=st.integers(5, 16), n=st.one_of(st.sampled_from([1, 300]), st.integers(1, 70)),
       k=st.one_of(st.sampled_from([1, 300, 3584]), st.integers(1, 140)), bias=st.booleans(),
       narrow=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_skinny_linear_of_a_constant_weight_preloads_in_the_dot_form(dtype, m, n, k, bias, narrow, seed, nan_empty):
    """5 <= M <= 16: the tl.dot preload form with preload_dot_launch's narrow tiles, or the default launch where its
    slices fit, against the reference."""
    x, weight, b = _case(m, n, k, dtype, seed, bias, "columns")
    config = (skinny.preload_dot_launch(m, n, k, dtype) if narrow else
              skinny.default_launch(m, n, k, dtype, x.device))
    _assert_matches(skinny.skinny_linear(x, weight, b, config=config, constant_weight=True), x, weight, b)


@triton_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@given(m=st.integers(1, 4), n=st.integers(1, 70), k=st.one_of(st.sampled_from([1, 300]), st.integers(1, 140)),
       bias=st.booleans(), constant=st.booleans(), split_k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_gated_skinny_linear_reads_gate_and_up_itself(dtype, m, n, k, bias, constant, split_k, seed, nan_empty):
    """gated=True: y = (silu(gate) * up) @ w^T from [gate | up] rows (strided: a slice of a wider buffer), in both
    CUDA-core forms, against the reference of the product rounded to x's dtype."""
    gate_up, _, _ = _case(m, 2 * k, 2 * k, dtype, seed, layout="rows")  # [m, 2k], row stride 2k + 7
    _, weight, b = _case(m, n, k, dtype, seed + 1, bias)
    config = skinny.Launch(4, 32, split_k, dot=False)
    y = skinny.skinny_linear(gate_up, weight, b, config=config, constant_weight=constant, gated=True)
    x = gated_input_reference(gate_up)
    want = linear_reference(x, weight, b)
    # sigmoid's last fp32 bit may round the product to the neighbouring value of x's dtype: one ulp of each term
    ulp = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    tol = TOL[dtype] * want.abs().max().item() + ulp * (x.float().abs() @ weight.float().abs().T).max().item()
    torch.testing.assert_close(y.float().cpu(), want.cpu(), rtol=0, atol=tol)


@triton_test
@pytest.mark.parametrize("m, k", [(1, 1), (3, 300), (17, 1030)])
def test_silu_mul_is_the_reference_product(m, k):
    gate_up = _case(m, 2 * k, 2 * k, torch.bfloat16, seed=k, layout="rows")[0]
    want = gated_input_reference(gate_up).float().cpu()
    # one rounding to bf16 (Triton's interpreter may round toward zero where the GPU rounds to nearest: one ulp)
    torch.testing.assert_close(skinny.silu_mul(gate_up).float().cpu(), want, rtol=torch.finfo(torch.bfloat16).eps,
                               atol=1e-30)


@triton_test
def test_gated_skinny_linear_rejects_the_dot_form_and_a_wrong_width():
    gate_up, weight, _ = _case(8, 16, 32, torch.bfloat16, seed=0, bias=False)
    with pytest.raises(ValueError, match=r"gated=True runs on the CUDA-core forms"):
        skinny.skinny_linear(gate_up, weight[:, :16], gated=True, config=skinny.Launch(16, 16, 1))
    with pytest.raises(ValueError, match=r"do not fit x \[M, 2K\]"):
        skinny.skinny_linear(gate_up[:1], weight, gated=True)


@triton_test
def test_preload_falls_back_to_the_looping_form_past_its_tile():
    wide = skinny.Launch(16, 256, 1, dot=False)
    assert skinny.preload_block(wide, 1024) == 1024 and skinny.preload_block(wide, 2048) == 0
    dot = skinny.Launch(64, 128, 1, dot=True)
    assert skinny.preload_block(dot, 256, m=8) == 256 and skinny.preload_block(dot, 512, m=8) == 0
    assert skinny.preload_block(skinny.Launch(16, 128, 1, dot=True), 512, m=64) == 0  # x's 64 rows do not fit


@triton_test
@pytest.mark.parametrize("m, n", [(0, 8), (3, 0)])
def test_skinny_linear_of_no_rows_or_columns_is_empty(m, n):
    x, weight, bias = _case(m, n, 16, torch.bfloat16, seed=0)
    y = skinny.skinny_linear(x, weight, bias)
    assert (y.shape, y.dtype) == ((m, n), torch.bfloat16)


@triton_test
def test_split_k_is_deterministic(nan_empty):
    """Split-K sums fp32 partials in split order: the same call gives the same bits (no atomics)."""
    x, weight, bias = _case(3, 64, 512, torch.bfloat16, seed=1)
    config = skinny.Launch(32, 32, 16, dot=False)
    first = skinny.skinny_linear(x, weight, bias, config=config)
    assert all(torch.equal(skinny.skinny_linear(x, weight, bias, config=config), first) for _ in range(3))


@triton_test
@pytest.mark.parametrize("n, k, block_n, block_k, split_k", [  # scripts/gemv_sweep.py's best at M=1 (H200)
    (8224, 1024, 16, 256, 1), (1024, 2048, 4, 512, 1), (5120, 1024, 8, 512, 1), (7168, 1024, 8, 256, 1),
    (1024, 3584, 4, 512, 4), (512, 1024, 4, 512, 1), (248320, 1024, 16, 256, 1)])
def test_default_launch_at_m1_is_the_sweeps_best(n, k, block_n, block_k, split_k):
    c = skinny.default_launch(1, n, k, torch.bfloat16, torch.device(DEV))
    assert (c.dot, c.block_n, c.block_k, c.split_k) == (False, block_n, block_k, split_k)


@triton_test
@pytest.mark.parametrize("m, n, k", [(16, 1024, 1024), (64, 6144, 1024), (64, 1024, 3584), (5, 16, 1024),
                                     (8, 1, 1)])
def test_default_launch_fills_the_device_within_the_partials_budget(m, n, k):
    """Rows padded for tl.dot (M > 4): programs (N tiles x splits) cover two an SM unless K's blocks, SPLIT_K_MAX
    or the partials' bytes stop split-K; every split holds K; the partials cost at most PARTIALS_SHARE of the
    weight's bytes."""
    device = torch.device(DEV)
    c = skinny.default_launch(m, n, k, torch.bfloat16, device)
    k_per_split, splits = skinny.split_plan(k, c.block_k, c.split_k)
    assert (splits - 1) * k_per_split < k <= splits * k_per_split and k_per_split % c.block_k == 0
    filled = -(-n // c.block_n) * splits >= 2 * sm_count(device)
    k_bound = splits in (-(-k // c.block_k), skinny.SPLIT_K_MAX)
    assert filled or k_bound or (splits + 1) * 2 * m * 4 > skinny.PARTIALS_SHARE * k * 2
    assert splits == 1 or splits * 2 * m * 4 <= skinny.PARTIALS_SHARE * k * 2


@triton_test
@pytest.mark.parametrize("bad, match", [
    ("k", r"x \[3, 8\], weight \[5, 16\], bias \[5\] do not fit x \[M, K\], weight \[N, K\], bias \[N\]"),
    ("bias", r"bias \[4\] do not fit"),
    ("rows", r"x has M=65 rows, more than the 64 this kernel serves; use torch.nn.functional.linear"),
    ("dtype", r"dtypes \['torch.bfloat16', 'torch.float32'\]; they need one dtype of"),
])
def test_skinny_linear_rejects_bad_input_naming_it(bad, match):
    x, weight, bias = _case(3, 5, 16, torch.float32, seed=0)
    args = {"k": lambda: (x[:, :8], weight, bias), "bias": lambda: (x, weight, bias[:4]),
            "rows": lambda: (x[:1].expand(65, 16), weight, bias), "dtype": lambda: (x, weight.bfloat16(), bias)}[bad]()
    for _ in range(2):  # checks run once per metadata: a failure must raise every time
        with pytest.raises(ValueError, match=match):
            skinny.skinny_linear(*args)


@pytest.mark.skipif(skinny is None, reason="needs triton")
@pytest.mark.parametrize("kwargs, match", [(dict(block_n=24, block_k=16), r"block_n=24 must be a power of two"),
                                           (dict(block_n=16, block_k=8), r"block_k=8 must be a power of two"),
                                           (dict(block_n=8, block_k=16), r"block_n=8 must be a power of two >= 16"),
                                           (dict(block_n=16, block_k=16, split_k=0), r"split_k=0 and stages=4")])
def test_launch_rejects_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        skinny.Launch(**kwargs)


# -- the op on CPU: F.linear, opaque to torch.compile -------------------------------------------------------------
@pytest.mark.parametrize("lead, n, k, bias", [((3,), 7, 16, True), ((2, 5), 7, 16, False), ((65,), 4, 8, True),
                                              ((0,), 3, 4, False)])
def test_linear_op_on_cpu_is_f_linear(lead, n, k, bias, fresh_choices):
    x, weight, b = torch.randn(*lead, k), torch.randn(n, k), torch.randn(n) if bias else None
    assert torch.equal(linear(x, weight, b), F.linear(x, weight, b))
    assert choices() == []  # nothing timed on CPU


def test_linear_op_under_torch_compile_has_a_working_fake(fresh_choices):
    x, weight, bias = torch.randn(2, 3, 16), torch.randn(24, 16), torch.randn(24)
    compiled = torch.compile(lambda x: torch.relu(linear(x, weight, bias)), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), torch.relu(F.linear(x, weight, bias)))
    torch.library.opcheck(torch.ops.hattn_kernels.linear.default, (x, weight, bias))
    with torch._subclasses.FakeTensorMode():
        fake = linear(torch.empty(5, 16, dtype=torch.bfloat16), torch.empty(24, 16, dtype=torch.bfloat16))
    assert (fake.shape, fake.dtype) == ((5, 24), torch.bfloat16)


def test_linear_op_is_not_taken_for_an_attention_mixer():
    assert unregistered_mixer(torch.ops.hattn_kernels.linear) is None
    assert split_op_of(torch.ops.hattn_kernels.linear) is None


def test_load_choices_pins_rows_that_choices_lists_in_order(fresh_choices):
    rows = [dict(m=4, n=8, k=16, dtype="bfloat16", device="cuda:0", bias=False, preload=True, backend="triton",
                 cublas_us=None, triton_us=None,
                 launch=dict(block_n=4, block_k=256, split_k=1, warps=4, stages=4, dot=False), plain=False),
            dict(m=1, n=8, k=16, dtype="bfloat16", device="cuda:0", bias=True, preload=True, backend="triton",
                 cublas_us=5.0, triton_us=4.5, launch=None, plain=True)]
    load_choices(rows)
    assert choices() == rows[::-1]
    for bad in (dict(backend="cutlass"), dict(dtype="torch.bfloat16")):
        with pytest.raises(ValueError, match=r"needs a backend of \('cublas', 'triton'\) and a dtype of \['float16', "):
            load_choices([rows[0] | bad])
    assert choices() == rows[::-1]
    older = {f: v for f, v in rows[0].items() if f not in ("preload", "launch", "plain")} | {"m": 2}  # saved before
    load_choices([older])
    assert older | {"preload": False, "launch": None, "plain": False} in choices()


# -- the op on CUDA: timed choice, capture -------------------------------------------------------------------------
def _count_skinny_calls(monkeypatch) -> list:
    """Record each call of skinny_linear (the op imports it at call time, so the patch reaches it)."""
    calls, real = [], skinny.skinny_linear
    monkeypatch.setattr(skinny, "skinny_linear", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@cuda_test
def test_linear_op_times_a_new_shape_once_and_remembers_the_faster(fresh_choices, monkeypatch):
    x, weight, bias = _case(3, 1000, 96, torch.float16, seed=0)
    _assert_matches(linear(x, weight, bias), x, weight, bias)
    [row] = choices()
    assert {f: row[f] for f in ("m", "n", "k", "dtype", "device", "bias")} == dict(
        m=3, n=1000, k=96, dtype="float16", device=str(x.device), bias=True)
    assert row["cublas_us"] > 0 and row["triton_us"] > 0
    assert row["backend"] == ("triton" if row["triton_us"] < row["cublas_us"] else "cublas")

    def measured_twice(*args):
        raise AssertionError("the shape was timed a second time")
    monkeypatch.setattr(op, "_measure", measured_twice)
    _assert_matches(linear(x, weight, bias), x, weight, bias)


def test_a_new_shape_is_timed_under_the_capture_lock(fresh_choices, monkeypatch):
    """The timing synchronizes the device, which CUDA forbids while another thread captures (seen on the H100: a
    thread's graph-free step timed a new shape while another thread captured pcg graphs): it waits for captures."""
    import threading

    from hattn.runtime.graphs import CAPTURE_LOCK

    held = []

    def measure(*args):
        held.append(CAPTURE_LOCK._is_owned())
        return op._CUBLAS
    monkeypatch.setattr(op, "_measure", measure)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # a CPU build raises
    x, weight, _ = _case(3, 40, 16, torch.float32, seed=0)
    op._choice(x, weight, None)
    assert held == [True]
    with CAPTURE_LOCK:  # another thread capturing: the shape's timing waits
        other = threading.Thread(target=op._choice, args=(x[:2], weight, None))
        other.start()
        other.join(timeout=0.2)
        assert other.is_alive() and held == [True]
    other.join()
    assert held == [True, True]


@cuda_test
def test_linear_op_timing_leaves_out_the_hosts_launch_time(fresh_choices, monkeypatch):
    """The per-shape timing reads device time: a host that takes 300 us to launch the skinny GEMM (a model's warm-up
    is slow on the host) must not make it look slower. Before the timing held the device while the host queued its
    reps, the out_proj shape read 56 us for a 4.6 us kernel and cuBLAS's 12 us was kept."""
    import time

    x, weight, _ = _case(1, 1024, 2048, torch.bfloat16, seed=0)
    fast = op._measure(x, weight, None).triton_us
    real = skinny.skinny_linear

    def slow_host(*args, **kwargs):
        end = time.perf_counter() + 300e-6
        while time.perf_counter() < end:
            pass
        return real(*args, **kwargs)
    monkeypatch.setattr(skinny, "skinny_linear", slow_host)
    slow = op._measure(x, weight, None).triton_us
    assert slow < 2 * fast + 5, (fast, slow)


@cuda_test
def test_linear_op_takes_cublas_untimed_when_the_timing_buffer_does_not_fit(fresh_choices, monkeypatch):
    """Timing needs an L2-flush buffer; out of memory for it, the call still runs (cuBLAS, remembered untimed)
    instead of raising (the GPU fault tests cap the allocator and run graph-free small-M steps)."""
    monkeypatch.setattr(op, "_flush_bytes", lambda device: 1 << 50)
    x, weight, bias = _case(3, 1000, 96, torch.bfloat16, seed=0)
    assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    [row] = choices()
    assert (row["backend"], row["cublas_us"], row["triton_us"]) == ("cublas", None, None)


@cuda_test
def test_linear_op_leaves_more_than_64_rows_and_shapes_first_seen_in_capture_to_cublas(fresh_choices, monkeypatch):
    calls = _count_skinny_calls(monkeypatch)
    x, weight, _ = _case(65, 256, 128, torch.bfloat16, seed=0)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    x = x[:2]
    F.linear(x, weight)  # cuBLAS set up before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, weight)
    graph.replay()
    _assert_matches(y, x, weight, None)
    assert choices() == [] and calls == []


@cuda_test
@pytest.mark.parametrize("backend", ["cublas", "triton"])
def test_linear_op_captured_in_graph_runs_the_pinned_backend_and_replays_new_x(backend, fresh_choices, monkeypatch):
    x, weight, bias = _case(4, 1000, 96, torch.bfloat16, seed=0)
    x = x.view(2, 2, 96)  # leading dims flatten to M = 4 rows
    load_choices([dict(m=4, n=1000, k=96, dtype="bfloat16", device=str(x.device), bias=True, backend=backend)])
    calls = _count_skinny_calls(monkeypatch)
    linear(x, weight, bias)  # warm-up: compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, weight, bias)
    assert len(calls) == {"cublas": 0, "triton": 2}[backend]
    for seed in (1, 2, 3):
        x.copy_(_case(4, 1, 96, torch.bfloat16, seed)[0].view(2, 2, 96))
        y.fill_(float("nan"))
        graph.replay()
        _assert_matches(y.view(4, 1000), x.view(4, 96), weight, bias)


@cuda_test
def test_linear_op_of_a_constant_weight_times_the_preload_form_with_and_without_split_k(fresh_choices):
    """With PDL on, a parameter's small-M shape is timed after the lead kernel (preload=True in its row); where the
    default launch splits K, the unsplit preload launch is timed too and the faster kept; captured, it replays."""
    from hattn.kernels import pdl

    if not pdl.active():
        pytest.skip("the preload timing needs PDL (sm_90+)")
    x, weight, _ = _case(1, 1024, 3584, torch.bfloat16, seed=0)  # the MLP's down projection: split-K by default
    assert skinny.default_launch(1, 1024, 3584, torch.bfloat16, x.device).split_k > 1
    _assert_matches(linear(x, weight, None, constant_weight=True), x, weight, None)
    [row] = choices()
    assert row["preload"] and row["cublas_us"] > 0 and row["triton_us"] > 0
    assert row["launch"] is None or (row["launch"]["split_k"] == 1 and not row["plain"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, weight, None, constant_weight=True)
    x.copy_(_case(1, 1, 3584, torch.bfloat16, seed=5)[0])
    graph.replay()
    _assert_matches(y, x, weight, None)


@triton_test
def test_preload_shapes_are_also_timed_unsplit_or_with_narrow_dot_tiles():
    dev, bf16 = torch.device(DEV), torch.bfloat16
    default = skinny.default_launch(1, 1024, 3584, bf16, dev)
    assert op.preload_launches(1, 1024, 3584, bf16, dev) == [dataclasses.replace(default, split_k=1)]
    assert op.preload_launches(1, 1024, 1024, bf16, dev) == []  # the default does not split
    [dot] = op.preload_launches(16, 8224, 3584, bf16, dev)
    assert (dot.dot, dot.block_n, dot.block_k, dot.split_k) == (True, 16, 1024, 4)
    assert op.preload_launches(32, 8224, 1024, bf16, dev) == []


@cuda_test
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gated_linear_op_equals_silu_times_up_then_linear(rows, fresh_choices):
    """hattn_kernels::gated_linear: the skinny GEMM reading [gate | up] at M <= 4, silu * up then `linear` above."""
    from hattn.kernels.gemm.op import gated_linear

    gate_up = _case(rows, 16, 2 * 3584, torch.bfloat16, seed=rows)[0]  # x [rows, 2K]
    _, weight, bias = _case(rows, 1024, 3584, torch.bfloat16, seed=rows + 1)
    y = gated_linear(gate_up.view(rows, 1, -1), weight, bias, constant_weight=True)
    _assert_matches(y.view(rows, -1), gated_input_reference(gate_up), weight, bias)


@cuda_test
def test_a_skinny_launch_triton_cannot_build_is_left_out_and_cublas_serves(fresh_choices, monkeypatch, caplog):
    """A launch that fails to compile or fit (here: every one) is logged and skipped; the call still runs."""
    from triton.runtime.errors import OutOfResources

    def unbuildable(*args, **kwargs):
        raise OutOfResources(1 << 20, 232448, "shared memory")
    monkeypatch.setattr(skinny, "skinny_linear", unbuildable)
    x, weight, bias = _case(2, 300, 96, torch.bfloat16, seed=0)
    with caplog.at_level("WARNING", logger="hattn"):
        assert torch.equal(linear(x, weight, bias), F.linear(x, weight, bias))
    [row] = choices()
    assert row["backend"] == "cublas" and row["triton_us"] is None and "does not build here" in caplog.text


@pytest.mark.parametrize("times, want", [
    ({"cublas": 9.0, "default": 5.0, "unsplit": 4.0, "plain": 6.0}, ("triton", "unsplit", False)),
    ({"cublas": 9.0, "default": 5.0, "unsplit": 7.0, "plain": 4.5}, ("triton", None, True)),
    ({"cublas": 3.0, "default": 5.0, "unsplit": 4.0, "plain": 6.0}, ("cublas", None, False)),
    ({"cublas": 9.0, "default": None, "unsplit": None, "plain": 8.0}, ("triton", None, True)),  # preload unbuildable
])
def test_measure_keeps_the_fastest_candidate_and_which_form_it_was(times, want, monkeypatch):
    """The selection alone (CPU: timings and kernels stand-ins): cuBLAS, the skinny GEMM's default launch in its
    preload form, an extra launch (unsplit) and the plain form; an unbuildable candidate is left out."""
    import sys
    import types

    unsplit = op.Launch(4, 512, 1, dot=False)
    fake = types.ModuleType("hattn.kernels.gemm.skinny")

    def fake_linear(x, w, b=None, *, config=None, constant_weight=False):
        name = "unsplit" if config == unsplit else "default" if constant_weight else "plain"
        if times[name] is None:
            raise op._UNBUILDABLE[1](1 << 20, 232448, "shared memory")  # OutOfResources
        return name

    fake.skinny_linear = fake_linear
    monkeypatch.setitem(sys.modules, "hattn.kernels.gemm.skinny", fake)
    monkeypatch.setattr(op, "preload_launches", lambda *shape: [unsplit])
    monkeypatch.setattr(op, "_flush_bytes", lambda device: 16)
    monkeypatch.setattr(op, "_median_us", lambda fn, flush, lead: times[r if isinstance(r := fn(), str) else "cublas"])
    if times["default"] is None and not op._UNBUILDABLE:
        pytest.skip("needs Triton's error classes")
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    c = op._measure(x, w, None, preload=True)
    assert (c.backend, None if c.launch is None else "unsplit", c.plain) == want
    assert c.cublas_us == times["cublas"]
    assert c.triton_us == min(t for name, t in times.items() if name != "cublas" and t is not None)
