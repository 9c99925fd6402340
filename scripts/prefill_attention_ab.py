"""Packed prefill attention over the slot KV cache: hattn's varlen Triton kernel against FlashAttention-2 as torch
builds it (`prefill_flash`), each as full mode's graphs run it (metadata derived on the device, one CUDA graph),
at the qwen3.5-1b layer's shape (Hq 8, Hkv 2, D 256, bf16). Prints us a call, the TFLOP/s of the causal FLOPs, the
ratio, and the largest difference between the two outputs.

    python3 scripts/prefill_attention_ab.py [--hq 8 --hkv 2 --dim 256] [--reps 50]
"""
from __future__ import annotations

import argparse

import torch

from hattn.bench.kernels import graph_us
from hattn.kernels.attention import prefill_flash
from hattn.kernels.attention import prefill_triton as pt

# (new tokens, cached tokens) of each sequence; an 8192-token prompt in 2048-token steps is the last three rows' kind
STEPS = {
    "prefill 256": [(256, 0)],
    "prefill 1024": [(1024, 0)],
    "prefill 2048": [(2048, 0)],
    "4 x 512 packed": [(512, 0)] * 4,
    "2048 after 2048": [(2048, 2048)],
    "2048 after 6144": [(2048, 6144)],
}


def _flops(seqs, hq: int, d: int) -> float:
    """QK^T and PV of the causal pairs: 4 * d * hq per (query, visible key)."""
    return sum(4 * d * hq * (n * past + n * (n + 1) / 2) for n, past in seqs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hq", type=int, default=8)
    ap.add_argument("--hkv", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    dev, dtype, d = "cuda", torch.bfloat16, a.dim
    print(f"{torch.cuda.get_device_name()}: Hq {a.hq}, Hkv {a.hkv}, D {d}, bf16; us a call (CUDA graph replays)")
    print(f"{'step':<18} {'triton us':>10} {'TFLOP/s':>8} {'flash us':>10} {'TFLOP/s':>8} {'flash/triton':>12} "
          f"{'max|diff|':>10}")
    for name, seqs in STEPS.items():
        torch.manual_seed(0)
        tokens = sum(n for n, _ in seqs)
        max_len = max(n + past for n, past in seqs)
        slots = len(seqs) + 1
        q = torch.randn(tokens, a.hq, d, device=dev, dtype=dtype)
        k_cache = torch.randn(slots, max_len, a.hkv, d, device=dev, dtype=dtype)
        v_cache = torch.randn(slots, max_len, a.hkv, d, device=dev, dtype=dtype)
        lens = [n for n, _ in seqs]
        meta = torch.tensor([[sum(lens[:i]) for i in range(len(seqs))], lens, [p for _, p in seqs],
                             list(range(len(seqs)))], device=dev)
        outs = {k: torch.empty_like(q) for k in ("triton", "flash")}

        def triton_step():
            blocks = pt.device_block_table(meta[1], tokens, a.hq, a.hkv)
            pt.prefill_attention(q, k_cache, v_cache, *meta, blocks, outs["triton"], d**-0.5)

        def flash_step():
            rows = prefill_flash.key_rows(*meta, max_len, tokens)
            prefill_flash.flash_prefill_attention(q, k_cache, v_cache, *rows, outs["flash"], d**-0.5)

        us = {"triton": graph_us([triton_step], a.reps), "flash": graph_us([flash_step], a.reps)}
        tf = {k: _flops(seqs, a.hq, d) / (v * 1e-6) / 1e12 for k, v in us.items()}
        diff = (outs["triton"].float() - outs["flash"].float()).abs().max().item()
        print(f"{name:<18} {us['triton']:>10.1f} {tf['triton']:>8.1f} {us['flash']:>10.1f} {tf['flash']:>8.1f} "
              f"{us['flash'] / us['triton']:>12.2f} {diff:>10.2e}")


if __name__ == "__main__":
    main()
