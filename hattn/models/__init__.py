"""Transformers hybrid models on hattn: adapters (hf.py, families/), the static hybrid cache, generation, presets.

    from hattn.models import load, generate, SamplingParams
    lm = load("tiny")                                      # or adapt(any supported transformers causal LM)
    out = generate(lm, [[1, 2, 3], [4, 5]], params=SamplingParams(max_new_tokens=16))
"""
from hattn.models.cache import HybridCache, LayerSpec
from hattn.models.generate import Generation, generate
from hattn.models.sampling import SamplingParams
from hattn.models.hf import Family, HybridLM, adapt, register_family
from hattn.models.presets import PRESETS, load

__all__ = ["HybridCache", "LayerSpec", "Generation", "SamplingParams", "generate", "Family", "HybridLM", "adapt",
           "register_family", "PRESETS", "load"]
