"""The hattn backend end to end on CPU: every mode == eager, split counts, guard errors, user kinds, options."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import hattn
from hattn.compiler.backend import backend
from hattn.compiler.config import Config
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_model
from hattn.registry import UnregisteredAttentionError, modes

MODES = list(modes())

PATTERN = ["linear", "full", "linear", "linear", "full"]


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_matches_eager_with_expected_splits(mode):
    model = toy_model(pattern=PATTERN)
    be = backend(mode=mode, inner_compiler="eager")
    compiled = torch.compile(model, backend=be)
    for n in (7, 13, 5):  # the second shape makes Dynamo recompile once with a dynamic token count
        torch.testing.assert_close(compiled(_ids(n, n)), model(_ids(n, n)), rtol=1e-5, atol=1e-5)
    s = be.stats
    assert be.graph_stats[0].graphs_compiled == 1  # no Dynamo graph break
    assert be.graph_stats[0].split_ops == len(PATTERN)
    assert be.graph_stats[0].pieces == len(PATTERN) + 1
    assert s.eager_runs == 3 and s.cuda_graphs == 0  # CPU: graph-free


def test_entry_point_string_backend_with_inductor_pieces():
    model = toy_model(pattern=["linear", "full"])
    compiled = torch.compile(model, backend="hattn", mode="eager")  # inner_compiler: inductor by default
    torch.testing.assert_close(compiled(_ids(9)), model(_ids(9)), rtol=1e-4, atol=1e-4)


def test_entry_point_accepts_options_with_mode():
    model = toy_model(pattern=["full", "linear"])
    compiled = torch.compile(model, backend="hattn", options={"mode": "bcg", "inner_compiler": "eager"})
    torch.testing.assert_close(compiled(_ids(6)), model(_ids(6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [m for m in MODES if modes()[m].graphs])
def test_a_call_that_asks_for_gradients_runs_for_inference_and_a_backward_names_the_fix(mode):
    """In a graph mode (graph-free on CPU, as on a GPU above the capture sizes), called with grad mode on and a
    trainable part (an adapter's weight on a frozen model), the graph compiles and runs for inference (its trainable
    linears fused, as under no_grad), its output requires grad as eager's does and may be written in place, and any
    backward through it raises, also where the loss has other parameters. Mode eager keeps autograd."""
    from hattn.compiler.dispatch import Dispatch

    torch.manual_seed(0)
    model = toy_model(pattern=["linear", "full"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    be = backend(mode=mode, inner_compiler="eager")
    call, other = Dispatch(torch.compile(model, backend=be)), nn.Parameter(torch.ones(()))
    for seed in (0, 1):  # through Dynamo, then served by the dispatcher
        out = call(_ids(5, seed))
        torch.testing.assert_close(out, model(_ids(5, seed)), rtol=1e-5, atol=1e-5)
        assert out.requires_grad
        out[0] = 0
        with pytest.raises(RuntimeError, match="compiles for inference.*Call it under torch.inference_mode"):
            (out.sum() + other).backward()
        assert model.lm_head.weight.grad is None
    assert call.direct_calls == 1 and be.stats.fused_linears > 0
    with torch.no_grad():
        assert not call(_ids(5, 2)).requires_grad


class _Blocked(nn.Module):
    """The toy model behind a `torch.no_grad()` block (Dynamo records it as two grad-mode switches); with `extra`, a
    second output computed from that input alone."""

    def __init__(self):
        super().__init__()
        self.a = toy_model(pattern=["linear", "full"])

    def forward(self, ids, extra=None):
        with torch.no_grad():
            ids = ids.clamp(0, 127)
        return self.a(ids) if extra is None else (self.a(ids), extra * 2)


def test_a_graph_mode_runs_without_autograd_whatever_its_parameters_and_blocks_say():
    """Served by the dispatcher with one graph: parameters unfrozen after the kind was learned frozen, or another
    one unfrozen instead, still give an output whose backward raises (on a GPU a replay's output would need no grad:
    the loss's gradients would lack the model's, silently); a no_grad block in the forward leaves no autograd graph
    behind the output (its closing switch turned autograd on for the rest of the graph, and every decode step's
    cache writes chained onto the last); an output computed from no parameter needs no grad, as eager's."""
    from hattn.compiler.dispatch import Dispatch

    torch.manual_seed(0)
    model = _Blocked()
    be = backend(mode="pcg", inner_compiler="eager")
    call = Dispatch(torch.compile(model, backend=be))
    for trainable in (None, model.a.lm_head.weight, model.a.norm.weight):  # learned frozen, then unfrozen
        model.requires_grad_(False)
        if trainable is not None:
            trainable.requires_grad_(True)
        for seed in (0, 1):  # through Dynamo (the dispatcher forgets its kinds), then served directly
            logits = call(_ids(5, seed))
            torch.testing.assert_close(logits, model(_ids(5, seed)), rtol=1e-5, atol=1e-5)
            assert logits.requires_grad == (trainable is not None)
            if trainable is not None:
                assert {type(f).__name__ for f, _ in logits.grad_fn.next_functions if f} == {"AccumulateGrad"}
                with pytest.raises(RuntimeError, match="compiles for inference"):
                    logits.sum().backward()
    assert call.direct_calls == 3 and be.stats.fused_linears > 0
    logits, aside = torch.compile(model, backend=backend(mode="pcg", inner_compiler="eager"))(_ids(5), torch.ones(3))
    assert logits.requires_grad and not aside.requires_grad


class _ScaledOutputs(nn.Module):
    """A split op over a product with a parameter; outputs: the op's result as complex, a view of it, its argmax."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = torch.ops.hattn_test.scale(x @ self.w, 2.0)
        return torch.view_as_complex(y.reshape(-1, 2, 2)), y, y[:, :2], y.argmax(-1)


def test_a_graph_mode_in_grad_mode_wraps_complex_outputs_keeps_aliases_and_compiles_for_inference(monkeypatch):
    """With grad mode on and a trainable parameter: a complex output requires grad as eager's (its backward raises,
    so a loss over it never silently leaves the parameter out), an integer one does not; outputs that alias each
    other in eager still do (a write to one shows in the other: not copies); and the split graph is built under
    no_grad (pieces compiled for training would save activations, inside graph pools too)."""
    import hattn.runtime

    seen, build = [], hattn.runtime.build_runtime

    def recording(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return build(*args, **kwargs)

    monkeypatch.setattr(hattn.runtime, "build_runtime", recording)
    torch.manual_seed(0)
    model, x = _ScaledOutputs(), torch.randn(3, 4)
    want = model(x)
    out = torch.compile(model, backend=backend(mode="pcg", inner_compiler="eager"))(x)
    for got, exp in zip(out, want, strict=True):
        torch.testing.assert_close(got, exp)
        assert got.requires_grad == exp.requires_grad
    cplx, y, head, _ = out
    assert seen == [False] and cplx.requires_grad and not out[3].requires_grad
    with torch.no_grad():
        y[0, 0] = 123.0
    assert head[0, 0].item() == 123.0 and cplx[0, 0].real.item() == 123.0
    with pytest.raises(RuntimeError, match="compiles for inference"):
        cplx.abs().sum().backward()
    assert model.w.grad is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "fast"}, "unknown hattn mode 'fast'; valid modes: eager, pcg, bcg, full"),
        ({"mode": "inductor"}, "'inductor' is a piece compiler, not a mode: use mode='eager'"),
        ({"mode": "pcg", "capture_size": [1]}, r"unknown hattn option\(s\) \['capture_size'\]"),
        ({"mode": "pcg", "inner_compiler": "tvm"}, "unknown inner_compiler 'tvm'"),
        ({"mode": "pcg", "capture_sizes": [0, 4]}, "capture_sizes must be a non-empty list of positive ints"),
        ({"mode": "pcg", "capture_sizes": 8}, "capture_sizes must be a non-empty list of positive ints, got 8"),
        ({"mode": "pcg", "fuse_linears": "no"}, "fuse_linears must be True or False, got 'no'"),
        ({"mode": "pcg", "progress": 0}, "progress must be True or False, got 0"),
        ({"mode": "pcg", "small_m_gemm": None}, "small_m_gemm must be True or False, got None"),
        ({"mode": "pcg", "gated_mlp": "yes"}, "gated_mlp must be True or False, got 'yes'"),
    ],
)
def test_bad_mode_or_option_is_a_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Config.from_options(kwargs.pop("mode"), kwargs)


def test_bad_mode_through_torch_compile():
    compiled = torch.compile(toy_model(), backend="hattn", mode="fast")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="valid modes: eager, pcg, bcg, full"):
        compiled(_ids(4))


def test_unregistered_sdpa_is_rejected_with_node_line_and_fix(sdpa_mixer):
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["linear", "sdpa"]), mixers={"sdpa": sdpa_mixer}).eval()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as err:
        torch.compile(model, backend=backend(mode="bcg", inner_compiler="eager"))(_ids(5))
    assert isinstance(err.value.inner_exception, UnregisteredAttentionError)
    msg = str(err.value.inner_exception)
    assert "scaled_dot_product_attention" in msg and "not a registered hattn split op" in msg
    assert "conftest.py" in msg and "F.scaled_dot_product_attention(q, k, v" in msg  # source line
    assert "register_split_op" in msg and "hattn.compile(model)" in msg  # the fixes


@torch.library.custom_op("hattn_test::mamba_mixer", mutates_args=())
def mamba_mixer(x: torch.Tensor, decay: float) -> torch.Tensor:
    """A toy causal SSM-like mixer: y_t = x_t + decay * y_{t-1}."""
    out, h = torch.empty_like(x), torch.zeros_like(x[0])
    for t in range(x.shape[0]):
        h = x[t] + decay * h
        out[t] = h
    return out


@mamba_mixer.register_fake
def _(x, decay):
    return torch.empty_like(x)


class MambaMixer(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x):
        return self.proj(torch.ops.hattn_test.mamba_mixer(x, 0.9))


def test_user_registered_mamba_op_splits_too():
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["mamba", "full", "mamba"]), mixers={"mamba": MambaMixer}).eval()
    # unregistered, its name says it is a mixer: rejected
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="custom op hattn_test::mamba_mixer"):
        torch.compile(model, backend=backend(mode="pcg", inner_compiler="eager"))(_ids(6))
    torch._dynamo.reset()
    hattn.register_split_op(torch.ops.hattn_test.mamba_mixer, "mamba")
    try:
        be = backend(mode="pcg", inner_compiler="eager")
        torch.testing.assert_close(torch.compile(model, backend=be)(_ids(6)), model(_ids(6)))
        assert be.stats.split_ops == 3 and be.stats.pieces == 4
    finally:
        hattn.unregister_split_op(torch.ops.hattn_test.mamba_mixer)


class _Branching(nn.Module):
    """torch.cond between two split ops: its branches are submodules of the Dynamo graph (get_attr nodes)."""

    def forward(self, x):
        y = torch.ops.hattn_test.scale(x, 2.0)
        y = torch.cond(y.sum() > 0, lambda t: t.sin() * 2, lambda t: t.cos(), (y,))
        return torch.ops.hattn_test.scale(y, 0.5)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_a_piece_with_torch_cond_compiles_its_branches_itself(inner):
    """The branches are read by the piece that calls cond, not passed to it (inductor takes tensors only: before,
    "all flat_args must be KNOWN_TYPES")."""
    be = backend(mode="eager", inner_compiler=inner, progress=False)
    model, x = _Branching(), torch.randn(6, 4)
    compiled = torch.compile(model, backend=be)
    for sign in (1, -1):
        torch.testing.assert_close(compiled(sign * x.abs()), model(sign * x.abs()))
    assert (be.stats.pieces, be.stats.split_ops) == (1, 2)


def test_graph_break_gives_several_graphs_each_split():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = toy_model(pattern=["linear", "full"]), toy_model(seed=1, pattern=["full"])

        def forward(self, ids):
            x = self.a(ids)
            torch._dynamo.graph_break()
            return self.b(x.argmax(-1))

    model = Broken().eval()
    be = backend(mode="pcg", inner_compiler="eager")
    torch.testing.assert_close(torch.compile(model, backend=be)(_ids(8)), model(_ids(8)))
    assert be.stats.graphs_compiled == 2 and be.stats.split_ops == 3


@pytest.mark.parametrize("ints_for_symints", [False, True])
def test_inductor_pieces_keep_a_marked_dynamic_token_count_with_static_example_inputs(monkeypatch, ints_for_symints):
    """torch 2.11 on CUDA gives the backend the token count's SymInt placeholder as a plain int (and fakes may come
    back static); the pieces' fake run then guarded the token count to a constant and Dynamo rejected every
    mark_dynamic'd batch. Forced here on CPU for any torch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from_tensor = FakeTensorMode.from_tensor

    def static_from_tensor(self, t, *, static_shapes=None, source=None, symbolic_context=None, trace=True):
        if getattr(self, "_hattn_test_backend_mode", False):
            return from_tensor(self, t, static_shapes=True)
        return from_tensor(self, t, static_shapes=static_shapes, source=source, symbolic_context=symbolic_context,
                           trace=trace)

    model = toy_model(pattern=["linear", "full"])
    be = backend(mode="eager", inner_compiler="inductor")
    compile_graph = hattn.compiler.backend.compile_graph

    def marking_compile_graph(gm, example_inputs, config, stats, **kwargs):
        from torch._guards import detect_fake_mode

        detect_fake_mode(example_inputs)._hattn_test_backend_mode = True
        if ints_for_symints:
            example_inputs = [x.node.hint if isinstance(x, torch.SymInt) else x for x in example_inputs]
        return compile_graph(gm, example_inputs, config, stats, **kwargs)

    monkeypatch.setattr(FakeTensorMode, "from_tensor", static_from_tensor)
    monkeypatch.setattr(hattn.compiler.backend, "compile_graph", marking_compile_graph)
    compiled = torch.compile(model, backend=be)
    for n in (6, 9):
        ids = _ids(n, n)
        torch._dynamo.mark_dynamic(ids, 0)
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert be.stats.graphs_compiled == 1  # one graph serves both token counts


@pytest.mark.parametrize("mode", ["eager", "pcg"])
def test_split_ops_run_their_direct_implementation_without_the_dispatcher(monkeypatch, mode):
    """eager and pcg call each split op's registered implementation directly (no ~50 us dispatch)."""
    from hattn import registry

    entry = registry.split_op_of(torch.ops.hattn.linear_attention)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("layer_id", args[6] if len(args) > 6 else None))
        return entry.direct(*args, **kwargs)

    monkeypatch.setitem(registry._OPS, entry.name, dataclasses.replace(entry, direct=spy))
    model = toy_model(pattern=["linear", "full", "linear"])
    compiled = torch.compile(model, backend=backend(mode=mode, inner_compiler="eager"))
    torch.testing.assert_close(compiled(_ids(7)), model(_ids(7)), rtol=1e-5, atol=1e-5)
    assert calls == [0, 2]  # the compiled run only: the eager model goes through the dispatcher


@pytest.mark.parametrize("device, dynamic, combo", [("cpu", False, False), ("cuda", False, True),
                                                   ("cuda", True, False)])
def test_static_pieces_on_cuda_compile_with_combo_kernels(monkeypatch, device, dynamic, combo):
    """Inductor's horizontal fusion of a piece's independent kernels is on for CUDA pieces of static shapes (the
    one-token decode graph: fewer launches, measured on the H100); pieces dynamic in the token count also serve
    prefill, where it measured slower, and CPU pieces are left as the user has them. Checked by the setting
    compile_fx sees."""
    from torch._inductor import compile_fx as inductor_compile
    from torch._inductor import config as inductor_config
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from hattn.compiler import backend as backend_module

    seen = []
    monkeypatch.setattr(inductor_compile, "compile_fx", lambda gm, args: seen.append(inductor_config.combo_kernels))
    gm = torch.fx.symbolic_trace(lambda x: x.sin() + x.cos())
    mode = FakeTensorMode(shape_env=ShapeEnv())
    rows = mode.from_tensor(torch.empty(4, 8), static_shapes=not dynamic).shape[0]  # a SymInt where dynamic
    with mode:
        x = torch.empty(rows, 8, device=device)
    backend_module._compile_piece(gm, [x])
    assert isinstance(x.shape[0], torch.SymInt) == dynamic
    assert seen == [combo] and inductor_config.combo_kernels is False  # restored after the piece
