"""Kind "short_conv": a gated short convolution's core (LFM2), `hattn::short_conv`: the causal depthwise conv1d
over each sequence, no activation, continuing from the conv state [C, kernel-1] in its cache slot. The gates
(B * x before, C * y after) and the projections stay outside the op. Kernels: torch, in `hattn/kernels/conv1d/`: a
decode step is one batched window over every sequence's slot; a prefill loops over sequences on the host (not
capture-safe: pcg and bcg run it between graphs, full refuses it).
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import LayerSpec, decode_states, op_context, sequence_states, zero_padding
from hattn.kernels.conv1d.reference import causal_conv1d, causal_conv1d_step


def cache_spec(channels: int, kernel: int) -> LayerSpec:
    """The conv state [channels, kernel-1] per slot (model dtype)."""
    return LayerSpec("short_conv", states=(((channels, kernel - 1), None),))


def _short_conv(x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, out: torch.Tensor,
                layer_id: int) -> None:
    """x, out: [T, C]; conv_weight: [C, kernel]; conv_bias: [C] or None."""
    ctx = op_context("short_conv", layer_id, x.shape[0])
    step = decode_states(ctx, layer_id, x.device)
    if step is not None:  # one token of every sequence, batched
        (conv_state,), n, slots, started = step
        out[:n] = causal_conv1d_step(x[:n], conv_weight, conv_bias, conv_state, slots, started, activation=None)
        zero_padding(out, n)
        return

    def fresh():
        return (x.new_zeros(x.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype),)

    for rows, (state,) in sequence_states(ctx, layer_id, fresh):
        out[rows] = causal_conv1d(x[rows], conv_weight, conv_bias, state, activation=None)
    zero_padding(out, ctx.num_tokens)


short_conv = torch.library.custom_op("hattn::short_conv", mutates_args=("out",))(_short_conv)


@short_conv.register_fake
def _(x, conv_weight, conv_bias, out, layer_id) -> None:
    return None


registry.register_split_op(short_conv, "short_conv", direct=_short_conv, strided_inputs=True)
