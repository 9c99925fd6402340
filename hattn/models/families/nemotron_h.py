"""Nemotron-H (transformers.models.nemotron_h): Mamba2 mixers, a few GQA attention layers (no RoPE), and MLP/MoE
layers that have no token mixer at all.

Mamba2 is not a gated delta net, so this file defines the split op `hattn::mamba2_mixer` (kind "mamba2"): causal
conv1d (silu) over x|B|C, then the selective state-space recurrence with the D skip; its states (conv + fp32 SSM
state [H, P, N]) live in each sequence's cache slot. dt (softplus, clamp), the gated group norm and the projections
stay outside the op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hattn import registry
from hattn.kernels.conv1d.reference import causal_conv1d
from hattn.models.cache import LayerSpec
from hattn.models.hf import Family, gqa_full_spec, register_family
from hattn.models.splitops import num_tokens, sequence_states


def recurrent_ssd(x, dt, a, b, c, d, state: torch.Tensor) -> torch.Tensor:
    """Token-by-token Mamba2 scan of one sequence; updates `state` in place.

    x: [T, H, P]; dt: [T, H] (after softplus); a, d: [H]; b, c: [T, H, N] (groups already expanded to heads);
    state: [H, P, N] fp32. Returns y = C.h + D x: [T, H, P] in x's dtype.
    """
    xf, dt, b, c = x.float(), dt.float(), b.float(), c.float()
    s = state.float()
    out = torch.empty(xf.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        s = s * torch.exp(dt[t] * a)[:, None, None] + (dt[t][:, None] * xf[t])[:, :, None] * b[t][:, None, :]
        out[t] = (s * c[t][:, None, :]).sum(dim=-1) + d[:, None] * xf[t]
    state.copy_(s)
    return out.to(x.dtype)


def _mamba2_mixer(
    xbc: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt: torch.Tensor,
    a: torch.Tensor,
    d: torch.Tensor,
    out: torch.Tensor,
    layer_id: int,
    n_groups: int,
    state_size: int,
) -> None:
    """Mamba2 core of packed sequences. xbc: [T, H*P + 2*G*N] (before the conv); dt: [T, H] (after softplus);
    a (= -exp(A_log)), d: [H]; out: [T, H, P]. Cache state: (conv [slots, conv_dim, W-1], ssm [slots, H, P, N] fp32).
    """
    h, p = out.shape[1:]

    def fresh():
        conv = xbc.new_zeros(xbc.shape[1], conv_weight.shape[1] - 1, dtype=conv_weight.dtype)
        return conv, xbc.new_zeros(h, p, state_size, dtype=torch.float32)

    for rows, (conv_state, state) in sequence_states("mamba2", layer_id, xbc.shape[0], fresh):
        y = causal_conv1d(xbc[rows], conv_weight, conv_bias, conv_state)
        x, b, c = y.split([h * p, n_groups * state_size, n_groups * state_size], dim=-1)
        b, c = (z.reshape(-1, n_groups, state_size).repeat_interleave(h // n_groups, dim=1) for z in (b, c))
        out[rows] = recurrent_ssd(x.reshape(-1, h, p), dt[rows], a.float(), b, c, d.float(), state)
    out[num_tokens(xbc.shape[0]):] = 0


mamba2_mixer = torch.library.custom_op("hattn::mamba2_mixer", mutates_args=("out",))(_mamba2_mixer)


@mamba2_mixer.register_fake
def _(xbc, conv_weight, conv_bias, dt, a, d, out, layer_id, n_groups, state_size) -> None:
    return None


registry.register_split_op(torch.ops.hattn.mamba2_mixer, "mamba2", direct=_mamba2_mixer)


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


def mamba2_spec(config) -> LayerSpec:
    h, p, n = config.mamba_num_heads, config.mamba_head_dim, config.ssm_state_size
    conv_dim = h * p + 2 * config.n_groups * n
    return LayerSpec("mamba2", states=(((conv_dim, config.conv_kernel - 1), None), ((h, p, n), torch.float32)))


def cache_specs(config):
    return {i: gqa_full_spec(config) if k == "full" else mamba2_spec(config) for i, k in layer_kinds(config).items()}


def check(config) -> None:
    if config.mamba_hidden_act not in ("silu", "swish"):
        raise ValueError(f"nemotron_h: hattn's conv1d applies silu, the config's mamba_hidden_act is "
                         f"{config.mamba_hidden_act!r}")
    if config.num_nextn_predict_layers:
        raise ValueError("nemotron_h: multi-token-prediction layers are not served; set num_nextn_predict_layers=0")


register_family(Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    layer_kinds=layer_kinds,
    cache_specs=cache_specs,
    forwards={"mamba2": mamba2_forward},
    mixer=lambda layer, kind: getattr(layer, "mixer", None),
    check=check,
))
