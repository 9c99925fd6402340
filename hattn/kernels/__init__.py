"""Implementations of hattn's split ops: plain-torch references (CPU, tests) and GPU kernels.

`full_attention_forward` and `linear_attention_forward` walk the packed sequences of the forward context and
serve each with the best implementation for the device.
"""
from hattn.kernels.dispatch import full_attention_forward, linear_attention_forward

__all__ = ["full_attention_forward", "linear_attention_forward"]
