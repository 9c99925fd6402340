"""The tensor-parallel group a sharded model reduces over: rank, size, and the collectives sharded layers call.

They are functional collectives (`torch.distributed._functional_collectives`): Dynamo traces them into the pieces
of the graph (namespace `_c10d_functional`, never a split op), so pcg, bcg and full capture them inside their
CUDA graphs (NCCL is capture-safe); graph-free they run eagerly, and on CPU over gloo.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass(frozen=True, eq=False)
class TPGroup:
    """This process's place in a tensor-parallel group: `rank` of `size`, collectives over `group`."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"a TPGroup needs 0 <= rank < size, got rank={self.rank}, size={self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError(f"a TPGroup of size {self.size} needs a process group (torch.distributed)")
        if self.group is not None and dist.is_initialized():  # a wrong rank kept another rank's shards, silently
            rank, size = dist.get_rank(self.group), dist.get_world_size(self.group)
            if (rank, size) != (self.rank, self.size):
                raise ValueError(f"TPGroup(rank={self.rank}, size={self.size}) does not match its process group, "
                                 f"where this process is rank {rank} of {size}: use TPGroup.of(group)")

    @classmethod
    def single(cls) -> "TPGroup":
        """No parallelism: collectives are the identity."""
        return cls(0, 1)

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> "TPGroup":
        """The group of an initialized process group (default: the world)."""
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call init_process_group first (or launch the "
                               "command with torchrun; hattn's --tp N does that)")
        group = group or dist.group.WORLD
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks (x itself without parallelism)."""
        if self.size == 1:
            return x
        return funcol.all_reduce(x, "sum", self.group)

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' `x` concatenated in rank order along `dim`."""
        if self.size == 1:
            return x
        return funcol.all_gather_single(x.contiguous(), dim % x.dim(), self.group)

    def sibling(self) -> "TPGroup":
        """A new group over the same ranks: its collectives run on their own communicator (and NCCL stream), so
        they neither wait behind this group's nor reorder with them. Every rank must call it, in the same order."""
        if self.size == 1:
            return self
        return TPGroup(self.rank, self.size, dist.new_group(dist.get_process_group_ranks(self.group)))

    def warm_up(self, device) -> None:
        """One all-reduce now (NCCL builds a communicator on a group's first collective, which must not happen
        inside a CUDA graph capture), checking that every rank answers."""
        if self.size == 1:
            return
        total = int(self.all_reduce(torch.ones(1, device=device)).item())
        if total != self.size:
            raise RuntimeError(f"an all-reduce over the tensor-parallel group summed to {total}, expected {self.size}")
