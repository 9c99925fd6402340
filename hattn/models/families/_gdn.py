"""Helpers shared by gated-delta-net families (Qwen3.5, Qwen3-Next, OLMo hybrid): the split-op call and cache spec."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hattn.models.cache import LayerSpec, linear_spec


def check_silu(config, key: str = "hidden_act") -> None:
    act = getattr(config, key)
    if act not in ("silu", "swish"):
        raise ValueError(f"{config.model_type}: hattn's conv1d applies silu but the config's {key} is {act!r}")


def gdn_spec(config) -> LayerSpec:
    """Conv state over q, k, v channels + fp32 recurrent state [Hv, Dk, Dv]."""
    hk, dk = config.linear_num_key_heads, config.linear_key_head_dim
    hv, dv = config.linear_num_value_heads, config.linear_value_head_dim
    return linear_spec(2 * hk * dk + hv * dv, config.linear_conv_kernel_dim, hv, dk, dv)


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
