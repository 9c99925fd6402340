"""Torch reference of the skinny GEMM (`skinny.skinny_linear`): the oracle its tests compare against."""
from __future__ import annotations

import torch


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in fp32 from the given values, returned in fp32 (unrounded).

    x: [M, K]; weight: [N, K]; bias: [N] or None; returns [M, N] float32.
    """
    y = x.float() @ weight.float().T
    return y if bias is None else y + bias.float()


def gated_input_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a gated MLP's fused [gate | up] rows [M, 2K], computed in fp32 and rounded to the input's
    dtype (as inductor's fused kernel stores it): [M, K]."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
