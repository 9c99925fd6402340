"""Ling/Ring "bailing" hybrid (transformers.models.bailing_hybrid): MLA attention with a head-wise output gate +
KDA linear attention (kind "kda", `hattn.ops.kda`), MoE MLPs."""
from hattn.models.families._kda import kda_family

kda_family("bailing_hybrid", ("bailing_hybrid",), lambda self, x: self.g_proj(x))
