"""Qwen3-Next (transformers.models.qwen3_next): GQA gated attention + GatedDeltaNet with fused, head-grouped
projections (in_proj_qkvz, in_proj_ba), MoE MLPs."""
from __future__ import annotations

import torch

from hattn.models.families._gdn import gdn_core, gdn_family, gdn_gate, gdn_output


def gdn_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """Qwen3NextGatedDeltaNet.forward with the conv + delta-rule core as hattn::linear_attention.

    hidden_states: [1, T, hidden] (packed sequences) -> [1, T, hidden].
    """
    x = hidden_states[0][None]  # fix_query_key_value_ordering wants [B, T, ...]
    t = x.shape[1]
    q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(x), self.in_proj_ba(x))
    mixed_qkv = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
    core = gdn_core(self, mixed_qkv, gdn_gate(self, a[0]), b[0].sigmoid())
    return gdn_output(self, core, z)


gdn_family("qwen3_next", ("qwen3_next",), gdn_forward)
