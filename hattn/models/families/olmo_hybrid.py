"""OLMo hybrid (transformers.models.olmo_hybrid): GQA attention (RoPE or NoPE) + GatedDeltaNet with separate
q/k/v/a/b/g projections and optional negative eigenvalues (beta in [0, 2])."""
from __future__ import annotations

import torch

from hattn.models.families._gdn import gdn_core, gdn_family, gdn_gate


def gdn_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """OlmoHybridGatedDeltaNet.forward with the conv + delta-rule core as hattn::linear_attention.

    hidden_states: [1, T, hidden] (packed sequences) -> [1, T, hidden].
    """
    x = hidden_states[0]
    t = x.shape[0]
    mixed_qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
    beta = self.b_proj(x).sigmoid()
    if self.allow_neg_eigval:
        beta = beta * 2.0
    core = gdn_core(self, mixed_qkv, gdn_gate(self, self.a_proj(x)), beta)
    y = self.o_norm(core.reshape(-1, self.head_v_dim), self.g_proj(x).reshape(-1, self.head_v_dim))
    return self.o_proj(y.reshape(1, t, -1))


gdn_family("olmo_hybrid", ("olmo_hybrid",), gdn_forward)
