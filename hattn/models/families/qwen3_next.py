"""Qwen3-Next (transformers.models.qwen3_next): GQA gated attention + GatedDeltaNet with fused, head-grouped
projections (in_proj_qkvz, in_proj_ba), MoE MLPs."""
from __future__ import annotations

import torch

from hattn.models.families._gdn import check_silu, gdn_core, gdn_gate, gdn_spec
from hattn.models.hf import Family, gqa_full_spec, kinds_from_layer_types, register_family


def gdn_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """Qwen3NextGatedDeltaNet.forward with the conv + delta-rule core as hattn::linear_attention.

    hidden_states: [1, T, hidden] (packed sequences) -> [1, T, hidden].
    """
    x = hidden_states[0][None]  # fix_query_key_value_ordering wants [B, T, ...]
    t = x.shape[1]
    q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(x), self.in_proj_ba(x))
    mixed_qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
    core = gdn_core(self, mixed_qkv, gdn_gate(self, a[0]), b[0].sigmoid())
    y = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(y.reshape(1, t, -1))


def cache_specs(config):
    kinds = kinds_from_layer_types(config)
    return {i: gqa_full_spec(config) if k == "full" else gdn_spec(config) for i, k in kinds.items()}


def mixer(layer, kind):
    return getattr(layer, "self_attn" if kind == "full" else "linear_attn", None)


register_family(Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    layer_kinds=kinds_from_layer_types,
    cache_specs=cache_specs,
    forwards={"linear": gdn_forward},
    mixer=mixer,
    check=check_silu,
))
