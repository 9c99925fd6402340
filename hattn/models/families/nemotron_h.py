"""Nemotron-H (transformers.models.nemotron_h): Mamba2 mixers, a few GQA attention layers (no RoPE), and MLP/MoE
layers that have no token mixer at all.

Mamba2 is kind "mamba2" (`hattn.ops.mamba2`): conv + selective scan in the op; dt (softplus, clamp), the gated group
norm and the projections stay outside it.
"""
from __future__ import annotations

from hattn.models.families._mamba2 import mamba2_forward, mamba2_spec
from hattn.models.hf import Family, check_silu, gqa_full_spec, register_family

KINDS = {"full_attention": "full", "linear_attention": "mamba2", "mlp": None, "moe": None}


def layer_kinds(config) -> dict[int, str]:
    unknown = sorted(set(config.layers_block_type) - set(KINDS))
    if unknown:
        raise ValueError(f"nemotron_h: block types {unknown} are not served (known: {sorted(KINDS)})")
    return {i: KINDS[t] for i, t in enumerate(config.layers_block_type) if KINDS[t] is not None}


def cache_specs(config):
    return {i: gqa_full_spec(config) if k == "full" else
            mamba2_spec(config, "mamba_num_heads", "mamba_head_dim", "n_groups", "ssm_state_size", "conv_kernel")
            for i, k in layer_kinds(config).items()}


register_family(Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"mamba2": mamba2_forward},
    mixer=lambda layer, kind: getattr(layer, "mixer", None),
    check=lambda config: check_silu(config, "mamba_hidden_act"),
))
