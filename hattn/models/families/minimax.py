"""MiniMax (transformers.models.minimax): GQA attention + lightning attention (linear attention with a fixed
per-head exponential decay), MoE MLPs.

Lightning attention is not a gated delta net, so this file defines the split op `hattn::lightning_attention`
(kind "lightning"): S <- exp(-slope) * S + k^T v, o = q S, the state [H, D, D] fp32 in each sequence's cache slot.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.models.cache import LayerSpec
from hattn.models.hf import Family, gqa_full_spec, kinds_from_layer_types, register_family
from hattn.models.splitops import num_tokens, sequence_states


def recurrent_lightning(q, k, v, slope: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token lightning attention of one sequence; updates `state` in place.

    q, k, v: [T, H, D]; slope: [H]; state: [H, D, D] fp32. Returns [T, H, D] in v's dtype.
    """
    decay = torch.exp(-slope.float())[:, None, None]
    q, k, v = q.float(), k.float(), v.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = decay * s + k[t][:, :, None] * v[t][:, None, :]
        out[t] = (q[t][:, :, None] * s).sum(dim=-2)
    state.copy_(s)
    return out.to(v.dtype)


def _lightning_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slope: torch.Tensor, out: torch.Tensor, layer_id: int
) -> None:
    """Lightning attention of packed sequences. q, k, v, out: [T, H, D]; slope: [H].

    Cache state of the layer: (kv_state [slots, H, D, D] fp32,).
    """
    h, d = q.shape[1:]

    def fresh():
        return (q.new_zeros(h, d, d, dtype=torch.float32),)

    for rows, (state,) in sequence_states("lightning", layer_id, q.shape[0], fresh):
        out[rows] = recurrent_lightning(q[rows], k[rows], v[rows], slope, state)
    out[num_tokens(q.shape[0]):] = 0


lightning_attention = torch.library.custom_op("hattn::lightning_attention", mutates_args=("out",))(_lightning_attention)


@lightning_attention.register_fake
def _(q, k, v, slope, out, layer_id) -> None:
    return None


registry.register_split_op(torch.ops.hattn.lightning_attention, "lightning", direct=_lightning_attention)


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


def lightning_spec(config) -> LayerSpec:
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LayerSpec("lightning", states=(((config.num_attention_heads, d, d), torch.float32),))


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
