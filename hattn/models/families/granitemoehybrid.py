"""Granite 4.0-H (transformers.models.granitemoehybrid): Mamba2 mixers and a few GQA attention layers (RoPE or none,
`attention_multiplier` as the scale), MoE or dense MLPs, embedding/residual/logit multipliers (outside the split
ops, as transformers runs them)."""
from hattn.models.families._mamba2 import mamba_attention_family

mamba_attention_family("granitemoehybrid", ("granitemoehybrid",))
