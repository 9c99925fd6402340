"""hattn: run hybrid (linear + full attention) LLMs fast under torch.compile.

    model = hattn.compile(hf_model)                                 # an unmodified transformers causal LM; mode="bcg"
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # [B, T + new], as transformers'

    lm = hattn.adapt(hf_model)                                      # your own loop: packed prompts, a forward context
    res = hattn.generate(torch.compile(lm, backend="hattn", mode="pcg"), [[1, 2, 3]], params=hattn.SamplingParams())
    model = torch.compile(lm, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4, 8]))
    hattn.stats()                                                   # counters of everything compiled so far
"""
from hattn.compiler.backend import backend
from hattn.context import ForwardContext, forward_context
from hattn.counters import reset_stats
from hattn.counters import total_stats as stats
from hattn.frontdoor import CompiledLM, compile
from hattn.imports import defer_fla_ops
from hattn.models.generate import generate
from hattn.models.hf import adapt
from hattn.models.sampling import SamplingParams
from hattn.registry import register_split_op, unregister_split_op

defer_fla_ops()  # before transformers imports fla: only the kernel families a model uses load (hattn/imports.py)

__version__ = "0.2.0"

__all__ = [
    "compile",
    "CompiledLM",
    "adapt",
    "generate",
    "SamplingParams",
    "backend",
    "register_split_op",
    "unregister_split_op",
    "ForwardContext",
    "forward_context",
    "stats",
    "reset_stats",
]
