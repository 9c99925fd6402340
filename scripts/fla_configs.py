"""fla's autotuning at a cold start, and what shipping its results saves.

    python3 scripts/fla_configs.py --out DIR [--bundle FILE] [--heads 16] [--dim 128] [--tokens 2048] [--seqs 4]
    python3 scripts/fla_configs.py --out DIR --from-logs LOG...   # the choices the model's own runs printed

fla's chunked gated delta rule autotunes each of its kernels at its first call (every config compiled and timed):
tens of seconds on a cold Triton cache, paid by full mode's first packed-prefill capture and by pcg/bcg's first
long prefill. fla can instead read a kernel's best config from `$FLA_CONFIG_DIR/<kernel>.json`
(`FLA_CACHE_MODE=strict`: only for the exact autotuning key: head counts, head dims, chunk size, dtypes).

In a fresh Triton cache: time the first call of hattn's chunked rule at the given shape (bf16, `--seqs` packed
sequences, new and continued), write every fla autotuner's choice to DIR in fla's format, then time the first call
again in a new process with another fresh Triton cache, reading DIR; both outputs must be the same bits.
`--bundle` also writes every file of DIR into one JSON object (file name -> content).

`--from-logs` reads, instead, the choices fla's autotuners printed in runs of the model itself (Triton prints the
key and the chosen config with TRITON_PRINT_AUTOTUNING=1, e.g. scripts/startup.sh's logs): the exact keys of the
model's calls, which a synthetic call may miss (this script's own call did until the thirtieth session).
"""
from __future__ import annotations

import argparse
import ast
import collections
import gc
import hashlib
import json
import os
import re
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
    states) and for continued ones (as full mode's padded graphs always are): their autotuning keys differ, and fla's
    strict lookup needs the exact keys the model makes (fla's own state pass runs only with `chunk.slot_states`
    off: hattn's, `state_pass.py`, is not autotuned). Returns them and the outputs and final states."""
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
    from fla.ops.utils.cache import CachedAutotuner

    choices = {}
    for tuner in [o for o in gc.get_objects() if isinstance(o, CachedAutotuner) and o.cache]:
        choices[tuner.kernel_name] = {tuple(key): {
            "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": cfg.num_ctas, "maxnreg": cfg.maxnreg} for key, cfg in tuner.cache.items()}
    return _write(out, choices)


def _write(out: str, choices: dict) -> list[str]:
    """kernel name -> {autotuning key (tuple): config} as fla's files, entries keyed by fla's AutotuneKey.key_hash
    (md5 of the key as compact, sorted JSON); one line per kernel written."""
    import triton

    os.makedirs(out, exist_ok=True)
    written = []
    for name, configs in sorted(choices.items()):
        entries = {hashlib.md5(json.dumps(list(key), separators=(",", ":"), sort_keys=True).encode()).hexdigest():
                   {"autotune_key": list(key), "config": config} for key, config in configs.items()}
        body = {"kernel_name": name, "triton_version": triton.__version__, "autotune_entries": entries}
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
        written.append(f"{name}: {len(entries)} keys, {list(entries.values())[0]['config']}")
    return written


_TUNED = re.compile(r"Triton autotuning for function (\w+),\s*with key as (\(.*?\)),\s*finished after [0-9.]+s,"
                    r"\s*best config selected: (.*?);", re.S)


def choices_from_logs(texts: list[str]) -> tuple[dict, list[str]]:
    """fla's choices from logs of the model's own runs printed with TRITON_PRINT_AUTOTUNING=1 (Triton prints the
    autotuning key fla looks configs up by, and the config it chose): kernel -> {key: config}, the choice made most
    often per key (the first of equals), and a line per key whose runs chose differently or that could not be read.
    Only what a run autotuned is there: a call the runs never made (a long new prompt with a cache, say) is not."""
    seen: dict = collections.defaultdict(list)
    choices, split = collections.defaultdict(dict), []
    for text in texts:
        for name, key, config in _TUNED.findall(text):
            try:
                seen[(name, ast.literal_eval(key))].append(_config(config))
            except (ValueError, SyntaxError) as e:  # a key or config not printed as literals: left out, said why
                split.append(f"{name} {key[:80]}: unreadable ({e}); left out")
    for (name, key), configs in seen.items():
        counts = collections.Counter(json.dumps(c, sort_keys=True) for c in configs)
        choices[name][key] = json.loads(counts.most_common(1)[0][0])
        if len(counts) > 1:
            split.append(f"{name} {key}: {len(configs)} runs chose {len(counts)} configs; kept the most common")
    return dict(choices), split


def _config(text: str) -> dict:
    """Triton's printed config ("BK: 64, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None") in fla's form."""
    fields = dict(item.split(": ", 1) for item in text.split(", "))
    value = {k: ast.literal_eval(v) for k, v in fields.items()}  # ints, None, True, 0.5
    own = ("num_warps", "num_ctas", "num_stages", "maxnreg")
    return {"kwargs": {k: v for k, v in value.items() if k not in own}, **{k: value.get(k) for k in own}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--child", default=None)  # internal: the second process writes its output here
    ap.add_argument("--from-logs", nargs="+", default=None,
                    help="no GPU work: the choices these logs of the model's runs printed (TRITON_PRINT_AUTOTUNING=1)")
    a = ap.parse_args()
    if a.from_logs:
        choices, split = choices_from_logs([open(f).read() for f in a.from_logs])
        for line in [*_write(a.out, choices), *split]:
            print("  ", line)
        _bundle(a.out, a.bundle)
        return
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
    _bundle(a.out, a.bundle)


def _bundle(out: str, bundle: str | None) -> None:
    """Every file of `out` in one JSON object (file name -> content), the device tool returning few files."""
    if bundle:
        files = sorted(f for f in os.listdir(out) if f.endswith(".json"))
        with open(bundle, "w") as f:
            json.dump({name: json.load(open(os.path.join(out, name))) for name in files}, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cold-"))
    main()
