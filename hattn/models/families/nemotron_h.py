"""Nemotron-H (transformers.models.nemotron_h): Mamba2 mixers, a few GQA attention layers (no RoPE), and MLP/MoE
layers that have no token mixer at all.

Mamba2 is kind "mamba2" (`hattn.ops.mamba2`): conv + selective scan in the op; dt (softplus, clamp), the gated group
norm and the projections stay outside it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hattn.models.hf import Family, gqa_full_spec, register_family
from hattn.ops import mamba2


def mamba2_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """NemotronHMamba2Mixer.forward with conv + SSM scan as hattn::mamba2_mixer. [1, T, hidden] -> same."""
    dtype, t = hidden_states.dtype, hidden_states.shape[1]
    gate, xbc, dt = self.in_proj(hidden_states[0]).split([self.intermediate_size, self.conv_dim, self.num_heads], -1)
    dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(min=self.time_step_limit[0], max=self.time_step_limit[1])
    out = xbc.new_empty(t, self.num_heads, self.head_dim)
    torch.ops.hattn.mamba2_mixer(
        xbc, self.conv1d.weight.squeeze(1), self.conv1d.bias, dt, -torch.exp(self.A_log.float()), self.D, out,
        self.layer_idx, self.n_groups, self.ssm_state_size,
    )
    y = self.norm(out.reshape(1, t, -1), gate[None])
    return self.out_proj(y.to(dtype))


KINDS = {"full_attention": "full", "linear_attention": "mamba2", "mlp": None, "moe": None}


def layer_kinds(config) -> dict[int, str]:
    unknown = sorted(set(config.layers_block_type) - set(KINDS))
    if unknown:
        raise ValueError(f"nemotron_h: block types {unknown} are not served (known: {sorted(KINDS)})")
    return {i: KINDS[t] for i, t in enumerate(config.layers_block_type) if KINDS[t] is not None}


def mamba2_spec(config):
    return mamba2.cache_spec(config.mamba_num_heads, config.mamba_head_dim, config.n_groups, config.ssm_state_size,
                             config.conv_kernel)


def cache_specs(config):
    return {i: gqa_full_spec(config) if k == "full" else mamba2_spec(config) for i, k in layer_kinds(config).items()}


def check(config) -> None:
    if config.mamba_hidden_act not in ("silu", "swish"):
        raise ValueError(f"nemotron_h: hattn's conv1d applies silu, the config's mamba_hidden_act is "
                         f"{config.mamba_hidden_act!r}")


register_family(Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"mamba2": mamba2_forward},
    mixer=lambda layer, kind: getattr(layer, "mixer", None),
    check=check,
))
