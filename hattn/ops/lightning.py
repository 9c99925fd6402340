"""Kind "lightning": MiniMax's lightning attention, `hattn::lightning_attention`: linear attention with a fixed
per-head exponential decay, S <- exp(-slope) S + k^T v, o = q S; the fp32 state [H, D, D] in each sequence's cache
slot. Kernels: torch, in `hattn/kernels/lightning/`: a decode step is a few batched ops over every sequence's slot;
a prefill runs each sequence in chunks of 64 tokens (a host loop over sequences: not capture-safe).
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import LayerSpec, decode_states, op_context, sequence_states, zero_padding
from hattn.kernels.lightning.reference import chunked_lightning, lightning_step


def cache_spec(heads: int, head_dim: int) -> LayerSpec:
    """The fp32 state [heads, head_dim, head_dim] per slot."""
    return LayerSpec("lightning", states=(((heads, head_dim, head_dim), torch.float32),))


def _lightning_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, out: torch.Tensor, layer_id: int
) -> None:
    """q, k, v, out: [T, H, D]; slope: [H]."""
    ctx = op_context("lightning", layer_id, q.shape[0])
    h, d = q.shape[1:]
    step = decode_states(ctx, layer_id, q.device)
    if step is not None:  # one token of every sequence, batched
        (state,), n, slots, started = step
        out[:n] = lightning_step(q[:n], k[:n], v[:n], slope, state, slots, started)
        zero_padding(out, n)
        return

    def fresh():
        return (q.new_zeros(h, d, d, dtype=torch.float32),)

    for rows, (state,) in sequence_states(ctx, layer_id, fresh):
        out[rows] = chunked_lightning(q[rows], k[rows], v[rows], slope, state)
    zero_padding(out, ctx.num_tokens)


lightning_attention = torch.library.custom_op("hattn::lightning_attention", mutates_args=("out",))(_lightning_attention)


@lightning_attention.register_fake
def _(q, k, v, slope, out, layer_id) -> None:
    return None


registry.register_split_op(lightning_attention, "lightning", direct=_lightning_attention)
