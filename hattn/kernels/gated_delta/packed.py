"""Packed linear-attention prefill on CUDA: our Triton conv (split into q, k, v) + the gated delta rule, token by
token in one launch where every sequence is short (`recurrent.use_recurrent`), else one chunked call.

The conv is ours (`hattn.kernels.conv1d.packed.packed_conv_qkv`: packed sequences, conv states at cache slots, q
and k L2-normalised on the way out); the chunked delta rule is fla's (`chunk.chunk_gated_delta_rule_slots`) when fla
is importable, else the plain-torch reference run on the GPU sequence by sequence. Runs eagerly (outside CUDA
graphs): fla builds metadata on the host.
"""
from __future__ import annotations

from hattn.kernels.conv1d.packed import packed_causal_conv1d, packed_conv_qkv
from hattn.kernels.gated_delta.chunk import chunk_gated_delta_rule_slots, fla_chunk
from hattn.kernels.gated_delta.recurrent import packed_recurrent_gated_delta, use_recurrent
from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed
from hattn.kernels.packing import PackedBatch


def linear_attention_packed(
    mixed_qkv, conv_weight, conv_bias, g, beta, out, states, batch: PackedBatch, num_k_heads: int, head_k_dim: int,
) -> None:
    """Gated-delta-net core of the sequences of `batch` packed along T (rows == batch.num_tokens); writes `out`.

    mixed_qkv: [T, C = 2*Hk*Dk + Hv*Dv]; conv_weight: [C, W]; g, beta: [T, Hv]; out: [T, Hv, Dv];
    states: (conv_state [S, C, W-1], rec_state [S, Hv, Dk, Dv] fp32) or None (zeros, nothing kept); with states
    the batch must have slots (the conv checks it, before any state is touched).
    """
    if not batch.lens:
        return
    conv_state, rec_state = states if states is not None else (None, None)
    t, hv, dv = out.shape
    short = use_recurrent(batch)
    if short or fla_chunk() is not None:
        q, k, v = packed_conv_qkv(mixed_qkv, conv_weight, conv_bias, batch, conv_state, num_k_heads, head_k_dim)
        if short:
            packed_recurrent_gated_delta(q, k, v, g, beta, out, batch, rec_state)
        else:
            out.copy_(chunk_gated_delta_rule_slots(q, k, v.view(t, hv, dv), g, beta, batch, rec_state))
        return
    x = packed_causal_conv1d(mixed_qkv, conv_weight, conv_bias, batch, conv_state)
    key_dim = num_k_heads * head_k_dim
    q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
    q, k, v = q.view(t, num_k_heads, head_k_dim), k.view(t, num_k_heads, head_k_dim), v.view(t, hv, dv)
    out.copy_(chunk_gated_delta_rule_packed(q, k, v, g, beta, batch.cu_cpu.tolist(), rec_state, batch.slots,
                                            batch.has_state))
