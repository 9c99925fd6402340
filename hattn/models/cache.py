"""The static hybrid cache: every layer's cache preallocated for `slots` sequences of up to `max_len` tokens.

One slot per running sequence. Full-attention layers keep a KV cache `[slots, max_len, kv_heads, head_dim]`;
linear-attention layers keep a conv state `[slots, conv_dim, kernel-1]` and an fp32 recurrent state
`[slots, v_heads, k_dim, v_dim]`; other mixer kinds (KDA, lightning attention, Mamba2) keep the per-slot states
their family declares. Nothing is allocated after construction, so every address is fixed and graphs can be
captured over it. Split ops reach the cache through the forward context (`state(layer_id)`, the protocol of
`hattn.context.LayerCache`); a sequence whose context length is 0 starts from zero state, so a freed slot is reused
as is. What each layer caches is its kind's `LayerSpec` (`hattn.ops.<kind>.cache_spec`).
"""
from __future__ import annotations

import math
import operator
import os

import torch

from hattn.context import LayerSpec


class HybridCache:
    """Preallocated KV caches and mixer states of a hybrid model, one slot per sequence.

    specs: layer id -> LayerSpec (layers without a mixer, e.g. Nemotron-H's MLP layers, are absent).
    Every tensor has `slots + 1` rows: row `scratch_slot` (= slots) is never handed out; graph runtimes point
    padding rows at it.
    """

    def __init__(self, specs: dict[int, LayerSpec], slots: int, max_len: int, dtype: torch.dtype, device="cpu"):
        slots, max_len = _count(slots, "slots"), _count(max_len, "max_len")
        if slots < 1 or max_len < 1:
            raise ValueError(f"a cache needs slots >= 1 and max_len >= 1, got slots={slots}, max_len={max_len}")
        self.specs, self.slots, self.max_len = dict(specs), slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        _check_fits(self._planned_bytes(), self)
        self.scratch_slot = slots  # one extra row that graph runtimes point padding rows at; never handed out
        self._tensors = {i: self._allocate(spec) for i, spec in self.specs.items()}
        self._free = list(range(slots))

    def _allocate(self, spec: LayerSpec) -> tuple[torch.Tensor, ...]:
        if spec.kv is not None:
            heads, k_dim, v_dim = spec.kv
            shape = (self.slots + 1, self.max_len, heads)
            return (self._zeros(shape + (k_dim,), None), self._zeros(shape + (v_dim,), None))
        return tuple(self._zeros((self.slots + 1, *shape), dtype) for shape, dtype in spec.states)

    def _planned_bytes(self) -> int:
        """What `_allocate` will take, from the specs alone."""
        total, rows = 0, self.slots + 1
        for spec in self.specs.values():
            if spec.kv is not None:
                heads, k_dim, v_dim = spec.kv
                total += rows * self.max_len * heads * (k_dim + v_dim) * self.dtype.itemsize
            else:
                total += sum(rows * math.prod(shape) * (dtype or self.dtype).itemsize for shape, dtype in spec.states)
        return total

    def _zeros(self, shape, dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    # -- what split ops read -------------------------------------------------------------------------------------
    def state(self, layer_id: int) -> tuple[torch.Tensor, ...]:
        """The layer's tensors, each [slots + 1, ...]: (k_cache [.., max_len, kv_heads, k_dim], v_cache
        [.., max_len, kv_heads, v_dim]) of a full layer; the per-slot states of any other kind, as its spec lists."""
        if layer_id not in self._tensors:
            raise KeyError(f"the cache has no layer {layer_id}; cached layers: {sorted(self.specs)}")
        return self._tensors[layer_id]

    # -- slots ---------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int = 1) -> list[int]:
        """Take `n` free slots (lowest first). A new sequence in a slot starts at context length 0."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"alloc takes a number of slots >= 0, got {n!r}")
        if n > len(self._free):
            raise RuntimeError(
                f"the cache has {len(self._free)} free slot(s) of {self.slots} but {n} were requested; "
                f"free finished sequences or build the cache with more slots (max batch)"
            )
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def free(self, slots: list[int]) -> None:
        """Give slots back for reuse (their contents are ignored from now on)."""
        slots = list(slots)
        for i, s in enumerate(slots):
            if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < self.slots or s in self._free \
                    or s in slots[:i]:
                raise ValueError(f"slot {s!r} is not an allocated slot of this cache (slots 0..{self.slots - 1}), "
                                 f"or is given twice")
        self._free = sorted(self._free + slots)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self._tensors.values() for t in ts)

    def __repr__(self) -> str:
        kinds = {}
        for spec in self.specs.values():
            kinds[spec.kind] = kinds.get(spec.kind, 0) + 1
        return (
            f"HybridCache(slots={self.slots}, max_len={self.max_len}, layers={kinds}, dtype={self.dtype}, "
            f"{self.nbytes() / 2**20:.1f} MiB)"
        )


def _count(x, name: str) -> int:
    """x as an int (numpy's and other integer types too); a bool or a float is refused by name."""
    try:
        if isinstance(x, bool):
            raise TypeError
        return operator.index(x)
    except TypeError:
        raise TypeError(f"a cache's {name} must be an int, got {x!r} ({type(x).__name__})") from None


def memory_room(device) -> tuple[int, str] | None:
    """(bytes a new allocation on `device` may take, how they are counted), or None where that is not known: on
    CUDA the driver's free bytes and what torch's allocator holds unused, on a CPU all of the machine's memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        idle = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + idle, "free"
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "in all"
    return None


def _check_fits(nbytes: int, cache: HybridCache) -> None:
    """Refuse a cache larger than its device's memory before allocating it, naming the sizes that set it (torch's
    allocator would fail with a bare byte count, or a CPU cache could take the machine's swap)."""
    room = memory_room(cache.device)
    if room is None:
        return
    room, what = room
    if nbytes > room:
        raise ValueError(f"a cache of slots={cache.slots}, max_len={cache.max_len} ({cache.dtype}) needs "
                         f"{nbytes / 2**30:.1f} GiB, more than the {room / 2**30:.1f} GiB {cache.device} has {what}: "
                         f"lower max_len (generate sizes it as the longest prompt + max_new_tokens) or slots")
