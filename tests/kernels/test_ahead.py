"""Compiling ahead (hattn/kernels/ahead.py): a dry run skips the launches of kernels not yet compiled and compiles
them in a pool, once each; an autotuner's benchmark, a CUDA graph's capture and the pool's own compiles go on as
usual; hattn's GEMM choice times and remembers nothing in a dry run; a graph runtime dry-runs a step before its
warm-up. The hook's decisions are CPU tests; real compiles and launches need a GPU."""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import threading
import types

import pytest
import torch

from hattn.counters import Stats
from hattn.kernels import ahead
from hattn.kernels.gemm import op
from hattn.kernels.launch import has_triton
from hattn.runtime.graphs import GraphRuntime


class _Preloads:
    """A JITFunction stand-in: records the specializations sent to `preload` (in pool threads)."""

    def __init__(self):
        self.calls, self.threads = [], set()
        self.device_caches = collections.defaultdict(lambda: ({},))

    def preload(self, data):
        self.calls.append(json.loads(data)["key"])
        self.threads.add(threading.current_thread().name)


def _hook_call(run: ahead.DryRun, jit, key: str, device: int = 0, constants=None):
    constants = constants or {}
    data = json.dumps({"key": key, "constant_vals": list(constants.values())})
    return run.hook(key=key, repr=key, fn=types.SimpleNamespace(jit_function=jit),
                    compile={"device": device, "constants": constants, "specialization_data": data},
                    is_manual_warmup=False, already_compiled=False)


@pytest.fixture(autouse=True)
def not_capturing(monkeypatch):
    """No CUDA graph is being captured (torch's CPU build has no such query)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


@pytest.fixture
def plain_constexprs(monkeypatch):
    """The hook's JSON check passes (it needs Triton's dtypes: tested on its own below)."""
    monkeypatch.setattr(ahead, "_round_trips", lambda compile: True)


@pytest.fixture
def no_cuda_device(monkeypatch):
    """`_preload` sets the launch's device: a no-op stand-in where there is no GPU."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


def test_the_hook_skips_each_launch_and_compiles_each_kernel_once_after_the_dry_run(no_cuda_device, plain_constexprs,
                                                                                   monkeypatch):
    monkeypatch.setattr(ahead, "_autotuning", lambda: False)
    run, jit, other = ahead.DryRun(workers=2), _Preloads(), _Preloads()
    assert _hook_call(run, jit, "k1") is True and _hook_call(run, jit, "k1") is True  # launched twice, recorded once
    assert _hook_call(run, jit, "k2") is True and _hook_call(run, other, "k1") is True
    assert _hook_call(run, jit, "k1", device=1) is True  # another device's launcher cache: its own compile
    assert jit.calls == [] and other.calls == []  # nothing compiles while the dry run runs
    jit.device_caches[0][0]["k2"] = "compiled by a launch meanwhile"  # a capture's: kept, not compiled again
    run.finish()
    assert sorted(jit.calls) == ["k1", "k1"] and other.calls == ["k1"]
    assert all(name.startswith("hattn-compile") for name in jit.threads | other.threads)
    assert (run.compiled, run.failed, run.skipped) == (4, 0, 5)


def test_a_failed_compile_is_counted_and_left_to_the_real_run(no_cuda_device, plain_constexprs, monkeypatch):
    monkeypatch.setattr(ahead, "_autotuning", lambda: False)

    class Broken(_Preloads):
        def preload(self, data):
            raise RuntimeError("ptxas: too many registers")

    run = ahead.DryRun(workers=1)
    _hook_call(run, Broken(), "bad")
    _hook_call(run, _Preloads(), "good")
    run.finish()
    assert (run.compiled, run.failed) == (1, 1)


def test_the_hook_lets_other_threads_captures_and_autotuning_go_on(plain_constexprs, monkeypatch):
    run, jit = ahead.DryRun(workers=1), _Preloads()
    monkeypatch.setattr(ahead, "_autotuning", lambda: True)
    assert _hook_call(run, jit, "tuned") is None  # an autotuner's benchmark: compile and run as usual
    monkeypatch.setattr(ahead, "_autotuning", lambda: False)
    result = []
    other = threading.Thread(target=lambda: result.append((_hook_call(run, jit, "elsewhere"), ahead.active())))
    monkeypatch.setattr(ahead, "_active", run)
    assert ahead.active()
    other.start()
    other.join()
    assert result == [(None, False)]  # another thread's launch (the pool's own compiles, another model's step)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _hook_call(run, jit, "captured") is None  # a graph being captured needs the real kernel
    run.finish()
    assert run.jobs == {} and jit.calls == []


@pytest.mark.skipif(not has_triton(), reason="needs Triton (its dtypes)")
def test_a_launch_whose_constexprs_json_would_change_compiles_as_usual(monkeypatch):
    import triton.language as tl

    monkeypatch.setattr(ahead, "_autotuning", lambda: False)
    run, jit = ahead.DryRun(workers=1), _Preloads()
    kept = {(0,): 4, (1,): "ieee", (2,): True, (3,): None, (4,): tl.float16, (5,): tl.constexpr(8)}
    serialized = {k: str(v) if isinstance(v, tl.dtype) else {"constexpr": v.value} if isinstance(v, tl.constexpr)
                  else v for k, v in kept.items()}
    data = json.dumps({"key": "ok", "constant_vals": list(serialized.values())})
    assert run.hook(key="ok", fn=types.SimpleNamespace(jit_function=jit),
                    compile={"device": 0, "constants": kept, "specialization_data": data}) is True
    for value, as_json in (((1, 2), [1, 2]), ("fp32", "fp32"), (torch.float32, "torch.float32")):
        data = json.dumps({"key": "changed", "constant_vals": [as_json]})
        assert run.hook(key="changed", fn=types.SimpleNamespace(jit_function=jit),
                        compile={"device": 0, "constants": {(0,): value}, "specialization_data": data}) is None
    assert list(run.jobs) == [(jit, 0, "ok")]


def test_a_caller_does_its_dry_run_work_once(monkeypatch):
    assert not ahead.first("shape")  # no dry run
    monkeypatch.setattr(ahead, "_active", ahead.DryRun(workers=1))
    assert ahead.first("shape") and not ahead.first("shape") and ahead.first("other")


@pytest.mark.skipif(not has_triton(), reason="needs Triton (its Autotuner)")
def test_autotuning_is_seen_from_the_autotuners_benchmark():
    import triton
    from triton.runtime.autotuner import Autotuner

    seen = []
    stub = types.SimpleNamespace(nargs={}, pre_hook=lambda *a, **k: None, post_hook=lambda *a, **k: None,
                                 fn=types.SimpleNamespace(run=lambda *a, **k: seen.append(ahead._autotuning())),
                                 do_bench=lambda call, quantiles: call() or [1.0] * 3, base_fn=_Preloads)
    Autotuner._bench(stub, config=triton.Config({}))
    assert seen == [True] and not ahead._autotuning()


def test_no_dry_run_where_it_cannot_compile_ahead(monkeypatch):
    monkeypatch.setattr(ahead, "enabled", True)
    for device in (None, torch.device("cpu")):
        with ahead.compiling(device) as run:
            assert run is None and not ahead.active()
    monkeypatch.setattr(ahead, "enabled", False)
    with ahead.compiling(torch.device("cuda", 0)) as run:
        assert run is None


def test_the_gemm_choice_times_nothing_and_remembers_nothing_in_a_dry_run(monkeypatch):
    monkeypatch.setattr(op, "_CHOICES", {})
    monkeypatch.setattr(ahead, "_active", ahead.DryRun(workers=1))
    launched, leads = [], []
    monkeypatch.setattr(op, "_measure", lambda *a, **k: pytest.fail("timed in a dry run"))
    monkeypatch.setattr(op, "_lead", lambda: leads.append(1))
    monkeypatch.setattr(op, "preload_launches", lambda m, n, k, dtype, device: ["narrow", "no split"])
    skinny = types.ModuleType("hattn.kernels.gemm.skinny")  # Triton's kernels' module, without Triton
    skinny.skinny_linear = lambda x, w, b, config=None, constant_weight=False: launched.append((config,
                                                                                               constant_weight))
    monkeypatch.setitem(sys.modules, "hattn.kernels.gemm.skinny", skinny)
    x, w = torch.randn(4, 64), torch.randn(128, 64)
    assert op._choice(x, w, None, preload=True) is op._CUBLAS
    assert launched == [(None, True), ("narrow", True), ("no split", True), (None, False)] and leads == [1]
    assert op._CHOICES == {}  # the real run times the shape
    launched.clear()
    assert op._choice(x, w, None, preload=True) is op._CUBLAS and launched == []  # once per shape and dry run
    assert op._choice(x, w, None, preload=False) is op._CUBLAS and launched == [(None, False)]


class _FakeRun:
    compiled = 3


def _runtime_stub(fn):
    return types.SimpleNamespace(fn=fn, stats=Stats(), name="stub")


def test_a_graph_runtime_dry_runs_the_step_before_its_warm_up(monkeypatch):
    calls, forgotten = [], []

    @contextlib.contextmanager
    def compiling(device):
        calls.append(("dry run on", device))
        yield _FakeRun()

    monkeypatch.setattr(ahead, "compiling", compiling)
    ctx = types.SimpleNamespace(forget=lambda: forgotten.append(1))
    monkeypatch.setattr("hattn.runtime.graphs.get_forward_context", lambda: ctx)
    stub = _runtime_stub(lambda *args: calls.append(("step", len(args))))
    GraphRuntime._compile_ahead(stub, [3, torch.zeros(2), torch.zeros(1)])
    assert calls == [("dry run on", None), ("step", 3)]  # the device of its first CUDA tensor (none here)
    assert stub.stats.kernels_compiled_ahead == 3 and forgotten == [1]

    def fails(*args):
        raise RuntimeError("a dry run's garbage")

    GraphRuntime._compile_ahead(_runtime_stub(fails), [torch.zeros(2)])  # the warm-up that follows raises, if any


def test_the_dry_run_runs_inside_the_captures_context_before_the_capture():
    events = []

    @contextlib.contextmanager
    def capture_context(size):
        events.append(("context", size))
        yield
        events.append("context left")

    stub = types.SimpleNamespace(
        layout=types.SimpleNamespace(has_tokens=True), inputs=types.SimpleNamespace(fill=lambda size, args, n: ["s"]),
        capture_context=capture_context, _compile_ahead=lambda static: events.append(("dry run", static)),
        capture=lambda size, static: events.append(("capture", size)), captured=set(), stats=Stats(), name="stub")
    GraphRuntime._capture_one(stub, 4, ["arg"])
    assert events == [("context", 4), ("dry run", ["s"]), ("capture", 4), "context left"]


def test_no_dry_run_of_the_step_where_nothing_compiles_ahead(monkeypatch):
    @contextlib.contextmanager
    def compiling(device):
        yield None

    monkeypatch.setattr(ahead, "compiling", compiling)
    stub = _runtime_stub(lambda *args: pytest.fail("the step ran"))
    GraphRuntime._compile_ahead(stub, [torch.zeros(2)])
    assert stub.stats.kernels_compiled_ahead == 0


# -- on the GPU --------------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and has_triton()), reason="needs CUDA and Triton")

if has_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _scale(x, out, a, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + i, a * tl.load(x + i, mask=i < n), mask=i < n)

    @triton.autotune(configs=[triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 128})], key=["n"])
    @triton.jit
    def _tuned_scale(x, out, a, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + i, a * tl.load(x + i, mask=i < n), mask=i < n)


@pytest.fixture
def compile_ahead(monkeypatch):
    """Compiling ahead on, whatever HATTN_COMPILE_AHEAD says in the environment."""
    monkeypatch.setattr(ahead, "enabled", True)


def _kernel_cache(fn) -> dict:
    return fn.device_caches[torch.cuda.current_device()][0]


@pytest.mark.gpu
@gpu
def test_a_dry_run_skips_a_new_kernels_launch_and_the_real_run_finds_it_compiled(compile_ahead):
    n, block = 1000, 128
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    out = torch.full_like(x, -1.0)
    grid = (triton.cdiv(n, block),)
    _kernel_cache(_scale).clear()
    with ahead.compiling(x.device) as run:
        assert run is not None and ahead.active()
        _scale[grid](x, out, 2.0, n, BLOCK=block, num_warps=2)
        torch.cuda.synchronize()
        assert (out == -1).all()  # skipped: the kernel was not compiled yet
    assert not ahead.active() and (run.compiled, run.failed) == (1, 0) and len(_kernel_cache(_scale)) == 1
    ahead_kernel = next(iter(_kernel_cache(_scale).values()))
    assert ahead_kernel.metadata.num_warps == 2
    _scale[grid](x, out, 2.0, n, BLOCK=block, num_warps=2)
    torch.testing.assert_close(out, 2 * x)
    assert len(_kernel_cache(_scale)) == 1  # the real launch compiled nothing more
    _kernel_cache(_scale).clear()
    _scale[grid](x, out, 2.0, n, BLOCK=block, num_warps=2)  # compiled on this thread (from Triton's disk cache)
    assert next(iter(_kernel_cache(_scale).values())).hash == ahead_kernel.hash  # same source, options, target
    with ahead.compiling(x.device) as again:
        _scale[grid](x, out, 3.0, n, BLOCK=block, num_warps=2)  # compiled: a dry run launches it as usual
    torch.testing.assert_close(out, 3 * x)
    assert again.compiled == 0


@pytest.mark.gpu
@gpu
def test_a_dry_run_leaves_autotuning_and_graph_capture_as_they_are(compile_ahead):
    n = 1000
    x = torch.arange(n, device="cuda", dtype=torch.float32)
    out = torch.zeros_like(x)
    with ahead.compiling(x.device) as run:
        _tuned_scale[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, 2.0, n)
    torch.testing.assert_close(out, 2 * x)  # benchmarked and launched for real
    assert all(t[0] > 0 for t in _tuned_scale.configs_timings.values()) and run.compiled == 0
    _kernel_cache(_scale).clear()
    graph = torch.cuda.CUDAGraph()
    with ahead.compiling(x.device) as run:
        _scale[(8,)](x, out, 5.0, n, BLOCK=128)  # skipped and recorded
        with torch.cuda.graph(graph, capture_error_mode="relaxed"):  # relaxed: a module may load mid-capture
            _scale[(8,)](x, out, 4.0, n, BLOCK=128)  # inside a capture: compiled here, captured
        captured = next(iter(_kernel_cache(_scale).values()))
    # the recorded compile left the captured kernel in place (its graph holds that one's function)
    assert len(_kernel_cache(_scale)) == 1 and next(iter(_kernel_cache(_scale).values())) is captured
    out.zero_()
    graph.replay()
    torch.testing.assert_close(out, 4 * x)


def _forget_compiled_kernels() -> None:
    """Empty the launch caches of every Triton kernel hattn and fla define (and hattn's kept launches), so the
    next launches compile (from Triton's disk cache) as in a new process."""
    import sys as _sys

    from triton.runtime.jit import JITFunction, KernelInterface

    from hattn.kernels import bound

    bound.forget()
    for name, module in list(_sys.modules.items()):
        if module is None or not name.startswith(("hattn.kernels", "fla.")):
            continue
        for value in list(vars(module).values()):
            while not isinstance(value, JITFunction) and isinstance(getattr(value, "fn", None), (JITFunction,
                                                                                                KernelInterface)):
                value = value.fn  # an Autotuner, fla's Heuristics
            if isinstance(value, JITFunction):
                value.device_caches.clear()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_every_graph_mode_compiles_ahead_and_equals_eager(mode, compile_ahead, monkeypatch):
    """A hybrid toy model's first captures with compiling ahead on: kernels were compiled by the dry runs and not
    again by the warm-ups, and the graphs' results equal eager's (pcg and bcg: a packed prefill; full: a decode step
    over a cache)."""
    import hattn
    from hattn.models.toy import toy_cache, toy_model

    from triton import knobs

    torch._dynamo.reset()
    _forget_compiled_kernels()
    compiled_by: dict[str, set] = collections.defaultdict(set)  # kernel hash -> threads that compiled it
    lock = threading.Lock()

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        with lock:
            compiled_by[metadata["hash"]].add(threading.current_thread().name.startswith("hattn-compile"))

    monkeypatch.setattr(knobs.compilation, "listener", listener)
    model = toy_model(seed=0, device="cuda", pattern=["linear", "full", "linear"], hidden=32, heads=4, kv_heads=2,
                      head_dim=16, k_heads=2, v_heads=4, k_dim=16, v_dim=16, conv_kernel=4, intermediate=64)
    be = hattn.backend(mode=mode, capture_sizes=[1, 2, 4, 8, 16], inner_compiler="eager", progress=False)
    compiled = torch.compile(model, backend=be, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if mode == "full":
            slots, lens = [3, 5], [7, 0]
            caches = [toy_cache(model.config, slots=8, max_len=32, device="cuda") for _ in range(2)]
            ids = torch.randint(0, 128, (2,), generator=gen).cuda()
            outs = []
            for run, cache in zip((model, compiled), caches):
                with hattn.forward_context(hattn.ForwardContext([1, 1], lens, slots, cache)):
                    outs.append(run(ids))
            torch.testing.assert_close(outs[1], outs[0], rtol=2e-4, atol=2e-4)
        else:
            with hattn.forward_context(hattn.ForwardContext(seq_lens=[5, 6])):
                for _ in range(2):  # the second call replays what the first captured
                    ids = torch.randint(0, 128, (11,), generator=gen).cuda()
                    torch.testing.assert_close(compiled(ids), model(ids), rtol=2e-4, atol=2e-4)
    assert be.stats.replays >= 1 and be.stats.kernels_compiled_ahead > 0
    # a kernel compiled ahead is the one the real launches find: none is compiled again on the step's thread
    assert not [h for h, pool in compiled_by.items() if pool == {True, False}]


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_compiling_ahead_is_on_unless_the_environment_turns_it_off(value, on):
    env = {k: v for k, v in os.environ.items() if k != "HATTN_COMPILE_AHEAD"} | ({} if value is None else
                                                                               {"HATTN_COMPILE_AHEAD": value})
    out = subprocess.run([sys.executable, "-c", "from hattn.kernels import ahead; print(ahead.enabled)"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(on)]
