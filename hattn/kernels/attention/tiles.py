"""Tile sizes shared by the Triton attention kernels (decode and prefill over the slot KV cache)."""
from __future__ import annotations

from hattn.kernels.launch import next_pow2

LOG2E = 1.4426950408889634  # the kernels use exp2: scores are scaled by scale * LOG2E
TILE_BYTES = 32 * 1024  # one K + V block in the cache dtype: at D=256 bf16 a 32-position block, 3 stages in smem


def kv_block(dk: int, dv: int, elem: int) -> int:
    """Cache positions a block: K and V blocks together within TILE_BYTES, 16 to 64 (tl.dot needs >= 16)."""
    width = (next_pow2(max(dk, 16)) + next_pow2(max(dv, 16))) * elem
    return max(16, min(64, next_pow2(TILE_BYTES // width + 1) // 2))
