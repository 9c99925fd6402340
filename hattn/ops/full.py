"""Kind "full": causal GQA attention of packed sequences over their KV cache, `hattn::full_attention`.

Decode steps (one token per sequence, a cache) are one batched, capture-safe kernel call reading the step's slots
and context lengths from device tensors. Other steps of several sequences over a cache on CUDA (prefill, extend,
mixed), and every packed step full mode's graphs run, are one launch: FlashAttention-2's varlen kernel where it fits
(`prefill_flash`: fp16/bf16, one head size up to 256), else the varlen Triton kernel; the rest walks the sequences
(torch SDPA on CUDA: one long prompt takes flash attention; the torch reference on CPU). Kernels:
`hattn/kernels/attention/`.
"""
from __future__ import annotations

import torch

from hattn import registry
from hattn.context import CaptureUnsupported, LayerSpec, op_context, zero_padding
from hattn.kernels.attention import prefill_flash
from hattn.kernels.attention.decode import full_attention_decode
from hattn.kernels.attention.prefill import sdpa_attention
from hattn.kernels.attention.reference import causal_attention
from hattn.kernels.packing import to_device
from hattn.kernels.launch import use_triton
from hattn.ops.packed_runner import DecodeRunner


def cache_spec(kv_heads: int, k_dim: int, v_dim: int | None = None) -> LayerSpec:
    """A KV cache [max_len, kv_heads, k_dim] + [max_len, kv_heads, v_dim] per slot."""
    return LayerSpec("full", kv=(kv_heads, k_dim, k_dim if v_dim is None else v_dim))


def _full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, layer_id: int, scale: float
) -> None:
    """q: [T, Hq, Dk]; k: [T, Hkv, Dk], v: [T, Hkv, Dv] (new tokens, written into the cache); out: [T, Hq, Dv]."""
    ctx = op_context("full", layer_id, q.shape[0])
    if ctx.captured:  # the whole step is one CUDA graph: device metadata only, padding rows at the scratch slot
        if ctx.static.packed is not None:
            return _captured_packed(q, k, v, out, layer_id, scale, ctx)
        k_cache, v_cache = ctx.cache.state(layer_id)
        slots, lens = ctx.device_meta(q.device)
        return full_attention_decode(q, k, v, out, k_cache, v_cache, slots, lens, scale)
    n = ctx.num_tokens
    if ctx.cache is not None and ctx.is_decode and q.is_cuda:  # one batched step instead of a loop over sequences
        k_cache, v_cache = ctx.cache.state(layer_id)
        slots, lens = ctx.device_meta(q.device)
        if n < q.shape[0]:  # padding rows: the step's rows only
            q, k, v, out_rows = q[:n], k[:n], v[:n], out[:n]
        else:
            out_rows = out
        full_attention_decode(q, k, v, out_rows, k_cache, v_cache, slots, lens, scale)
    elif ctx.cache is not None and use_triton(q) and ctx.num_sequences > 1 and _one_launch_fits(q, k):
        _packed(q, k, v, out, layer_id, scale, ctx)
    else:
        _per_sequence(q, k, v, out, layer_id, scale, ctx)
    zero_padding(out, n)


def _one_launch_fits(q, k) -> bool:
    """The varlen kernel's GQA bound (Hq a multiple of Hkv, at most BLOCK_M query heads per KV head); SDPA serves the
    rest."""
    from hattn.kernels.attention.prefill_triton import BLOCK_M

    hq, hkv = q.shape[1], k.shape[1]
    return hkv > 0 and hq % hkv == 0 and hq // hkv <= BLOCK_M


def _packed(q, k, v, out, layer_id: int, scale: float, ctx) -> None:
    """Several sequences in one launch instead of an SDPA call (and two cache writes) each: 16 prompts of a step
    were 96 calls over the 1B preset's 6 full layers. The step's metadata goes to the device once, for every layer."""
    from hattn.kernels.attention.prefill_triton import prefill_attention, write_kv

    n = ctx.num_tokens
    meta = ctx.memo(("full", "packed_attention", q.shape[1], k.shape[1], q.device),
                    lambda: _packed_meta(ctx, q.shape[1], k.shape[1], q.device))
    k_cache, v_cache = ctx.cache.state(layer_id)
    write_kv(k[:n], v[:n], k_cache, v_cache, meta["token_slot"], meta["token_pos"])
    if prefill_flash.fits(q, k_cache, v_cache):
        rows = ctx.memo(("full", "flash_rows", k_cache.shape[1], q.device), lambda: prefill_flash.key_rows(
            meta["starts"], meta["seq_lens"], meta["context_lens"], meta["slots"], k_cache.shape[1], n))
        return prefill_flash.flash_prefill_attention(q[:n], k_cache, v_cache, *rows, out[:n], scale,
                                                     max(ctx.seq_lens))
    prefill_attention(q[:n], k_cache, v_cache, meta["starts"], meta["seq_lens"], meta["context_lens"], meta["slots"],
                      meta["blocks"], out[:n], scale)


def _packed_meta(ctx, hq: int, hkv: int, device) -> dict[str, torch.Tensor]:
    """The step's sequences (starts, lengths, cached lengths, slots), each row's cache target and the query block
    table, as views of one device tensor (one copy from pinned memory)."""
    from hattn.kernels.attention.prefill_triton import block_table, token_targets

    n = ctx.num_tokens
    seqs = [list(column) for column in zip(*ctx.sequences())]  # starts, seq_lens, context_lens, slots
    targets = token_targets(seqs[1], seqs[2], seqs[3], n, scratch_slot=0)  # no padding rows: the scratch unused
    blocks = block_table(seqs[1], n, hq, hkv)
    host = torch.cat([torch.tensor(seqs, dtype=torch.long).flatten(), targets.flatten(), blocks.long().flatten()])
    flat = to_device(host, device)
    count = len(seqs[0])
    parts = flat.split([count] * 4 + [n, n, blocks.numel()])
    names = ("starts", "seq_lens", "context_lens", "slots", "token_slot", "token_pos")
    return {**dict(zip(names, parts)), "blocks": parts[-1].view(2, -1)}


def _captured_packed(q, k, v, out, layer_id: int, scale: float, ctx) -> None:
    """A packed step (prefill, extend, mixed) inside a CUDA graph: the bucket's padded layout, on the device."""
    if not use_triton(q):
        raise CaptureUnsupported("packed full-attention steps in a CUDA graph need Triton")
    from hattn.kernels.attention.prefill_triton import device_block_table, prefill_attention, write_kv

    f = ctx.static.packed.fields
    k_cache, v_cache = ctx.cache.state(layer_id)
    write_kv(k, v, k_cache, v_cache, f["token_slot"], f["token_pos"])
    if prefill_flash.fits(q, k_cache, v_cache):  # rows past the real tokens: the padding sequence, no keys: zeros
        rows = ctx.memo(("full", "flash_rows", k_cache.shape[1], q.device), lambda: prefill_flash.key_rows(
            f["cu"][:-1], f["attn_lens"], f["context_lens"], f["slots"], k_cache.shape[1], q.shape[0]))
        return prefill_flash.flash_prefill_attention(q, k_cache, v_cache, *rows, out, scale)
    t, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    blocks = ctx.memo(("attention_blocks", hq, hkv), lambda: device_block_table(f["attn_lens"], t, hq, hkv))
    prefill_attention(q, k_cache, v_cache, f["cu"][:-1], f["attn_lens"], f["context_lens"], f["slots"], blocks, out,
                      scale)


def _per_sequence(q, k, v, out, layer_id: int, scale: float, ctx) -> None:
    cache = ctx.cache.state(layer_id) if ctx.cache is not None else None
    attend = sdpa_attention if q.is_cuda else causal_attention
    for start, n, past, slot in ctx.sequences():
        rows = slice(start, start + n)
        ks, vs = k[rows], v[rows]
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[slot, past:past + n] = ks
            v_cache[slot, past:past + n] = vs
            ks, vs = k_cache[slot, :past + n], v_cache[slot, :past + n]
        out[rows] = attend(q[rows], ks, vs, scale, past if cache is not None else 0)


def _prepare(q, k, v, out, layer_id: int, scale: float):
    """The decode step of a call site run again and again with these arguments (bcg, pcg): a CUDA graph of prepared
    launches (`decode_triton.prepared_attention`, `DecodeRunner`), none of the checks and planning above."""
    if not use_triton(q):
        return None
    from hattn.kernels.attention.decode_triton import prepared_attention  # triton: CUDA installs only

    def plan(n, ctx, slots, lens):
        k_cache, v_cache = ctx.cache.state(layer_id)
        return prepared_attention(q[:n], k_cache, v_cache, slots, lens, out[:n], scale, k_new=k[:n], v_new=v[:n])
    return DecodeRunner("full", layer_id, out, plan)


full_attention = torch.library.custom_op("hattn::full_attention", mutates_args=("out",))(_full_attention)


@full_attention.register_fake
def _(q, k, v, out, layer_id, scale) -> None:
    return None


registry.register_split_op(full_attention, "full", capture_safe=True, direct=_full_attention, prepare=_prepare,
                          strided_inputs=True)
