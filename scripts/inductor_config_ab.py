"""Inductor settings for the pieces of a step, A/B in one process (issue 17: fewer kernels a step).

    python3 scripts/inductor_config_ab.py [--modes full] [--batches 1,16] [--context 1024] [--prefill 256,1024]
                                          [--variants base,combo]

Per variant, one compiled model whose CUDA pieces inductor compiled under that variant's settings
(`hattn.compiler.backend.COMBO_KERNELS`, and inductor settings patched around the compile; all alive at once, each
called through hattn's dispatch after its first calls); then rounds over the variants: ms a decode step (and a
one-prompt prefill of each --prefill size) as the bench times it (CUDA events around `run_step` after a sync), the
step's kernel launches and GPU busy time under torch.profiler, and its logits against the first variant's from the
same cache contents.
  base          combo kernels off (before session 48)
  combo         `combo_kernels` on every CUDA piece: independent kernels fused horizontally (q's and k's norms, ...)
  combo-static  only on pieces of static shapes (the one-token decode graph): hattn's default
  cdt           `coordinate_descent_tuning` (combo off): inductor tunes each kernel's block sizes
"""
from __future__ import annotations

import argparse
import importlib
import time
import traceback

import torch
from torch._inductor import config as inductor_config

import hattn
from hattn.bench.runner import detach_profiler_after_use
from hattn.compiler import backend as backend_module
from hattn.context import ForwardContext
from hattn.models.presets import load

from dispatch_ab import busy_us, decode_step, step_ms  # scripts/ is on sys.path when run as a script

generate = importlib.import_module("hattn.models.generate")  # the module (the package exports a function)

VARIANTS = {"base": ("off", {}), "combo": ("all", {}), "combo-static": ("static", {}),
            "cdt": ("off", {"coordinate_descent_tuning": True})}


def launches_and_busy(step) -> tuple[float, float]:
    """(kernel launches, GPU busy us) a step, over 5 calls under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = [(e.time_range.start, e.time_range.end) for e in events]
    kernels = sum(1 for e in events if "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    return kernels / 5, busy_us(spans) / 5


def main() -> None:
    detach_profiler_after_use()
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="full")
    ap.add_argument("--variants", default="base,combo,cdt,combo+cdt")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", default="", help="prompt lengths of one-prompt prefill steps to time too")
    ap.add_argument("--preset", default="qwen3.5-1b")
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    prompts = [int(t) for t in a.prefill.split(",") if t]
    lm = load(a.preset, dtype=torch.bfloat16, device="cuda")
    cache = lm.make_cache(max(batches), max([a.context + 8, *prompts]))
    snapshot = {i: tuple(t.clone() for t in ts) for i, ts in cache._tensors.items()}
    inputs = {b: {pad: (torch.randint(0, 1000, (b + pad,), device="cuda"),
                        torch.full((b + pad,), a.context, dtype=torch.long, device="cuda")) for pad in (0, 1)}
              for b in batches}
    rows = {b: generate.decode_rows(b, cache.slots, "cuda") for b in batches}

    prompt_inputs = {t: (torch.randint(0, 1000, (t,), device="cuda"), torch.arange(t, device="cuda"))
                     for t in prompts}

    points = [("decode", b) for b in batches] + [("prefill", t) for t in prompts]

    def step(model, point):
        kind, n = point
        if kind == "prefill":  # n tokens of one new sequence in slot 0
            ctx = ForwardContext(seq_lens=[n], context_lens=[0], slots=[0], cache=cache, layer_kinds=lm.layer_kinds)
            return generate.run_step(model, ctx, *prompt_inputs[n], generate.last_rows([n], cache.slots, "cuda"))
        return decode_step(model, lm, cache, a.context, n, inputs[n], rows[n])

    def restore():
        for i, ts in cache._tensors.items():
            for t, saved in zip(ts, snapshot[i]):
                t.copy_(saved)

    for mode in a.modes.split(","):
        models = {}
        for v in a.variants.split(","):
            t0 = time.perf_counter()
            try:
                backend_module.COMBO_KERNELS, settings = VARIANTS[v]
                sizes = sorted({*batches, *prompts})
                with inductor_config.patch(settings):
                    model = torch.compile(lm, backend=hattn.backend(mode=mode, progress=False, capture_sizes=sizes))
                    for point in points:
                        for _ in range(3):
                            step(model, point)
            except Exception:
                print(f"== {mode} {v}: FAILED\n{traceback.format_exc()[-3000:]}", flush=True)
                continue
            models[v] = model
            print(f"== {mode} {v}: compile + capture + first calls {time.perf_counter() - t0:.1f} s", flush=True)
        first = next(iter(models), None)
        for b in points:
            logits = {}
            for v, model in models.items():
                restore()
                logits[v] = step(model, b).float().clone()
            times = {v: [] for v in models}
            for _ in range(3):
                for v, model in models.items():
                    step(model, b)
                    times[v].append(step_ms(lambda: step(model, b), a.reps)[0])
            for v, model in models.items():
                n, busy = launches_and_busy(lambda: step(model, b))
                diff = (logits[v] - logits[first]).abs().max().item()
                what = f"prefill {b[1]}" if b[0] == "prefill" else f"B={b[1]} ctx={a.context}"
                print(f"{mode} {what} {v:10s}: ms/step {' / '.join(f'{t:.3f}' for t in times[v])}"
                      f" | {n:.0f} kernels, GPU busy {busy / 1e3:.3f} ms/step | logits max |diff| vs {first} "
                      f"{diff:.3g}", flush=True)
        models.clear()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
