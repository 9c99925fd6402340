"""What keeps a graph pool's large blocks allocated during bcg's and full's captures: Python tensors, or nothing
Python can see (a C++ owner).

    python3 scripts/pool_holders.py [--modes bcg,full] [--sizes 2048,1024] [--probe-layer 4]

At every call of the first linear-attention layer it records a weak reference to the op's `mixed_qkv` storage; at
a later linear layer (--probe-layer: its index among the linear layers), and at the end of the step, it prints
whether each storage recorded so far is still alive, then every allocated block of 8 MiB or more in a graph pool
with the frames that allocated it, the Python tensors over it (with their storages' use counts) and what refers to
those, a few levels up. It found the 32 MiB block `pool_profile.py` blamed on the first piece's projection to have
no tensor over it: cuBLAS's workspace (`hattn.runtime.graphs.warm_blas`).
"""
from __future__ import annotations

import argparse
import gc
import sys
import types

import torch
from torch.multiprocessing.reductions import StorageWeakRef

import hattn
from hattn.context import ForwardContext
from hattn.models.generate import last_rows, run_step
from hattn.models.presets import load
from hattn.ops import linear as linear_op

_RECORDED: list[tuple[str, StorageWeakRef, int, int]] = []  # (label, ref, data_ptr, nbytes)
_PASS = {"n": 0, "mode": ""}
_BIG = 8 * 2**20  # blocks reported


def _describe(obj) -> str:
    if isinstance(obj, types.FrameType):
        return f"frame {obj.f_code.co_filename.split('/')[-1]}:{obj.f_lineno} {obj.f_code.co_name}"
    if isinstance(obj, types.FunctionType):
        return f"function {obj.__qualname__}"
    if isinstance(obj, types.CellType):
        return "cell"
    if isinstance(obj, dict):
        return f"dict keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)):
        return f"{type(obj).__name__} len {len(obj)}"
    if isinstance(obj, torch.Tensor):
        return f"tensor {list(obj.shape)}"
    return type(obj).__qualname__


def _chain(obj, depth: int, skip: set, indent: str = "    ") -> None:
    if depth == 0:
        return
    for r in gc.get_referrers(obj):
        if id(r) in skip or isinstance(r, types.FrameType) and r.f_code.co_filename == __file__:
            continue
        print(f"{indent}<- {_describe(r)}")
        if not isinstance(r, (types.ModuleType, type)):
            _chain(r, depth - 1, skip | {id(r)}, indent + "  ")


def _report(where: str) -> None:
    capturing = torch.cuda.is_current_stream_capturing()
    print(f"-- {_PASS['mode']} pass {_PASS['n']} at {where} (capturing {capturing}, grad {torch.is_grad_enabled()})")
    for label, ref, ptr, nbytes in _RECORDED:
        print(f"  {label} ({nbytes / 2**20:.1f} MiB at {ptr:#x}): {'freed' if ref.expired() else 'ALIVE'}")
    try:
        snap = torch.cuda.memory._snapshot()
    except Exception as e:  # noqa: BLE001
        print(f"  no snapshot here: {e}")
        return
    tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter) and o.is_cuda]
    one = torch.empty(1, device="cuda")
    print(f"  (a storage held by one tensor has use count {torch._C._storage_Use_Count(one.untyped_storage()._cdata)})")
    for seg in snap["segments"]:
        if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0):
            continue
        for b in seg["blocks"]:
            if b["state"] == "inactive" or b["size"] < _BIG:
                continue
            lo, hi = b["address"], b["address"] + b["size"]
            frames = [f for f in b.get("frames", []) if "torch/" not in f["filename"]][:3]
            where_from = " <- ".join(f"{f['filename'].split('/')[-1]}:{f['line']}" for f in frames)
            over = [t for t in tensors if lo <= t.data_ptr() < hi]
            print(f"  pool {tuple(seg['segment_pool_id'])} block {b['size'] / 2**20:.1f} MiB {b['state']} "
                  f"from {where_from}: {len(over)} Python tensors over it")
            for t in over[:3]:
                st = t.untyped_storage()
                print(f"   tensor {list(t.shape)} {t.dtype}, storage {st.nbytes() / 2**20:.1f} MiB at "
                      f"{st.data_ptr():#x} use count {torch._C._storage_Use_Count(st._cdata)}")
                _chain(t, 3, {id(tensors), id(over), id(sys._getframe())})
            over = None
    tensors = None


def _wrap(fn, name: str, first: int, probe: int):
    def probed(mixed_qkv, *args):
        layer = args[5]  # (conv_weight, conv_bias, g, beta, out, layer_id, ...)
        if layer == first:
            _PASS["n"] += 1
            st = mixed_qkv.untyped_storage()
            label = f"{_PASS['mode']} pass {_PASS['n']} layer {layer} via {name} [{mixed_qkv.shape[0]} rows]"
            _RECORDED.append((label, StorageWeakRef(st), st.data_ptr(), st.nbytes()))
        elif layer == probe:
            _report(f"layer {layer} ({name})")
        return fn(mixed_qkv, *args)
    return probed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="bcg,full")
    ap.add_argument("--sizes", default="2048,1024")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--probe-layer", type=int, default=4, help="index among the linear layers")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    linear_layers = sorted(i for i, k in lm.layer_kinds.items() if k == "linear")
    first, probe = linear_layers[0], linear_layers[a.probe_layer]
    linear_op._cuda = _wrap(linear_op._cuda, "_cuda", first, probe)
    linear_op._captured = _wrap(linear_op._captured, "_captured", first, probe)
    cache = lm.make_cache(8, max(sizes) + 64)
    t = max(sizes)
    for mode in a.modes.split(","):
        _PASS.update(n=0, mode=mode)
        torch._dynamo.reset()
        be = hattn.backend(mode=mode, capture_sizes=sizes, progress=False, lazy_capture=False)
        model = torch.compile(lm, backend=be)
        torch.cuda.memory._record_memory_history(max_entries=100_000, stacks="python")
        ids = torch.randint(0, 1000, (t,), device="cuda")
        ctx = ForwardContext(seq_lens=[t], context_lens=[0], slots=[0], cache=cache, layer_kinds=lm.layer_kinds)
        run_step(model, ctx, ids, torch.arange(t, device="cuda"), last_rows([t], 8, "cuda"))
        torch.cuda.synchronize()
        print(f"== {mode}: pools {({k: round(v / 2**20, 1) for k, v in be.stats.pool_bytes_by_pool.items()})} MiB",
              flush=True)
        _report("the end of the step")
        torch.cuda.memory._record_memory_history(enabled=None)
        model = be = None
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
