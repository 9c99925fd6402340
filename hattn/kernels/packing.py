"""A packed prefill batch: sequences laid end to end along the token dimension, with the device metadata the
prefill kernels read (offsets, the sequence of every row, cache slots). Built once per step and shared by every
layer, so a step pays one host-to-device copy of its metadata, not one per layer.

Two forms. `PackedBatch.build` is exact (eager steps: its sizes follow the step). `Bucket` lays a step out in fixed
sizes for a CUDA graph captured once and replayed for every packing that fits: `tokens` rows and `seqs` sequences,
where the real sequences come first, one padding sequence covers the rows past the real tokens (so every row is
computed from finite inputs and written; attention, whose kernel zeroes padding rows itself, sees it with length 0
in `attn_lens`), and zero-length sequences fill the rest; every padding sequence uses the
cache's scratch slot and starts from zero state, so it does no harm. fla's chunk indices come padded the same way:
the real chunks in order, then entries of the zero-length last sequence, which do no work; and so do its chunk
offsets (each sequence's first chunk), which fla would otherwise derive on the device in every layer.
"""
from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CHUNK = 64  # fla's chunk size for the gated delta rule
# real sequences a packed graph holds, below the cache's slots (which are the last bucket): a bucket pads its
# sequences up to its count, and the state pass runs over each padding sequence like a real one (reading and writing
# the scratch slot's ~1 MB a layer at the 1B preset), so a one-prompt prefill should not pay for every slot
SEQ_BUCKETS = (1, 4, 16)


def seq_bucket(seqs: int, slots: int, buckets: tuple[int, ...] = SEQ_BUCKETS) -> int:
    """The smallest sequence bucket (`buckets`, capped at the cache's `slots`, then `slots`) that holds `seqs`."""
    return next((b for b in sorted({min(b, slots) for b in (*buckets, slots)}) if b >= seqs), slots)


@dataclass
class PackedBatch:
    """lens: tokens of each packed sequence (>= 1 in an exact batch: empty sequences are left out, their slots
    untouched); slots / has_state: each one's cache slot and whether it continues that slot's states (False: a new
    sequence, states start from zeros), host lists, or None without a cache. Device tensors (int64): `cu` [N+1] start
    rows then the total, `token_seq` [T] the sequence of each row, `slots_d` / `has_state_d` [N].
    `padded`: a Bucket's layout, whose host lists describe capture time only: kernels must read the device tensors
    and must not branch on the host lists (they are what the graph was captured with, not this step's)."""

    lens: list[int]
    slots: list[int] | None
    has_state: list[bool] | None
    cu_cpu: torch.Tensor
    cu: torch.Tensor
    token_seq: torch.Tensor
    slots_d: torch.Tensor | None
    has_state_d: torch.Tensor | None
    padded: bool = False
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
        flat = to_device(torch.cat(rows), device)  # one copy: cu, token_seq[, slots, has_state]
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


@dataclass(frozen=True)
class Bucket:
    """The fixed sizes of a captured packed step: `tokens` rows, `seqs` sequences (the real ones, the padding-rows
    one, at least one of length zero), `chunks` = fla chunk-index entries (an upper bound on the real chunks)."""

    tokens: int
    seqs: int

    @classmethod
    def for_tokens(cls, tokens: int, max_real_seqs: int) -> Bucket:
        return cls(tokens, min(tokens, max_real_seqs) + 2)

    @property
    def chunks(self) -> int:
        return -(-self.tokens // CHUNK) + self.seqs

    @property
    def parts(self) -> dict[str, int]:
        """The int64 fields of the layout, in order, and their lengths."""
        s, t = self.seqs, self.tokens
        return {"cu": s + 1, "token_seq": t, "slots": s, "has_state": s, "context_lens": s, "attn_lens": s,
                "chunk_indices": 2 * self.chunks, "chunk_offsets": s + 1, "token_slot": t, "token_pos": t,
                "real_tokens": 1}

    @property
    def numel(self) -> int:
        return sum(self.parts.values())

    def host(self, seq_lens: list[int], context_lens: list[int], slots: list[int], scratch: int) -> torch.Tensor:
        """This step's metadata as one int64 host tensor in the bucket's layout (see the module docstring).

        Built as one int64 array from host lists (sequences are few; rows repeat a sequence's values): one full
        prefill step's host work, several times less than a torch op per field."""
        keep = [i for i, n in enumerate(seq_lens) if n]
        real = sum(seq_lens)
        if real > self.tokens or len(keep) > self.seqs - 2:
            raise ValueError(f"a step of {real} tokens in {len(keep)} sequences does not fit the bucket of "
                             f"{self.tokens} tokens and {self.seqs - 2} sequences")
        pad = self.seqs - len(keep) - 1
        lens = [seq_lens[i] for i in keep] + [self.tokens - real] + [0] * pad
        ctx = [context_lens[i] for i in keep] + [0] * (pad + 1)
        slot = [slots[i] for i in keep] + [scratch] * (pad + 1)
        fields = {name: array("q") for name in self.parts}
        fields["cu"].extend(itertools.accumulate(lens, initial=0))
        fields["slots"].extend(slot)
        fields["has_state"].extend(int(c > 0) for c in ctx)
        fields["context_lens"].extend(ctx)
        fields["attn_lens"].extend(lens[:len(keep)] + [0] * (pad + 1))  # no padding rows
        for s, n in enumerate(lens[:len(keep)]):
            fields["token_seq"].extend(array("q", [s]) * n)
            fields["token_slot"].extend(array("q", [slot[s]]) * n)
            fields["token_pos"].extend(range(ctx[s], ctx[s] + n))
        padding = self.tokens - real  # rows past the real tokens: one padding sequence, position 0 of the scratch slot
        fields["token_seq"].extend(array("q", [len(keep)]) * padding)
        fields["token_slot"].extend(array("q", [scratch]) * padding)
        fields["token_pos"].extend(array("q", [0]) * padding)
        chunks = fields["chunk_indices"]  # fla's (sequence, chunk) pairs in order, then no-op entries up to the bound
        for s, n in enumerate(lens):
            for c in range(-(-n // CHUNK)):
                chunks.extend((s, c))
        chunks.extend(array("q", [self.seqs - 1, 0]) * (self.chunks - len(chunks) // 2))
        fields["chunk_offsets"].extend(itertools.accumulate((-(-n // CHUNK) for n in lens), initial=0))
        fields["real_tokens"].append(real)
        flat = array("q")
        for name in self.parts:
            flat.extend(fields[name])
        return torch.frombuffer(flat, dtype=torch.long)  # shares flat's memory, which it keeps alive

    def fill(self, flat: torch.Tensor, seq_lens: list[int], context_lens: list[int], slots: list[int],
             scratch: int) -> None:
        """Write this step's layout (`host`) into the device buffer `flat` the bucket's graphs read: one copy, from
        pinned memory on CUDA (the host does not wait for it)."""
        host = self.host(seq_lens, context_lens, slots, scratch)
        copy_to(flat[:host.numel()], host)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layout's fields as views of a device tensor holding it (a prefix of `flat`)."""
        return dict(zip(self.parts, flat[:self.numel].split(list(self.parts.values()))))

    def batch(self, flat: torch.Tensor) -> PackedBatch:
        """A padded PackedBatch over the device layout in `flat` (fla's chunk indices included)."""
        v = self.views(flat)
        cu_cpu = torch.tensor([0, self.tokens])  # host: only the total is read (checks); the rest is on the device
        batch = PackedBatch([self.tokens] + [0] * (self.seqs - 1), None, None, cu_cpu, v["cu"], v["token_seq"],
                            v["slots"], v["has_state"], padded=True)
        batch._memo["fla_chunk_indices"] = v["chunk_indices"].view(self.chunks, 2)
        batch._memo["fla_chunk_offsets"] = v["chunk_offsets"]
        return batch



def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: from pinned memory on CUDA, so the host does not wait for the copy."""
    if torch.device(device).type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def copy_to(dst: torch.Tensor, host: torch.Tensor) -> None:
    """Copy a host tensor into the device tensor `dst` (a graph's static buffer), from pinned memory on CUDA: the host
    does not wait for the copy."""
    dst.copy_(host.pin_memory() if dst.is_cuda else host, non_blocking=True)


@dataclass
class PackedStep:
    """A padded packed step on the device: its bucket, the layout's fields (views of one static buffer) and the
    PackedBatch over them that the linear-attention kernels read."""

    bucket: Bucket
    fields: dict[str, torch.Tensor]
    batch: PackedBatch

    @classmethod
    def over(cls, bucket: Bucket, flat: torch.Tensor) -> PackedStep:
        return cls(bucket, bucket.views(flat), bucket.batch(flat))
