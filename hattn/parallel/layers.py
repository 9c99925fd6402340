"""Sharding primitives and the few parallel layers tensor parallelism needs, on plain local tensors.

A sharded parameter is this rank's share of the full one, cut along one dimension: the dimension may be the
concatenation of several *parts* (q | k | v of a fused projection, x | B | C of a Mamba2 conv), each cut into
`size` equal contiguous blocks, so rank r holds block r of every part (its heads of q, of k and of v).

    colwise(linear, tp)            output features sharded: this rank's heads / channels, no communication
    rowwise(linear, tp)            input features sharded, output all-reduced once (RowParallelLinear)
    rowwise(linear, tp, reduce=False)   the caller reduces the sum of partial outputs (an MoE block, once)
    reduce_output(module, tp)      all-reduce a module's output (an MoE block whose experts are sharded)
    shard_norm(norm, tp)           RMSNorm over features split across ranks (ShardedRMSNorm)
    vocab_parallel_head(lm_head, tp)   this rank's vocabulary rows, logits all-gathered (VocabParallelHead)

Parameters stay plain tensors (no DTensor): hattn's backend and runtimes see ordinary pieces whose only new ops
are the `_c10d_functional` collectives of `TPGroup`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hattn.parallel.group import TPGroup


def shard_tensor(t: torch.Tensor, dim: int, tp: TPGroup, parts: Sequence[int] | None = None,
                 what: str = "tensor") -> torch.Tensor:
    """This rank's share of `t` along `dim` (a new tensor: the full one can be freed).

    `parts`: the sizes whose concatenation `dim` is (default: one part); each part is cut into tp.size equal
    contiguous blocks and the result concatenates this rank's block of every part.
    """
    parts = list(parts) if parts else [t.shape[dim]]
    if sum(parts) != t.shape[dim]:
        raise ValueError(f"{what}: parts {parts} sum to {sum(parts)} but dim {dim} has size {t.shape[dim]}")
    uneven = [p for p in parts if p % tp.size]
    if uneven:
        raise ValueError(f"{what} {tuple(t.shape)}: size {uneven[0]} along dim {dim} does not split over "
                         f"tp={tp.size} ranks; use a --tp that divides it")
    return torch.cat([part.chunk(tp.size, dim)[tp.rank] for part in t.split(parts, dim)], dim)


def shard_param(module: nn.Module, name: str, tp: TPGroup, dim: int = 0, parts: Sequence[int] | None = None) -> None:
    """Replace parameter or buffer `name` of `module` by this rank's share (see shard_tensor)."""
    full = getattr(module, name)
    local = shard_tensor(full.detach(), dim, tp, parts, f"{type(module).__name__}.{name}")
    if isinstance(full, nn.Parameter):
        setattr(module, name, nn.Parameter(local, requires_grad=full.requires_grad))
    else:
        module._buffers[name] = local


def _check_linear(linear: nn.Module, style: str) -> None:
    if type(linear) is not nn.Linear:
        raise TypeError(f"{style} sharding takes an nn.Linear, got {type(linear).__name__}; the family's TP plan "
                        f"(hattn/parallel/plans.py) must name a plain linear layer here")


def colwise(linear: nn.Linear, tp: TPGroup, parts: Sequence[int] | None = None) -> None:
    """Shard the output features (weight rows, bias) by `parts`: this rank computes its heads only."""
    _check_linear(linear, "column-parallel")
    shard_param(linear, "weight", tp, 0, parts)
    if linear.bias is not None:
        shard_param(linear, "bias", tp, 0, parts)
    linear.out_features = linear.weight.shape[0]


class RowParallelLinear(nn.Linear):
    """A linear layer whose input features are this rank's share: y = all_reduce(x W_r^T) + b (one all-reduce)."""

    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def rowwise(linear: nn.Linear, tp: TPGroup, reduce: bool = True) -> None:
    """Shard the input features. With `reduce` the layer all-reduces its output (RowParallelLinear); without, it
    returns this rank's partial sum and the caller reduces (its bias then counts on rank 0 only)."""
    _check_linear(linear, "row-parallel")
    shard_param(linear, "weight", tp, 1)
    linear.in_features = linear.weight.shape[1]
    if reduce:
        linear.__class__ = RowParallelLinear
        linear.tp = tp
    elif linear.bias is not None and tp.rank != 0:
        linear.bias.data.zero_()


_REDUCED: dict[type, type] = {}


def _reduced_forward(self, *args, **kwargs):
    return self.tp.all_reduce(self._tp_base.forward(self, *args, **kwargs))


def reduce_output(module: nn.Module, tp: TPGroup) -> None:
    """All-reduce `module`'s output (a tensor): its class becomes a subclass that only adds the reduce."""
    base = type(module)
    if base not in _REDUCED:
        _REDUCED[base] = type(f"TP{base.__name__}", (base,), {"forward": _reduced_forward, "_tp_base": base})
    module.__class__ = _REDUCED[base]
    module.tp = tp


class ShardedRMSNorm(nn.Module):
    """RMSNorm over features split across ranks (OLMo's q/k norms, MiniMax's lightning norm span every head):
    the mean square is all-reduced ([T, 1] floats), then each rank scales its own features.

    weight_in_fp32: the weight multiplies the fp32 activations before the cast back (OLMo) or after (MiniMax).
    """

    tp: TPGroup
    full_size: int
    weight_in_fp32: bool
    variance_epsilon: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        mean_square = self.tp.all_reduce(x.pow(2).sum(-1, keepdim=True)) / self.full_size
        x = x * torch.rsqrt(mean_square + self.variance_epsilon)
        return (self.weight * x).to(dtype) if self.weight_in_fp32 else self.weight * x.to(dtype)


def shard_norm(norm: nn.Module, tp: TPGroup, weight_in_fp32: bool) -> None:
    """Make an RMSNorm (weight [F], variance_epsilon) over features that are now split across ranks a
    ShardedRMSNorm over this rank's features."""
    if not hasattr(norm, "variance_epsilon") or norm.weight.dim() != 1:
        raise TypeError(f"{type(norm).__name__} is not an RMSNorm with a [features] weight and variance_epsilon")
    full_size = norm.weight.shape[0]
    shard_param(norm, "weight", tp)
    norm.__class__ = ShardedRMSNorm
    norm.tp, norm.full_size, norm.weight_in_fp32 = tp, full_size, weight_in_fp32


class VocabParallelHead(nn.Linear):
    """The LM head over this rank's vocabulary rows; logits [..., vocab] all-gathered in rank order."""

    tp: TPGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(F.linear(x, self.weight, self.bias), dim=-1)


def vocab_parallel_head(lm_head: nn.Linear, tp: TPGroup) -> None:
    """Shard the head by vocabulary rows (a tied head gets its own rows; the embedding stays whole)."""
    colwise(lm_head, tp)
    lm_head.__class__ = VocabParallelHead
    lm_head.tp = tp
