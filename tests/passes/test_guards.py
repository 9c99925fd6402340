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
