"""Qwen3.5 (transformers.models.qwen3_5; text model Qwen3_5ForCausalLM): GQA gated attention + GatedDeltaNet."""
from __future__ import annotations

import torch

from hattn.models.families._gdn import gdn_core, gdn_family, gdn_gate, gdn_output


def gdn_forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs):
    """Qwen3_5GatedDeltaNet.forward with the conv + delta-rule core as hattn::linear_attention.

    hidden_states: [1, T, hidden] (packed sequences) -> [1, T, hidden].
    """
    x = hidden_states[0]
    core = gdn_core(self, self.in_proj_qkv(x), gdn_gate(self, self.in_proj_a(x)), self.in_proj_b(x).sigmoid())
    return gdn_output(self, core, self.in_proj_z(x))


gdn_family("qwen3_5", ("qwen3_5_text", "qwen3_5_moe_text"), gdn_forward)
