"""fla's autotuning at a cold start, and what shipping its results saves.

    python3 scripts/fla_configs.py --out DIR [--bundle FILE] [--heads 16] [--dim 128] [--tokens 2048] [--seqs 4]

fla's chunked gated delta rule autotunes each of its kernels at its first call (every config compiled and timed):
tens of seconds on a cold Triton cache, paid by full mode's first packed-prefill capture and by pcg/bcg's first
long prefill. fla can instead read a kernel's best config from `$FLA_CONFIG_DIR/<kernel>.json`
(`FLA_CACHE_MODE=strict`: only for the exact autotuning key: head counts, head dims, chunk size, dtypes).

In a fresh Triton cache: time the first call of hattn's chunked rule at the given shape (bf16, `--seqs` packed
sequences, new and continued), write every fla autotuner's choice to DIR in fla's format, then time the first call
again in a new process with another fresh Triton cache, reading DIR; both outputs must be the same bits.
`--bundle` also writes every file of DIR into one JSON object (file name -> content).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _inputs(heads: int, dim: int, tokens: int, seqs: int):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.nn.functional.normalize(torch.randn(1, tokens, heads, dim, device=dev), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(1, tokens, heads, dim, device=dev), dim=-1).bfloat16()
    v = torch.randn(1, tokens, heads, dim, device=dev, dtype=torch.bfloat16)
    g = -torch.rand(1, tokens, heads, device=dev)
    beta = torch.rand(1, tokens, heads, device=dev, dtype=torch.bfloat16)
    h0 = torch.randn(seqs, heads, dim, dim, device=dev) / dim
    bounds = torch.linspace(0, tokens, seqs + 1).long()
    return q, k, v, g, beta, h0, bounds


def _first_call(heads, dim, tokens, seqs) -> tuple[float, torch.Tensor]:
    """Seconds of the first calls of hattn's own entry (`chunk_gated_delta_rule_slots`, the call the model's
    linear-attention layers make: int64 offsets and chunk indices from a PackedBatch), for new prompts (no initial
    states) and for continued ones (states gathered from their slots, as full mode's padded graphs always do): their
    autotuning keys differ, and fla's strict lookup needs the exact keys the model makes (until the thirtieth session
    this called fla with int32 offsets, and the configs it wrote matched no call of the model). Returns them and the
    outputs and final states."""
    from hattn.kernels.gated_delta.chunk import chunk_gated_delta_rule_slots
    from hattn.kernels.packing import PackedBatch

    q, k, v, g, beta, h0, bounds = _inputs(heads, dim, tokens, seqs)
    lens, states = bounds.diff().tolist(), h0.clone()
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = []
    for context in ([0] * seqs, [1] * seqs):
        batch = PackedBatch.build(lens, "cuda", slots=list(range(seqs)), context_lens=context)
        o = chunk_gated_delta_rule_slots(q[0], k[0], v[0], g[0], beta[0], batch, states)
        outs += [o.flatten().float(), states.flatten().clone()]
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(outs)


def _dump(out: str) -> list[str]:
    """Every fla autotuner's choices, as $FLA_CONFIG_DIR/<kernel>.json files fla reads."""
    import triton
    from fla.ops.utils.cache import AutotuneKey, CachedAutotuner

    written = []
    os.makedirs(out, exist_ok=True)
    for tuner in [o for o in gc.get_objects() if isinstance(o, CachedAutotuner) and o.cache]:
        entries = {}
        for key, cfg in tuner.cache.items():
            entries[AutotuneKey.key_hash(list(key))] = {"autotune_key": list(key), "config": {
                "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
                "num_ctas": cfg.num_ctas, "maxnreg": cfg.maxnreg}}
        body = {"kernel_name": tuner.kernel_name, "triton_version": triton.__version__, "autotune_entries": entries}
        with open(os.path.join(out, f"{tuner.kernel_name}.json"), "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        written.append(f"{tuner.kernel_name} ({len(tuner.configs)} configs): {list(entries.values())[0]['config']}")
    return written


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--child", default=None)  # internal: the second process writes its output here
    a = ap.parse_args()
    shape = (a.heads, a.dim, a.tokens, a.seqs)
    if a.child:
        seconds, out = _first_call(*shape)
        torch.save(out.cpu(), a.child)
        print(f"with shipped configs: first call {seconds:.2f} s", flush=True)
        return
    seconds, out = _first_call(*shape)
    again, _ = _first_call(*shape)
    print(f"cold Triton cache, fla autotuning: first call {seconds:.2f} s (second call {again * 1e3:.1f} ms)")
    for line in _dump(a.out):
        print("  ", line)
    child = os.path.join(a.out, "child_out.pt")
    env = dict(os.environ, FLA_CACHE_MODE="strict", FLA_CONFIG_DIR=os.path.abspath(a.out),
               TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-fresh-"))
    subprocess.run([sys.executable, __file__, "--out", a.out, "--child", child, "--heads", str(a.heads),
                    "--dim", str(a.dim), "--tokens", str(a.tokens), "--seqs", str(a.seqs)], env=env, check=True)
    same = torch.equal(torch.load(child), out.cpu())
    os.remove(child)
    print(f"outputs {'identical' if same else 'DIFFER'}", flush=True)
    if a.bundle:
        files = sorted(f for f in os.listdir(a.out) if f.endswith(".json"))
        bundle = {f: json.load(open(os.path.join(a.out, f))) for f in files}
        with open(a.bundle, "w") as f:
            json.dump(bundle, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-"))
    main()
