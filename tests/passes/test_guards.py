"""The guard pass on hand-built FX graphs: attention that is not a registered split op is rejected."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import hattn
from hattn.passes.guards import UnregisteredAttentionError, check_no_unregistered_attention


@torch.library.custom_op("flash_attn_test::varlen_fwd", mutates_args=())
def varlen_fwd(q: torch.Tensor) -> torch.Tensor:
    return q.clone()


@varlen_fwd.register_fake
def _(q):
    return torch.empty_like(q)


def _graph_calling(target, nargs: int = 1) -> fx.GraphModule:
    g = fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(nargs)]
    y = g.call_function(torch.relu, (xs[0],))
    g.output(g.call_function(target, tuple([y] + xs[1:])))
    return fx.GraphModule(torch.nn.Module(), g)


@pytest.mark.parametrize(
    "target, nargs, what",
    [
        (torch.ops.aten.scaled_dot_product_attention.default, 3, "aten.scaled_dot_product_attention"),
        (torch.ops.aten._scaled_dot_product_flash_attention.default, 3, "aten._scaled_dot_product_flash_attention"),
        (torch.ops.aten._scaled_dot_product_efficient_attention, 4, "_scaled_dot_product_efficient_attention"),
        (torch._C._nn.scaled_dot_product_attention, 3, "torch scaled_dot_product_attention"),
        (torch.ops.flash_attn_test.varlen_fwd, 1, "custom op flash_attn_test::varlen_fwd"),
    ],
)
def test_attention_not_registered_is_rejected(target, nargs, what):
    with pytest.raises(UnregisteredAttentionError, match="not a registered hattn split op") as err:
        check_no_unregistered_attention(_graph_calling(target, nargs))
    assert what in str(err.value) and "register_split_op" in str(err.value)


def test_registered_custom_op_and_plain_ops_pass():
    check_no_unregistered_attention(_graph_calling(torch.sin))
    hattn.register_split_op(torch.ops.flash_attn_test.varlen_fwd, "full")
    try:
        check_no_unregistered_attention(_graph_calling(torch.ops.flash_attn_test.varlen_fwd))
    finally:
        hattn.unregister_split_op(torch.ops.flash_attn_test.varlen_fwd)


@torch.library.custom_op("mylib_test::decay_scan", mutates_args=())
def decay_scan(x: torch.Tensor) -> torch.Tensor:
    return x.cumsum(0)


@decay_scan.register_fake
def _(x):
    return torch.empty_like(x)


@pytest.mark.parametrize("name", ["token_mixer", "causal_conv1d_fwd", "selective_state_update", "ssd_combined",
                                  "reshape_and_cache", "store_kvcache", "kv_cache_write", "lstm", "rglru",
                                  "mlstm_chunk", "rnn_step"])
def test_mixer_names_the_rule_knows(name):
    """Batch-dependent kernels of the field by their usual names (vLLM's and mamba's among them): unregistered,
    each is refused; names that merely contain such letters are not."""
    from hattn.registry import MIXER_NAME

    assert MIXER_NAME.search(name)
    assert not any(MIXER_NAME.search(n) for n in ("hornet_gemm", "fused_rms_norm", "grouped_mm_fallback",
                                                   "swiglu", "rotary_embedding"))


def test_a_recurrent_scan_by_a_name_without_attention_in_it_is_rejected():
    """README's own example of a mixer kernel (`decay_scan`), unregistered: the name rule catches scans, retention,
    RWKV, HGRN, GLA/KDA and the like, not only 'attention'."""
    with pytest.raises(UnregisteredAttentionError, match="custom op mylib_test::decay_scan"):
        check_no_unregistered_attention(_graph_calling(torch.ops.mylib_test.decay_scan))


def _compiled_calls(model, x):
    torch._dynamo.reset()
    be = hattn.backend(mode="pcg", inner_compiler="eager", progress=False)
    with torch.no_grad(), hattn.forward_context(hattn.ForwardContext(seq_lens=[x.shape[0]])):
        return torch.compile(model, backend=be)(x)


class _InCheckpoint(torch.nn.Module):
    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(lambda y: torch.ops.hattn_test.scale(y, 2.0).sin(), x, use_reentrant=False) * 2


class _InCond(torch.nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > -1e9, lambda y: torch.ops.hattn_test.scale(y, 2.0) + 1,
                          lambda y: torch.ops.hattn_test.scale(y, 3.0) - 1, (x,)) * 2


@pytest.mark.parametrize("model", [_InCheckpoint, _InCond], ids=["checkpoint", "cond"])
def test_a_split_op_inside_a_higher_order_op_is_refused(model):
    """The graph is split at top-level calls only: a split op in checkpoint's or cond's body would run inside a
    piece (captured with it in a CUDA graph)."""
    with pytest.raises(Exception, match="the body of a higher-order op") as err:
        _compiled_calls(model(), torch.randn(5, 4))
    assert "split op hattn_test::scale" in str(err.value)


@torch.library.custom_op("hattn_guard_test::mix", mutates_args=())
def _mix(x: torch.Tensor, layer_id: int) -> torch.Tensor:
    return x.cumsum(0)


@_mix.register_fake
def _(x, layer_id):
    return torch.empty_like(x)


class _InBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block, self.lin = block, torch.nn.Linear(4, 4)

    def forward(self, x):
        with self.block():
            y = torch.ops.hattn_guard_test.mix(self.lin(x), 0)
        with torch.no_grad():  # grad mode is a plain call in the graph: it splits fine
            y = torch.ops.hattn_guard_test.mix(y, 1)
        return y + 1


class _AfterBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):  # closed before the split op
            x = self.lin(x)
        return torch.ops.hattn_guard_test.mix(x, 0) + 1


def test_a_split_op_after_a_closed_autocast_block_is_served():
    hattn.register_split_op(torch.ops.hattn_guard_test.mix, "guard_mix")
    try:
        torch._dynamo.reset()
        model, x = _AfterBlock(), torch.randn(5, 4)
        compiled = torch.compile(model, backend=hattn.backend(mode="pcg", inner_compiler="eager", progress=False))
        torch.testing.assert_close(compiled(x), model(x))
    finally:
        hattn.unregister_split_op(torch.ops.hattn_guard_test.mix)


@pytest.mark.parametrize("block", [lambda: torch.autocast("cpu", enabled=False), torch.inference_mode],
                         ids=["autocast", "inference_mode"])
def test_a_split_op_inside_an_autocast_or_inference_mode_block_is_refused(block):
    """Such a block would span two pieces (its context object crossing the boundary: inductor's compile failed deep
    inside torch, and a failed inference_mode block left the process unable to build an nn.Linear): a clear error
    before anything compiles, naming the op and the fix; the process stays usable."""
    from hattn.passes.guards import SplitOpInContextError

    hattn.register_split_op(torch.ops.hattn_guard_test.mix, "guard_mix")
    try:
        torch._dynamo.reset()
        be = hattn.backend(mode="pcg", progress=False)
        with pytest.raises(Exception, match="hattn_guard_test::mix .* inside a `with` block") as err:
            torch.compile(_InBlock(block), backend=be)(torch.randn(5, 4))
        assert "move the split-op call out of the block" in str(err.value)
        assert isinstance(getattr(err.value, "inner_exception", err.value), SplitOpInContextError), repr(err.value)
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
        assert be.stats.graphs_compiled == 0
    finally:
        hattn.unregister_split_op(torch.ops.hattn_guard_test.mix)


@torch.library.custom_op("hattn_test::blend", mutates_args=())
def blend(x: torch.Tensor) -> torch.Tensor:
    """Mixes tokens (a cumulative sum over them), by a name the mixer rule does not know."""
    return x.cumsum(0)


@blend.register_fake
def _(x):
    return torch.empty_like(x)


class _Blended(torch.nn.Module):
    def __init__(self, op, in_cond: bool = False):
        super().__init__()
        self.op, self.in_cond = op, in_cond

    def forward(self, x):
        if self.in_cond:  # the op in a higher-order op's body
            return torch.cond(x.sum() > 0, lambda y: self.op(y.sin()), lambda y: y - 1, (x,)).cos()
        return self.op(x.sin()).cos()


@pytest.fixture
def compiled_with():
    """compiled_with(op, mode) -> a torch.compile'd model calling `op` once; registrations made in a test undone."""
    from hattn.compiler.backend import backend

    before = {op.name: op for op in hattn.registry.split_ops()}
    yield lambda op, mode="eager", in_cond=False: torch.compile(_Blended(op, in_cond),
                                                                 backend=backend(mode=mode, progress=False))
    for name in {op.name for op in hattn.registry.split_ops()} - set(before):
        hattn.unregister_split_op(name)
    for op in before.values():
        hattn.unregister_split_op(op.packet)
        hattn.register_split_op(op.packet, op.kind, capture_safe=op.capture_safe, direct=op.direct,
                                prepare=op.prepare, strided_inputs=op.strided_inputs)
    torch._dynamo.reset()


@pytest.mark.parametrize("in_cond", [False, True], ids=["top level", "in a torch.cond branch"])
def test_an_op_registered_as_a_split_op_after_compile_stops_the_graph(compiled_with, in_cond):
    """The graph runs blend inside a piece; once blend is a split op that is wrong (captured, it would replay the
    batch of capture): the next call is an error naming the op and the fix, and a new compile splits there (or,
    for a split op in a cond branch, refuses)."""
    from hattn.passes.guards import RegisteredAfterCompile

    torch._dynamo.reset()
    x = torch.randn(5, 4)
    model = compiled_with(torch.ops.hattn_test.blend, in_cond=in_cond)
    torch.testing.assert_close(model(x), model._orig_mod(x))
    hattn.register_split_op("hattn_test::scale", "testmix")  # another op's registration changes nothing here
    torch.testing.assert_close(model(x), model._orig_mod(x))
    hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix")
    with pytest.raises(RegisteredAfterCompile, match=r"hattn_test::blend was registered as a split op \(kind "
                                                     r"'blendmix'\) after this graph was compiled.*_dynamo.reset"):
        model(x)
    torch._dynamo.reset()
    if in_cond:
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="body of a higher-order op"):
            model(x)
    else:
        torch.testing.assert_close(model(x), model._orig_mod(x))


@pytest.mark.parametrize("mode", ["full", "pcg"])
def test_a_split_op_made_not_capture_safe_after_a_full_graph_captured_it(compiled_with, mode):
    """Mode full captures capture-safe split ops: its graph stops; pcg runs split ops outside its graphs whatever
    the flag says: its graph goes on."""
    from hattn.passes.guards import RegisteredAfterCompile

    torch._dynamo.reset()
    hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix", capture_safe=True)
    x = torch.randn(5, 4)
    model = compiled_with(torch.ops.hattn_test.blend, mode=mode)
    with hattn.forward_context(hattn.ForwardContext(seq_lens=[5])):
        torch.testing.assert_close(model(x), model._orig_mod(x))
        hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix", capture_safe=True)  # the same: fine
        model(x)
        hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix")
        if mode == "pcg":
            torch.testing.assert_close(model(x), model._orig_mod(x))
            return
        with pytest.raises(RegisteredAfterCompile, match="capture_safe=False after this graph was compiled relying "
                                                         "on it .captured in mode full"):
            model(x)


def test_a_split_op_that_no_longer_takes_strided_inputs_stops_a_graph_that_fused_its_input(compiled_with):
    """Compiled while blend took strided inputs, its input may be a column slice of a fused GEMM: registered again
    without the flag, the graph is an error (a new compile keeps its input contiguous)."""
    from hattn.passes.guards import RegisteredAfterCompile

    torch._dynamo.reset()
    hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix", strided_inputs=True)
    model, x = compiled_with(torch.ops.hattn_test.blend), torch.randn(5, 4)
    model(x)
    hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix", capture_safe=True, strided_inputs=True)
    model(x)  # capture_safe gained, nothing lost
    hattn.register_split_op(torch.ops.hattn_test.blend, "blendmix")
    with pytest.raises(RegisteredAfterCompile, match="strided_inputs=False after this graph was compiled"):
        model(x)
    hattn.unregister_split_op(torch.ops.hattn_test.blend)  # the graph runs it between pieces, as compiled: no error
    torch.testing.assert_close(model(x), model._orig_mod(x))  # (before, an AttributeError on the missing entry)
