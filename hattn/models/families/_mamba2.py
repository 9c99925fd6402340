"""Mamba2 families (Nemotron-H, Granite 4.0-H, Bamba): transformers' Mamba2 mixers share one forward (the same
attribute names and the same torch path in all three), with conv + selective scan as hattn's split op of kind
"mamba2" (`hattn.ops.mamba2`); dt (softplus, clamp), the gated group norm and the projections stay outside it.
A family file gives its config's field names; `mamba_attention_family` does the rest for Granite 4.0-H and Bamba.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hattn.context import LayerSpec
from hattn.models.hf import Family, check_silu, gqa_full_spec, kinds_from_layer_types, register_family
from hattn.ops import mamba2


def mamba2_forward(self, hidden_states: torch.Tensor, cache=None, attention_mask=None, **kwargs):
    """The Mamba2 mixer's forward with conv + SSM scan as hattn::mamba2_mixer. [1, T, hidden] -> same."""
    dtype, t = hidden_states.dtype, hidden_states.shape[1]
    gate, xbc, dt = self.in_proj(hidden_states[0]).split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
    dt = F.softplus(dt.float() + self.dt_bias.float())
    if self.time_step_limit is not None:  # transformers' default (0, inf) is no clamp: softplus is >= 0
        dt = dt.clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
    out = xbc.new_empty(t, self.num_heads, self.head_dim)
    torch.ops.hattn.mamba2_mixer(
        xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, dt, -torch.exp(self.A_log.float()), self.D, out,
        self.layer_idx, self.n_groups, self.ssm_state_size,
    )
    y = self.norm(out.reshape(1, t, -1), gate[None])
    return self.out_proj(y.to(dtype))


def mamba2_spec(config, heads: str, head_dim: str, groups: str, state: str, conv: str) -> LayerSpec:
    """A Mamba2 layer's cache spec, from the config fields the family names its sizes by."""
    return mamba2.cache_spec(*(getattr(config, k) for k in (heads, head_dim, groups, state, conv)))


def mamba_attention_family(name: str, model_types: tuple[str, ...]) -> Family:
    """Granite 4.0-H and Bamba: each decoder layer holds a Mamba2 mixer in `mamba` or a GQA attention in
    `self_attn`, as `config.layers_block_type` says; sizes in the `mamba_*` fields; the config's `hidden_act` is
    also the conv's activation."""
    def cache_specs(config):
        return {i: gqa_full_spec(config) if k == "full" else
                mamba2_spec(config, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state", "mamba_d_conv")
                for i, k in layer_kinds(config).items()}

    def layer_kinds(config):
        return kinds_from_layer_types(config, "mamba2", key="layers_block_type")

    return register_family(Family(
        name=name,
        model_types=model_types,
        layer_kinds=layer_kinds,
        cache_specs=cache_specs,
        forwards={"mamba2": mamba2_forward},
        mixer=lambda layer, kind: getattr(layer, "mamba" if kind == "mamba2" else "self_attn", None),
        check=check_silu,
    ))
