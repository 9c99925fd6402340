"""MiniMax (transformers.models.minimax): GQA attention + lightning attention (linear attention with a fixed
per-head exponential decay), MoE MLPs.

Lightning attention is kind "lightning" (`hattn.ops.lightning`): S <- exp(-slope) * S + k^T v, o = q S.
"""
from __future__ import annotations

import torch

from hattn.models.hf import Family, gqa_full_spec, kinds_from_layer_types, register_family
from hattn.ops import lightning


def lightning_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                      past_key_values=None, **kwargs):
    """MiniMaxLightningAttention.forward with the recurrence as hattn::lightning_attention. [1, T, hidden]."""
    t, h, d = hidden_states.shape[1], self.num_attention_heads, self.head_dim
    qkv = self.act_fn(self.qkv_proj(hidden_states[0])).reshape(t, h, 3 * d)
    q, k, v = (x.contiguous() for x in qkv.split(d, dim=-1))
    out = q.new_empty(t, h, d)
    torch.ops.hattn.lightning_attention(q, k, v, self.slope_rate.reshape(h), out, self.layer_idx)
    y = self.norm(out.reshape(1, t, h * d))
    y = torch.sigmoid(self.output_gate(hidden_states)) * y
    return self.out_proj(y), None


def lightning_spec(config):
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return lightning.cache_spec(config.num_attention_heads, d)


def layer_kinds(config) -> dict[int, str]:
    return kinds_from_layer_types(config, linear_kind="lightning")


def cache_specs(config):
    return {i: gqa_full_spec(config) if k == "full" else lightning_spec(config) for i, k in layer_kinds(config).items()}


def check(config) -> None:
    if config.sliding_window is not None:
        raise ValueError(f"minimax: sliding-window attention (sliding_window={config.sliding_window}) is not served")


register_family(Family(
    name="minimax",
    model_types=("minimax",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"lightning": lightning_forward},
    mixer=lambda layer, kind: getattr(layer, "self_attn", None),
    check=check,
))
