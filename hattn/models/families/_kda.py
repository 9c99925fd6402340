"""KDA families (Kimi-Linear, Ling/Ring "bailing" hybrids): MLA full attention and Kimi delta attention, both in
the decoder layer's `self_attn`; which kind a layer is comes from `config.layer_types` only (peers that decided it
by the module's class routed layers to the wrong backend). They differ only in the output gate's projections.
"""
from __future__ import annotations

from typing import Callable

import torch

from hattn.context import LayerSpec
from hattn.models.hf import Family, check_silu, kinds_from_layer_types, register_family
from hattn.ops import full, kda


def kda_core(module, mixed_qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """mixed_qkv: [T, 3*H*D]; g: [T, H, D]; beta: [T, H] -> [T, H, D] through hattn::kda_attention."""
    out = mixed_qkv.new_empty(mixed_qkv.shape[0], module.num_heads, module.head_dim)
    torch.ops.hattn.kda_attention(
        mixed_qkv, module.conv1d.weight.squeeze(1), module.conv1d.bias, g, beta, out, module.layer_idx
    )
    return out


def kda_spec(config) -> LayerSpec:
    h, d = config.linear_num_heads, config.linear_head_dim
    return kda.cache_spec(3 * h * d, config.linear_conv_kernel_dim, h, d)


def mla_spec(config) -> LayerSpec:
    """MLA layers cache the expanded keys/values of every head: keys qk_nope+qk_rope wide, values v_head_dim."""
    return full.cache_spec(config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim,
                           config.v_head_dim)


def kda_forward(gate: Callable) -> Callable:
    """The delta-attention module's forward with the conv + KDA core as hattn::kda_attention, its output gate
    computed by `gate(module, hidden_states [1, T, hidden]) -> [1, T, H*D]`. [1, T, hidden] -> same."""

    def forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
        t = hidden_states.shape[1]
        mixed_qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)],
                              -1)
        g = self.forget_gate(hidden_states)[0]
        beta = torch.sigmoid(self.b_proj(hidden_states))[0]
        core = kda_core(self, mixed_qkv[0], g, beta)
        o_gate = gate(self, hidden_states)[0].view(t, self.num_heads, self.head_dim)
        return self.o_proj(self.o_norm(core, o_gate).reshape(1, t, -1))

    return forward


def layer_kinds(config) -> dict[int, str]:
    return kinds_from_layer_types(config, linear_kind="kda")


def cache_specs(config) -> dict[int, LayerSpec]:
    return {i: mla_spec(config) if k == "full" else kda_spec(config) for i, k in layer_kinds(config).items()}


def kda_family(name: str, model_types: tuple[str, ...], gate: Callable) -> Family:
    return register_family(Family(name=name, model_types=model_types, layer_kinds=layer_kinds,
                                  cache_specs=cache_specs, forwards={"kda": kda_forward(gate)},
                                  mixer=lambda layer, kind: getattr(layer, "self_attn", None), check=check_silu))
