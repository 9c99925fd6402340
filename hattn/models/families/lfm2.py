"""LFM2 and LFM2-MoE (transformers.models.lfm2, lfm2_moe): gated short convolutions and a few GQA attention layers
(q/k norms, RoPE), dense or MoE MLPs. The short conv is kind "short_conv" (`hattn.ops.short_conv`): the conv over
time in the op; the gates B * x and C * y and the projections stay outside it.
"""
from __future__ import annotations

import torch

from hattn.models.hf import Family, gqa_full_spec, kinds_from_layer_types, register_family
from hattn.ops import short_conv


def short_conv_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """Lfm2ShortConv.forward with the causal conv as hattn::short_conv. [1, T, hidden] -> same."""
    b, c, x = self.in_proj(hidden_states[0]).chunk(3, dim=-1)
    out = torch.empty_like(x)
    torch.ops.hattn.short_conv(b * x, self.conv.weight.squeeze(1), self.conv.bias, out, self.layer_idx)
    return self.out_proj((c * out)[None])


KINDS = {"full_attention": "full", "conv": "short_conv"}


def layer_kinds(config) -> dict[int, str]:
    return kinds_from_layer_types(config, names=KINDS)


def cache_specs(config):
    return {i: gqa_full_spec(config) if k == "full" else short_conv.cache_spec(config.hidden_size, config.conv_L_cache)
            for i, k in layer_kinds(config).items()}


register_family(Family(
    name="lfm2",
    model_types=("lfm2", "lfm2_moe"),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"short_conv": short_conv_forward},
    mixer=lambda layer, kind: getattr(layer, "conv" if kind == "short_conv" else "self_attn", None),
))
