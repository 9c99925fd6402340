"""Ling/Ring "bailing" hybrid (transformers.models.bailing_hybrid): MLA attention with a head-wise output gate +
KDA linear attention (the split op `hattn::kda_attention`, kind "kda", defined in kimi_linear.py), MoE MLPs.

Both mixers live in the decoder layer's `self_attn`; which kind a layer is comes from `config.layer_types`
only (sglang's seed 001/003 bugs came from deciding it by the module's class).
"""
from __future__ import annotations

import torch

from hattn.models.families._gdn import check_silu
from hattn.models.families.kimi_linear import kda_core, kda_spec, mla_spec
from hattn.models.hf import Family, kinds_from_layer_types, register_family


def kda_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """BailingHybridDeltaAttention.forward with the conv + KDA core as hattn::kda_attention. [1, T, hidden] -> same."""
    t = hidden_states.shape[1]
    mixed_qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
    g = self.forget_gate(hidden_states)[0]
    beta = torch.sigmoid(self.b_proj(hidden_states))[0]
    core = kda_core(self, mixed_qkv[0], g, beta)
    gate = self.g_proj(hidden_states)[0].view(t, self.num_heads, self.head_dim)
    return self.o_proj(self.o_norm(core, gate).reshape(1, t, -1))


def layer_kinds(config) -> dict[int, str]:
    return kinds_from_layer_types(config, linear_kind="kda")


def cache_specs(config):
    return {i: mla_spec(config) if k == "full" else kda_spec(config) for i, k in layer_kinds(config).items()}


def mixer(layer, kind):
    return getattr(layer, "self_attn", None)


register_family(Family(
    name="bailing_hybrid",
    model_types=("bailing_hybrid",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"kda": kda_forward},
    mixer=mixer,
    check=check_silu,
))
