"""Kimi-Linear (transformers.models.kimi_linear): MLA full attention (NoPE) + Kimi delta attention (KDA), a gated
delta rule whose decay is per channel (kind "kda", `hattn.ops.kda`); MoE MLPs."""
from hattn.models.families._kda import kda_family

kda_family("kimi_linear", ("kimi_linear",), lambda self, x: self.g_b_proj(self.g_a_proj(x)))
