"""Torch reference of the skinny GEMM (`skinny.skinny_linear`): the oracle its tests compare against."""
from __future__ import annotations

import torch


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight^T (+ bias) in fp32 from the given values, returned in fp32 (unrounded).

    x: [M, K]; weight: [N, K]; bias: [N] or None; returns [M, N] float32.
    """
    y = x.float() @ weight.float().T
    return y if bias is None else y + bias.float()
