"""hattn: run hybrid (linear + full attention) LLMs fast under torch.compile.

    model = torch.compile(model, backend="hattn", mode="pcg")      # or "bcg", "full", "inductor", "eager"
    model = torch.compile(model, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4, 8]))
    hattn.stats()                                                  # counters of everything compiled so far
"""
from hattn.compiler.backend import backend
from hattn.registry import register_split_op, unregister_split_op
from hattn.runtime.context import ForwardContext, forward_context
from hattn.stats import reset_stats
from hattn.stats import total_stats as stats

__all__ = [
    "backend",
    "register_split_op",
    "unregister_split_op",
    "ForwardContext",
    "forward_context",
    "stats",
    "reset_stats",
]
