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
