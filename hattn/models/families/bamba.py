"""Bamba (transformers.models.bamba): Mamba2 mixers and GQA attention at `attn_layer_indices` (half-rotary RoPE),
dense MLPs."""
from hattn.models.families._mamba2 import mamba_attention_family

mamba_attention_family("bamba", ("bamba",))
