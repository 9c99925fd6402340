"""Short-prompt gated-delta prefill: the recurrent one-launch form against fla's chunked path, per token count.

    python3 scripts/recurrent_ab.py [--shape 1B] [--tokens 1,4,16,32,64,128] [--seqs 1,4]

Per (sequences x tokens each): device us per layer call inside a CUDA graph, and wall us per eager call (host
launch work included, the way pcg and bcg run it), for each form; both forms run in the same process on the same
inputs. Sets where `recurrent.MAX_RECURRENT_TOKENS` (graphs) and `_EAGER` (between graphs) sit.
"""
from __future__ import annotations

import argparse
import time

import torch

from hattn.bench.kernels import GDN_SHAPES, _gdn_layer, graph_us
from hattn.kernels.gated_delta import recurrent
from hattn.kernels.gated_delta.packed import linear_attention_packed
from hattn.kernels.packing import PackedBatch

LAYERS = 18  # a step's linear-attention layers (qwen3.5-1b)


def _calls(shape: str, seqs: int, n: int) -> list:
    hk, hv, d = GDN_SHAPES[shape]
    batch = PackedBatch.build([n] * seqs, "cuda", list(range(seqs)), [1] * seqs)
    layers = [_gdn_layer(n * seqs, shape, seqs + 1, "cuda", seed=i) for i in range(LAYERS)]
    outs = [torch.empty(n * seqs, hv, d, device="cuda", dtype=torch.bfloat16) for _ in layers]
    return [lambda t=t, o=o: linear_attention_packed(t["mixed_qkv"], t["conv_weight"], None, t["g"], t["beta"], o,
                                                     (t["conv_state"], t["rec_state"]), batch, hk, d)
            for t, o in zip(layers, outs)]


def _eager_us(calls, reps: int = 10) -> float:
    for c in calls:
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        for c in calls:
            c()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / reps / len(calls)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1B")
    ap.add_argument("--tokens", default="1,4,16,32,64,128")
    ap.add_argument("--seqs", default="1,4")
    a = ap.parse_args()
    caps = recurrent.MAX_RECURRENT_TOKENS, recurrent.MAX_RECURRENT_TOKENS_EAGER
    print(f"shape {a.shape}, {LAYERS} layers; us per layer call: graph (device) and eager (wall)")
    print(f"{'seqs x tokens':>14s} {'recurrent graph':>16s} {'chunk graph':>12s} {'recurrent eager':>16s} "
          f"{'chunk eager':>12s}")
    for seqs in (int(s) for s in a.seqs.split(",")):
        for n in (int(t) for t in a.tokens.split(",")):
            row = {}
            for form, limit in (("recurrent", 1 << 30), ("chunk", 0)):
                recurrent.MAX_RECURRENT_TOKENS = recurrent.MAX_RECURRENT_TOKENS_EAGER = limit
                calls = _calls(a.shape, seqs, n)
                row[form] = (graph_us(calls), _eager_us(calls))
            recurrent.MAX_RECURRENT_TOKENS, recurrent.MAX_RECURRENT_TOKENS_EAGER = caps
            print(f"{seqs:>6d} x {n:<5d} {row['recurrent'][0]:16.2f} {row['chunk'][0]:12.2f} "
                  f"{row['recurrent'][1]:16.2f} {row['chunk'][1]:12.2f}", flush=True)


if __name__ == "__main__":
    main()
