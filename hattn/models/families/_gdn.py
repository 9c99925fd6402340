"""Gated-delta-net families (Qwen3.5, Qwen3-Next, OLMo hybrid): GQA attention in `self_attn`, a GatedDeltaNet in
`linear_attn`, kinds from `config.layer_types`. A family file gives its module's forward; `gdn_family` does the rest.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from hattn.context import LayerSpec
from hattn.models.hf import Family, check_silu, gqa_full_spec, kinds_from_layer_types, register_family
from hattn.ops import linear


def check_gdn(config) -> None:
    check_silu(config)
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    if hv % hk:
        raise ValueError(f"{config.model_type}: linear_num_value_heads ({hv}) must be a multiple of "
                         f"linear_num_key_heads ({hk}): each key head serves a group of value heads")


def gdn_spec(config) -> LayerSpec:
    """Conv state over q, k, v channels + fp32 recurrent state [Hv, Dk, Dv]."""
    hk, dk = config.linear_num_key_heads, config.linear_key_head_dim
    hv, dv = config.linear_num_value_heads, config.linear_value_head_dim
    return linear.cache_spec(2 * hk * dk + hv * dv, config.linear_conv_kernel_dim, hv, dk, dv)


def gdn_gate(module, a: torch.Tensor) -> torch.Tensor:
    """Log decay g [T, Hv] (fp32) from the `a` projection, as transformers computes it."""
    return -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)


def gdn_core(module, mixed_qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """conv1d + gated delta rule of a GatedDeltaNet module as one split op.

    mixed_qkv: [T, 2*Hk*Dk + Hv*Dv] (before the conv); g, beta: [T, Hv]. Returns [T, Hv, Dv].
    """
    out = mixed_qkv.new_empty(mixed_qkv.shape[0], module.num_v_heads, module.head_v_dim)
    torch.ops.hattn.linear_attention(
        mixed_qkv, module.conv1d.weight.squeeze(1), module.conv1d.bias, g, beta, out,
        module.layer_idx, module.num_k_heads, module.head_k_dim,
    )
    return out


def gdn_output(module, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The gated RMSNorm and output projection after the core: core [T, Hv, Dv], z [T, Hv*Dv] -> [1, T, hidden]."""
    y = module.norm(core.reshape(-1, module.head_v_dim), z.reshape(-1, module.head_v_dim))
    return module.out_proj(y.reshape(1, core.shape[0], -1))


def cache_specs(config) -> dict[int, LayerSpec]:
    kinds = kinds_from_layer_types(config)
    return {i: gqa_full_spec(config) if k == "full" else gdn_spec(config) for i, k in kinds.items()}


def mixer(layer, kind):
    return getattr(layer, "self_attn" if kind == "full" else "linear_attn", None)


def gdn_family(name: str, model_types: tuple[str, ...], forward: Callable) -> Family:
    """Register a gated-delta-net family whose GatedDeltaNet modules run `forward`."""
    return register_family(Family(name=name, model_types=model_types, layer_kinds=kinds_from_layer_types,
                                  cache_specs=cache_specs, forwards={"linear": forward}, mixer=mixer,
                                  check=check_gdn))
