"""Kind "kda": Kimi delta attention (Kimi-Linear, Ling/Ring "bailing" hybrids), `hattn::kda_attention`: causal
conv1d (silu) + a delta rule with per-channel decay, its conv and fp32 recurrent states in each sequence's cache
slot. Kernels: torch, in `hattn/kernels/kda/` and `hattn/kernels/conv1d/`: a decode step is a few batched ops over
every sequence's slot; a prefill runs each sequence in chunks of 64 tokens (host loops; not capture-safe: pcg and
bcg run it between graphs, full refuses it).
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import LayerSpec, decode_states, op_context, sequence_states, zero_padding
from hattn.kernels.conv1d.reference import causal_conv1d, causal_conv1d_step
from hattn.kernels.kda.reference import chunked_kda, kda_step
from hattn.ops.linear import cache_spec as _conv_and_state_spec


def cache_spec(conv_dim: int, kernel: int, heads: int, head_dim: int) -> LayerSpec:
    """Conv state [conv_dim, kernel-1] + recurrent state [heads, head_dim, head_dim] fp32 per slot."""
    return _conv_and_state_spec(conv_dim, kernel, heads, head_dim, head_dim, kind="kda")


def _kda_attention(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
) -> None:
    """mixed_qkv: [T, 3*H*D] (q, k, v before the conv); conv_weight: [3*H*D, W]; g: [T, H, D]; beta: [T, H];
    out: [T, H, D]."""
    ctx = op_context("kda", layer_id, mixed_qkv.shape[0])
    h, d = out.shape[1:]
    step = decode_states(ctx, layer_id, mixed_qkv.device)
    if step is not None:  # one token of every sequence, batched
        (conv_state, state), n, slots, started = step
        x = causal_conv1d_step(mixed_qkv[:n], conv_weight, conv_bias, conv_state, slots, started)
        q, k, v = (y.reshape(-1, h, d) for y in x.chunk(3, dim=-1))
        out[:n] = kda_step(q, k, v, g[:n], beta[:n], state, slots, started)
        zero_padding(out, n)
        return

    def fresh():
        conv = mixed_qkv.new_zeros(mixed_qkv.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        return conv, mixed_qkv.new_zeros(h, d, d, dtype=torch.float32)

    for rows, (conv_state, state) in sequence_states(ctx, layer_id, fresh):
        x = causal_conv1d(mixed_qkv[rows], conv_weight, conv_bias, conv_state)
        q, k, v = (y.reshape(-1, h, d) for y in x.chunk(3, dim=-1))
        out[rows] = chunked_kda(q, k, v, g[rows], beta[rows], state)
    zero_padding(out, ctx.num_tokens)


kda_attention = torch.library.custom_op("hattn::kda_attention", mutates_args=("out",))(_kda_attention)


@kda_attention.register_fake
def _(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id) -> None:
    return None


registry.register_split_op(kda_attention, "kda", direct=_kda_attention)
