"""Packed linear-attention prefill on CUDA: one Triton conv launch pair + one chunked gated-delta-rule call.

The conv is ours (`hattn.kernels.conv1d.packed`: packed sequences, conv states at cache slots); the chunked delta
rule is fla's (`chunk.chunk_gated_delta_rule_slots`) when fla is importable, else the plain-torch reference run on
the GPU sequence by sequence. Runs eagerly (outside CUDA graphs): it builds metadata on the host.
"""
from __future__ import annotations

import torch

from hattn.kernels.conv1d.packed import packed_causal_conv1d
from hattn.kernels.gated_delta.chunk import chunk_gated_delta_rule_slots, fla_chunk
from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed


def linear_attention_packed(
    mixed_qkv, conv_weight, conv_bias, g, beta, out, states, seq_lens: list[int], slots: list[int],
    context_lens: list[int], num_k_heads: int, head_k_dim: int,
) -> None:
    """Gated-delta-net core of sequences packed along T (rows == sum(seq_lens)); writes `out`.

    mixed_qkv: [T, C = 2*Hk*Dk + Hv*Dv]; conv_weight: [C, W]; g, beta: [T, Hv]; out: [T, Hv, Dv];
    states: (conv_state [S, C, W-1], rec_state [S, Hv, Dk, Dv] fp32) or None (zeros, nothing kept);
    seq_lens, slots, context_lens: per sequence (host); context 0 = new sequence, its slot starts from zeros.
    """
    active = [i for i, n in enumerate(seq_lens) if n]  # empty sequences: no rows, their slots untouched
    if not active:
        return
    lens = [seq_lens[i] for i in active]
    conv_state, rec_state = states if states is not None else (None, None)
    slots_t = has_t = None
    if states is not None:
        meta = torch.tensor([[slots[i] for i in active], [int(context_lens[i] > 0) for i in active]])
        slots_t, has_t = meta.to(mixed_qkv.device, non_blocking=True).unbind(0)
    x = packed_causal_conv1d(mixed_qkv, conv_weight, conv_bias, lens, conv_state, slots_t, has_t)
    t, hv, dv = out.shape
    key_dim = num_k_heads * head_k_dim
    q, k, v = x.split([key_dim, key_dim, hv * dv], dim=-1)
    q, k, v = q.view(t, num_k_heads, head_k_dim), k.view(t, num_k_heads, head_k_dim), v.view(t, hv, dv)
    if fla_chunk() is not None:
        out.copy_(chunk_gated_delta_rule_slots(q, k, v, g, beta, lens, rec_state, slots_t, has_t))
        return
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    out.copy_(chunk_gated_delta_rule_packed(q, k, v, g, beta, cu, rec_state, [slots[i] for i in active],
                                            [context_lens[i] > 0 for i in active]))
