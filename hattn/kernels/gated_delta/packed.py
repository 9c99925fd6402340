"""Packed linear-attention prefill on CUDA: our Triton conv (split into q, k, v) + the gated delta rule, token by
token in one launch where every sequence is short (`recurrent.use_recurrent`), else one chunked call.

The conv is ours (`hattn.kernels.conv1d.packed.packed_conv_qkv`: packed sequences, conv states at cache slots, q
and k L2-normalised on the way out); the chunked delta rule is fla's (`chunk.chunk_gated_delta_rule_slots`) when fla
is importable, else the plain-torch reference run on the GPU sequence by sequence. Which kernels run, and with which
blocks, is the batch's `PackedForm`; a padded batch (a graph's bucket) decides it by its sizes.
"""
from __future__ import annotations

from typing import NamedTuple

from hattn.kernels.conv1d.packed import conv_warps, packed_causal_conv1d, packed_conv_qkv
from hattn.kernels.gated_delta.chunk import chunk_gated_delta_rule_slots, fla_chunk
from hattn.kernels.gated_delta.recurrent import (packed_recurrent_gated_delta, recurrent_block_v, short_sequences,
                                                 use_recurrent)
from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed
from hattn.kernels.packing import PackedBatch


class PackedForm(NamedTuple):
    """The kernels of a packed step: the recurrent form (else fla's chunked one), the recurrent kernel's value
    columns a program, the conv's warps. A graph that replays a call site's steps keys on the form the exact batch
    takes (`exact_form`), so it runs what the op runs between graphs: same kernels, same blocks, same bits."""

    recurrent: bool
    block_v: int
    conv_warps: int


def exact_form(lens: list[int], v_heads: int, v_dim: int) -> PackedForm:
    """The form of an exact batch of sequences of `lens` tokens (each >= 1)."""
    return PackedForm(short_sequences(lens), recurrent_block_v(len(lens), v_heads, v_dim), conv_warps(sum(lens)))


def form_of(batch: PackedBatch, v_heads: int, v_dim: int) -> PackedForm:
    if not batch.padded:
        return exact_form(batch.lens, v_heads, v_dim)
    seqs = batch.cu.shape[0] - 1  # a bucket's sizes: they bound every step it replays
    return PackedForm(use_recurrent(batch), recurrent_block_v(seqs, v_heads, v_dim), conv_warps(batch.num_tokens))


def linear_attention_packed(
    mixed_qkv, conv_weight, conv_bias, g, beta, out, states, batch: PackedBatch, num_k_heads: int, head_k_dim: int,
    form: PackedForm | None = None, real_tokens=None,
) -> None:
    """Gated-delta-net core of the sequences of `batch` packed along T (rows == batch.num_tokens); writes `out`.

    mixed_qkv: [T, C = 2*Hk*Dk + Hv*Dv]; conv_weight: [C, W]; g, beta: [T, Hv]; out: [T, Hv, Dv];
    states: (conv_state [S, C, W-1], rec_state [S, Hv, Dk, Dv] fp32) or None (zeros, nothing kept); with states
    the batch must have slots (the conv checks it, before any state is touched). form: the kernels (None: the
    batch's own, `form_of`). real_tokens: a padded batch's real row count (device [1]): the recurrent form skips the
    rows past it (the caller zeroes them).
    """
    if not batch.lens:
        return
    conv_state, rec_state = states if states is not None else (None, None)
    t, hv, dv = out.shape
    form = form or form_of(batch, hv, dv)
    if form.recurrent or fla_chunk() is not None:
        q, k, v = packed_conv_qkv(mixed_qkv, conv_weight, conv_bias, batch, conv_state, num_k_heads, head_k_dim,
                                  form.conv_warps)
        if form.recurrent:
            packed_recurrent_gated_delta(q, k, v, g, beta, out, batch, rec_state, form.block_v, real_tokens)
        else:
            chunk_gated_delta_rule_slots(q, k, v.view(t, hv, dv), g, beta, batch, rec_state, out=out)
        return
    x = packed_causal_conv1d(mixed_qkv, conv_weight, conv_bias, batch, conv_state)
    key_dim = num_k_heads * head_k_dim
    q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
    q, k, v = q.view(t, num_k_heads, head_k_dim), k.view(t, num_k_heads, head_k_dim), v.view(t, hv, dv)
    out.copy_(chunk_gated_delta_rule_packed(q, k, v, g, beta, batch.cu_cpu.tolist(), rec_state, batch.slots,
                                            batch.has_state))
