"""Kimi-Linear (transformers.models.kimi_linear): MLA full attention (NoPE) + Kimi delta attention (KDA), a gated
delta rule whose decay is per channel ([T, H, Dk]) instead of per head.

KDA is not the gated delta net of `hattn::linear_attention`, so this file defines the split op `hattn::kda_attention`
(kind "kda"): causal conv1d + delta rule with per-channel decay, its states (conv + fp32 recurrent) in the cache slot
of each sequence. The bailing_hybrid family (Ling/Ring) reuses it.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.kernels.conv1d.reference import causal_conv1d
from hattn.models.cache import LayerSpec, full_spec, linear_spec
from hattn.models.families._gdn import check_silu
from hattn.models.hf import Family, kinds_from_layer_types, register_family
from hattn.models.splitops import num_tokens, sequence_states


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)  # FLA's KDA variant (sqrt, then divide)


def recurrent_kda(q, k, v, g, beta, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token KDA of one sequence; updates `state` in place.

    q, k: [T, H, Dk]; v: [T, H, Dv]; g (log decay per channel): [T, H, Dk]; beta: [T, H]; state: [H, Dk, Dv] fp32.
    Returns [T, H, Dv] in v's dtype. Matches transformers' recurrent_kimi_delta_attention (qk l2-normalised).
    """
    q = l2norm(q.float()) * q.shape[-1] ** -0.5
    k = l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    s = state.float()
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    for t in range(v.shape[0]):
        s = s * g[t].exp()[..., None]
        delta = (v[t] - (s * k[t][..., None]).sum(dim=-2)) * beta[t][..., None]
        s = s + k[t][..., None] * delta[:, None, :]
        out[t] = (s * q[t][..., None]).sum(dim=-2)
    state.copy_(s)
    return out.to(v.dtype)


def _kda_attention(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    g: torch.Tensor,
    beta: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
) -> None:
    """KDA core of packed sequences: causal conv1d (silu) + per-channel-decay delta rule, states in cache slots.

    mixed_qkv: [T, 3*H*D] (q, k, v before the conv); conv_weight: [3*H*D, W]; g: [T, H, D]; beta: [T, H];
    out: [T, H, D]. Cache state of the layer: (conv [slots, 3*H*D, W-1], recurrent [slots, H, D, D] fp32).
    """
    rows_total, (h, d) = mixed_qkv.shape[0], out.shape[1:]

    def fresh():
        conv = mixed_qkv.new_zeros(mixed_qkv.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        return conv, mixed_qkv.new_zeros(h, d, d, dtype=torch.float32)

    for rows, (conv_state, state) in sequence_states("kda", layer_id, rows_total, fresh):
        x = causal_conv1d(mixed_qkv[rows], conv_weight, conv_bias, conv_state)
        q, k, v = (y.reshape(-1, h, d) for y in x.chunk(3, dim=-1))
        out[rows] = recurrent_kda(q, k, v, g[rows], beta[rows], state)
    out[num_tokens(rows_total):] = 0


kda_attention = torch.library.custom_op("hattn::kda_attention", mutates_args=("out",))(_kda_attention)


@kda_attention.register_fake
def _(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id) -> None:
    return None


registry.register_split_op(torch.ops.hattn.kda_attention, "kda", direct=_kda_attention)


def kda_core(module, mixed_qkv: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """mixed_qkv: [T, 3*H*D]; g: [T, H, D]; beta: [T, H] -> [T, H, D] through hattn::kda_attention."""
    out = mixed_qkv.new_empty(mixed_qkv.shape[0], module.num_heads, module.head_dim)
    torch.ops.hattn.kda_attention(
        mixed_qkv, module.conv1d.weight.squeeze(1), module.conv1d.bias, g, beta, out, module.layer_idx
    )
    return out


def kda_spec(config) -> LayerSpec:
    h, d = config.linear_num_heads, config.linear_head_dim
    return linear_spec(3 * h * d, config.linear_conv_kernel_dim, h, d, d, kind="kda")


def mla_spec(config) -> LayerSpec:
    """MLA layers cache the expanded keys/values of every head: keys qk_nope+qk_rope wide, values v_head_dim."""
    return full_spec(config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim)


def kda_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """KimiLinearDeltaAttention.forward with the conv + KDA core as hattn::kda_attention. [1, T, hidden] -> same."""
    t = hidden_states.shape[1]
    mixed_qkv = torch.cat([self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], -1)
    g = self.forget_gate(hidden_states)[0]
    beta = torch.sigmoid(self.b_proj(hidden_states))[0]
    core = kda_core(self, mixed_qkv[0], g, beta)
    gate = self.g_b_proj(self.g_a_proj(hidden_states))[0].view(t, self.num_heads, self.head_dim)
    return self.o_proj(self.o_norm(core, gate).reshape(1, t, -1))


def layer_kinds(config) -> dict[int, str]:
    return kinds_from_layer_types(config, linear_kind="kda")


def cache_specs(config):
    return {i: mla_spec(config) if k == "full" else kda_spec(config) for i, k in layer_kinds(config).items()}


def mixer(layer, kind):
    return getattr(layer, "self_attn", None)  # both kinds live in `self_attn`: the config decides which is which


register_family(Family(
    name="kimi_linear",
    model_types=("kimi_linear",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"kda": kda_forward},
    mixer=mixer,
    check=check_silu,
))
