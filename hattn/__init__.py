"""hattn: run hybrid (linear + full attention) LLMs fast under torch.compile.

    model = torch.compile(model, backend="hattn", mode="pcg")      # or "bcg", "full", "inductor", "eager"
    model = torch.compile(model, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4, 8]))
"""
from hattn.registry import register_split_op, unregister_split_op
from hattn.runtime.context import ForwardContext, forward_context

__all__ = ["register_split_op", "unregister_split_op", "ForwardContext", "forward_context"]
