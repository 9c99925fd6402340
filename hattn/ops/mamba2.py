"""Kind "mamba2": the Mamba2 mixer core (Nemotron-H, Granite 4.0-H, Bamba), `hattn::mamba2_mixer`: causal conv1d
(silu) over x|B|C, then the selective state-space recurrence with the D skip; conv and fp32 SSM states [H, P, N] in
each sequence's cache slot. dt (softplus, clamp), the gated group norm and the projections stay outside the op.
Kernels: torch, in `hattn/kernels/mamba2/` and `hattn/kernels/conv1d/`: a decode step is a few batched ops over
every sequence (states gathered from and written to their slots); a prefill runs each sequence's scan in chunks of
64 tokens. Not capture-safe (a prefill loops over sequences on the host): pcg and bcg run it between graphs, full
refuses it.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import LayerSpec, decode_states, op_context, sequence_states, zero_padding
from hattn.kernels.conv1d.reference import causal_conv1d, causal_conv1d_step
from hattn.kernels.mamba2.reference import chunked_ssd, ssd_step


def cache_spec(heads: int, head_dim: int, n_groups: int, state_size: int, kernel: int) -> LayerSpec:
    """Conv state [H*P + 2*G*N, kernel-1] + SSM state [H, P, N] fp32 per slot."""
    conv_dim = heads * head_dim + 2 * n_groups * state_size
    return LayerSpec("mamba2", states=(((conv_dim, kernel - 1), None), ((heads, head_dim, state_size), torch.float32)))


def _mamba2_mixer(
    xbc: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    n_groups: int,
    state_size: int,
) -> None:
    """xbc: [T, H*P + 2*G*N] (before the conv); dt: [T, H] (after softplus); a (= -exp(A_log)), d: [H];
    out: [T, H, P]."""
    ctx = op_context("mamba2", layer_id, xbc.shape[0])
    h, p = out.shape[1:]
    step = decode_states(ctx, layer_id, xbc.device)
    if step is not None:
        _decode(xbc, conv_weight, conv_bias, dt, a, d, out, n_groups, state_size, step)
        return

    def fresh():
        conv = xbc.new_zeros(xbc.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        return conv, xbc.new_zeros(h, p, state_size, dtype=torch.float32)

    for rows, (conv_state, state) in sequence_states(ctx, layer_id, fresh):
        x, b, c = _split(causal_conv1d(xbc[rows], conv_weight, conv_bias, conv_state), h, p, n_groups, state_size)
        out[rows] = chunked_ssd(x, dt[rows], a, b, c, d, state)
    zero_padding(out, ctx.num_tokens)


def _decode(xbc, conv_weight, conv_bias, dt, a, d, out, n_groups, state_size, step) -> None:
    """One token of every sequence (`decode_states`' step): the conv and the scan batched over them."""
    (conv_state, ssm_state), n, slots, started = step
    h, p = out.shape[1:]
    y = causal_conv1d_step(xbc[:n], conv_weight, conv_bias, conv_state, slots, started)
    x, b, c = _split(y, h, p, n_groups, state_size)
    out[:n] = ssd_step(x, dt[:n], a, b, c, d, ssm_state, slots, started)
    zero_padding(out, n)


def _split(y, h: int, p: int, n_groups: int, state_size: int):
    """The conv's output [T, H*P + 2*G*N] as x [T, H, P] and B, C [T, H, N] (each group's shared by its heads)."""
    x, b, c = y.split([h * p, n_groups * state_size, n_groups * state_size], dim=-1)
    b, c = (z.reshape(-1, n_groups, state_size).repeat_interleave(h // n_groups, dim=1) for z in (b, c))
    return x.reshape(-1, h, p), b, c


mamba2_mixer = torch.library.custom_op("hattn::mamba2_mixer", mutates_args=("out",))(_mamba2_mixer)


@mamba2_mixer.register_fake
def _(xbc, conv_weight, conv_bias, dt, a, d, out, layer_id, n_groups, state_size) -> None:
    return None


registry.register_split_op(mamba2_mixer, "mamba2", direct=_mamba2_mixer, strided_inputs=True)
