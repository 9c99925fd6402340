"""The gated-delta-net decode step (one token per sequence), capture-safe: Triton on CUDA, the torch reference
elsewhere or for head dims its tiles cannot take (not a power of two >= 16).

Batch metadata comes as device tensors (slots, context lengths), so the step can be captured in a CUDA graph and
replayed for every later step; states are read and written in place at their slots.
"""
from __future__ import annotations

from hattn.kernels.gated_delta.reference import linear_attention_decode_reference
from hattn.kernels.launch import pow2_dims, use_triton, warn_reference


def gated_delta_triton(head_k_dim: int, head_v_dim: int) -> bool:
    """Whether the Triton/fla gated-delta kernels serve these head dims (else the torch reference, logged once)."""
    if pow2_dims(head_k_dim, head_v_dim):
        return True
    warn_reference("gated delta rule", (head_k_dim, head_v_dim))
    return False


def linear_attention_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                            num_k_heads: int, head_k_dim: int, context_lens=None, eager: bool = False) -> None:
    """One gated-delta-net step per sequence: conv-state update + silu + delta rule, states updated in place.

    mixed_qkv: [B, C]; conv_weight: [C, W]; g, beta: [B, Hv]; out: [B, Hv, Dv];
    conv_state: [S, C, W-1]; rec_state: [S, Hv, Dk, Dv] fp32; slots: [B] int64 (device);
    context_lens: [B] int (device) or None; a 0 marks a new sequence, whose slot's states start from zeros.
    conv_state = rec_state = slots = None: no cache (zero states, nothing written).
    eager: the step runs outside a CUDA graph (pcg, bcg, graph-free), where each launch costs more host time than
    a small batch's device time: the fused single launch rather than the staged two (`fused_decode.default_config`).
    """
    if use_triton(mixed_qkv) and gated_delta_triton(head_k_dim, out.shape[-1]):
        from hattn.kernels.gated_delta.fused_decode import default_config, fused_gdn_decode  # triton: CUDA installs

        config = default_config(out.shape[0], num_k_heads, out.shape[1], head_k_dim, out.shape[2], eager)
        return fused_gdn_decode(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                                num_k_heads, head_k_dim, context_lens, config)
    linear_attention_decode_reference(mixed_qkv, conv_weight, conv_bias, g, beta, out, conv_state, rec_state, slots,
                                      num_k_heads, head_k_dim, context_lens)
