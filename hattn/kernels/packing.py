"""A packed prefill batch: sequences laid end to end along the token dimension, with the device metadata the
prefill kernels read (offsets, the sequence of every row, cache slots). Built once per step and shared by every
layer, so a step pays one host-to-device copy of its metadata, not one per layer.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class PackedBatch:
    """lens: tokens of each packed sequence (>= 1: empty sequences are left out, their slots untouched);
    slots / has_state: each one's cache slot and whether it continues that slot's states (False: a new sequence,
    states start from zeros), host lists, or None without a cache. Device tensors (int64): `cu` [N+1] start rows
    then the total, `token_seq` [T] the sequence of each row, `slots_d` / `has_state_d` [N]."""

    lens: list[int]
    slots: list[int] | None
    has_state: list[bool] | None
    cu_cpu: torch.Tensor
    cu: torch.Tensor
    token_seq: torch.Tensor
    slots_d: torch.Tensor | None
    has_state_d: torch.Tensor | None
    _memo: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, seq_lens: list[int], device, slots: list[int] | None = None,
              context_lens: list[int] | None = None) -> PackedBatch:
        """From a step's per-sequence host lists (`context_lens[i] > 0`: sequence i continues its slot)."""
        keep = [i for i, n in enumerate(seq_lens) if n]
        lens = [seq_lens[i] for i in keep]
        n, t = len(lens), sum(lens)
        cu_cpu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.long)
        rows = [cu_cpu, torch.repeat_interleave(torch.arange(n), torch.tensor(lens, dtype=torch.long))]
        kept_slots = has = None
        if slots is not None:
            kept_slots = [slots[i] for i in keep]
            has = [bool(context_lens and context_lens[i] > 0) for i in keep]
            rows += [torch.tensor(kept_slots, dtype=torch.long), torch.tensor(has, dtype=torch.long)]
        host = torch.cat(rows)
        if torch.device(device).type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)  # one copy: cu, token_seq[, slots, has_state]
        parts = flat.split([n + 1, t] + ([n, n] if slots is not None else []))
        return cls(lens, kept_slots, has, cu_cpu, parts[0], parts[1], *(parts[2:] if slots is not None else
                                                                         (None, None)))

    @property
    def num_tokens(self) -> int:
        return int(self.cu_cpu[-1])

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """A value derived from this batch (e.g. a kernel library's chunk indices), built on first use."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]
