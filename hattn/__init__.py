"""hattn: run hybrid (linear + full attention) LLMs fast under torch.compile.

    lm = hattn.adapt(hf_model)                                      # an unmodified transformers hybrid model
    model = torch.compile(lm, backend="hattn", mode="pcg")          # or "bcg", "full", "eager" (no CUDA graphs)
    out = hattn.generate(model, [[1, 2, 3]], params=hattn.SamplingParams(max_new_tokens=16))
    model = torch.compile(lm, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4, 8]))
    hattn.stats()                                                   # counters of everything compiled so far
"""
from hattn.compiler.backend import backend
from hattn.context import ForwardContext, forward_context
from hattn.counters import reset_stats
from hattn.counters import total_stats as stats
from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import adapt
from hattn.registry import register_split_op, unregister_split_op

__version__ = "0.2.0"

__all__ = [
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
