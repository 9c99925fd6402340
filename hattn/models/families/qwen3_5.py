"""Qwen3.5 (transformers.models.qwen3_5; text model Qwen3_5ForCausalLM): GQA gated attention + GatedDeltaNet."""
from __future__ import annotations

import torch

from hattn.models.families._gdn import check_silu, gdn_core, gdn_gate, gdn_spec
from hattn.models.hf import Family, gqa_full_spec, kinds_from_layer_types, register_family


def gdn_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """Qwen3_5GatedDeltaNet.forward with the conv + delta-rule core as hattn::linear_attention.

    hidden_states: [1, T, hidden] (packed sequences) -> [1, T, hidden].
    """
    x = hidden_states[0]
    t = x.shape[0]
    z = self.in_proj_z(x).reshape(t, self.num_v_heads, self.head_v_dim)
    beta = self.in_proj_b(x).sigmoid()
    g = gdn_gate(self, self.in_proj_a(x))
    core = gdn_core(self, self.in_proj_qkv(x), g, beta)
    y = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    return self.out_proj(y.reshape(1, t, -1))


def cache_specs(config):
    kinds = kinds_from_layer_types(config)
    return {i: gqa_full_spec(config) if k == "full" else gdn_spec(config) for i, k in kinds.items()}


def mixer(layer, kind):
    return getattr(layer, "self_attn" if kind == "full" else "linear_attn", None)


register_family(Family(
    name="qwen3_5",
    model_types=("qwen3_5_text", "qwen3_5_moe_text"),
    layer_kinds=kinds_from_layer_types,
    cache_specs=cache_specs,
    forwards={"linear": gdn_forward},
    mixer=mixer,
    check=check_silu,
))
