"""Chunked gated delta rule for packed prefill on CUDA, through flash-linear-attention (imported lazily).

fla (`fla-core==0.6.0`, the `gpu` extra) is imported only on the first CUDA prefill: CPU installs never have it
(transformers routes its own GatedDeltaNet to fla whenever `import fla` works, breaking HF's CPU path).
Facts checked in fla-core 0.6.0's source: `chunk_gated_delta_rule` is `@torch.compiler.disable`d, wants B == 1
with `cu_seqlens` (raises otherwise), maps value head h to key head h // (Hv // Hk) (as repeat_interleave), takes
log-space `g` and post-sigmoid `beta`, L2-normalises q/k in the kernel with `use_qk_l2norm_in_kernel=True`, scales q
by Dk**-0.5 by default and allocates a *new* fp32 final state `[N, Hv, Dk, Dv]` (`k.new_zeros`). So we gather the
initial states from the cache slots and scatter the final states back. Prefill runs eagerly (outside graphs).
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def fla_chunk():
    """fla's chunk_gated_delta_rule, or None where fla is not installed (CPU installs never have it)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def chunk_gated_delta_rule_varlen(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_cpu=None):
    """q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; initial_state: [N, Hv, Dk, Dv] fp32 or None;
    cu_seqlens: [N+1] int64 (device), cu_seqlens_cpu: the same on the host (spares fla a host sync).

    Returns (o [T, Hv, Dv] in q's dtype, final_state [N, Hv, Dk, Dv] fp32, or None without initial_state).
    """
    o, final = fla_chunk()(
        q[None], k[None], v[None], g=g[None].float(), beta=beta[None], initial_state=initial_state,
        output_final_state=initial_state is not None, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
    )
    return o[0], final


def chunk_gated_delta_rule_slots(q, k, v, g, beta, seq_lens: list[int], rec_state, slots, has_state) -> torch.Tensor:
    """fla over N packed sequences, states gathered from and scattered back to cache slots.

    q, k: [T, Hk, Dk]; v: [T, Hv, Dv]; g, beta: [T, Hv]; seq_lens: N host lengths (each >= 1);
    rec_state: [S, Hv, Dk, Dv] fp32 or None (start from zeros, keep nothing); slots, has_state: [N] device tensors
    (has_state 0 = new sequence: start from zeros). Returns o: [T, Hv, Dv] in q's dtype.
    """
    cu_cpu = torch.nn.functional.pad(torch.tensor(seq_lens, dtype=torch.long).cumsum(0), (1, 0))
    cu = cu_cpu.to(q.device, non_blocking=True)
    h0 = None
    if rec_state is not None:
        h0 = rec_state.index_select(0, slots)
        h0 = torch.where(has_state.bool()[:, None, None, None], h0, torch.zeros((), device=h0.device))
    o, final = chunk_gated_delta_rule_varlen(q, k, v, g, beta, h0, cu, cu_cpu)
    if rec_state is not None:
        rec_state.index_copy_(0, slots, final)
    return o
