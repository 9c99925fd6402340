"""Benchmark of the linear-attention kernels: `python3 -m hattn.kernels.bench` (CUDA; fla optional).

Decode step (batch 1..256) and packed prefill (512..16k tokens) for two layer shapes, Qwen3-Next's (16 key heads,
32 value heads, dim 128) and the 1B-class preset's (16/16 heads of 128), bf16 inputs, fp32 states:
ours vs fla vs the torch reference (reference at small sizes only).

Decode is timed as `mode="full"` runs it: one CUDA graph holding the step of K layers (each with its own states,
K * state >= 256 MB so states come from HBM, not L2), time per layer. Achieved bandwidth counts recurrent state
read+write, conv state read+write, inputs, outputs, weights; "xfloor" = time / (bytes / peak), the goal being
<= 1.2 at batch >= 32; peak is measured by a 1 GiB device copy (about 3.0 TB/s on the H100, 4.3 on the H200) unless
`--peak` gives it; "copy" times a plain copy of the same state bytes in the same harness (launch, ramp and tail
included), about the best a step can do at that size. A line fitted to time against batch over B = 32..128 splits
each into a fixed cost a step and a cost a sequence. fla decode = gather states
+ `fused_recurrent_gated_delta_rule` + scatter (no conv: fla has none indexed by slot). Prefill runs eagerly: "wall"
is triton's do_bench (host launch overhead included, L2 flushed), "gpu" the summed kernel time from torch.profiler;
fla prefill = fla's `causal_conv1d` + `chunk_gated_delta_rule` (q/k L2 norm in fla), given host and device
cu_seqlens built per call, as ours builds its `PackedBatch` per call (a model builds it once per step for all its
layers).
"""
from __future__ import annotations

import argparse
import statistics

import torch
import triton

from hattn.kernels.conv1d.reference import causal_conv1d_packed
from hattn.kernels.gated_delta.chunk import fla_chunk
from hattn.kernels.gated_delta.fused_decode import Launch, default_config, fused_gdn_decode
from hattn.kernels.gated_delta.packed import linear_attention_packed
from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed, linear_attention_decode_reference
from hattn.kernels.packing import PackedBatch

SHAPES = {"qwen3-next 16/32x128": (16, 32, 128), "1B-class 16/16x128": (16, 16, 128)}
WIDTH, DTYPE = 4, torch.bfloat16
DEV = "cuda"


def _us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def _gpu_us(fn, iters: int = 3) -> float:
    """Summed device time of the kernels (and copies) `fn` launches, per call, from torch.profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters


def _graph_us(calls, reps: int = 10) -> float:
    """Time per call of `calls` (one per layer) captured together in one CUDA graph and replayed."""
    for c in calls:  # warm-up: compiles, autotunes
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def measure_peak() -> float:
    """The device's memory bandwidth in TB/s: a 1 GiB device-to-device copy, bytes read + written."""
    a = torch.empty(1 << 28, device=DEV)
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.numel() * a.element_size() / ms / 1e9


def _fit(name, batches, times, floor_per_seq, what):
    """Time against batch over B = 32..128 as a line: the fixed cost of a step and the cost per sequence
    (B = 256 is left out: its harness holds one layer, K = 1, and its copy times are erratic)."""
    pts = [(b, t) for b, t in zip(batches, times) if 32 <= b <= 128 and isinstance(t, float)]
    if len(pts) >= 2:
        slope, icpt = statistics.linear_regression(*zip(*pts))
        print(f"{name:22} {what:>5}: {icpt:5.1f} us a step + {slope:6.3f} us a sequence "
              f"({slope / floor_per_seq:.2f}x the floor's), fit over B = 32..128")


def _try(timer, fn) -> float | str:
    try:
        return timer(fn)
    except Exception as e:  # a baseline that fails must not stop the table
        print(f"  ({type(e).__name__}: {str(e)[:100]})")
        return "error"


def _fmt(x) -> str:
    return f"{x:9.1f}" if isinstance(x, float) else f"{'-' if x is None else 'err':>9}"


def _layer(b, hk, hv, d, slots_total, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    c = 2 * hk * d + hv * d
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    return dict(mixed_qkv=r(b, c).to(DTYPE), conv_weight=(r(c, WIDTH) * 0.3).to(DTYPE), conv_bias=None,
                g=-torch.rand(b, hv, device=DEV, generator=gen) * 0.1,
                beta=torch.rand(b, hv, device=DEV, generator=gen).to(DTYPE),
                conv_state=r(slots_total, c, WIDTH - 1).to(DTYPE), rec_state=r(slots_total, hv, d, d) * 0.05)


def decode_bytes(b, hk, hv, d) -> int:
    c, e = 2 * hk * d + hv * d, DTYPE.itemsize
    return (b * hv * d * d * 4 * 2 + b * c * (WIDTH - 1) * e * 2 + b * c * e + b * hv * d * e + b * hv * (4 + e)
            + c * WIDTH * e + b * 8)


def _fla_decode(t, slots, hk, hv, d):
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    b = t["mixed_qkv"].shape[0]
    q, k, v = t["mixed_qkv"].split([hk * d, hk * d, hv * d], -1)
    q, k, v = q.view(b, 1, hk, d), k.view(b, 1, hk, d), v.view(b, 1, hv, d)

    def run():
        h0 = t["rec_state"].index_select(0, slots)
        _, ht = fused_recurrent_gated_delta_rule(q, k, v, g=t["g"][:, None], beta=t["beta"][:, None],
                                                 initial_state=h0, output_final_state=True,
                                                 use_qk_l2norm_in_kernel=True)
        t["rec_state"].index_copy_(0, slots, ht)
    return run


def _decode_layers(b, hk, hv, d):
    """K layers' inputs and states (K * state bytes >= 256 MB, K <= 64), with their slots and out buffers."""
    k = max(1, min(64, -(-(256 << 20) // (b * hv * d * d * 4))))
    layers = [_layer(b, hk, hv, d, b + 1, seed=i) for i in range(k)]
    for t in layers:
        t["slots"] = torch.randperm(b, device=DEV)
        t["out"] = torch.empty(b, hv, d, device=DEV, dtype=DTYPE)
    return layers


def _copy_us(layers) -> float:
    """A plain device copy of each layer's recurrent-state bytes, in the same graph harness: the same traffic as
    the step's state read + write, with a copy kernel's launch, ramp and tail: what this size costs at best."""
    pairs = [(t["rec_state"][:t["out"].shape[0]], torch.empty_like(t["rec_state"][:t["out"].shape[0]]))
             for t in layers]
    return _graph_us([lambda s=s, d=d: d.copy_(s) for s, d in pairs])


def _ours(t, hk, d, config=None):
    return lambda: fused_gdn_decode(num_k_heads=hk, head_k_dim=d, config=config, **t)


def _reference(t, hk, d):
    return lambda: linear_attention_decode_reference(num_k_heads=hk, head_k_dim=d, **t)


def bench_decode(batches, peak):
    print(f"\n## decode step per layer in a CUDA graph (bf16 in, fp32 state), peak {peak:.1f} TB/s; times in us")
    print("(copy: a plain device copy of the same state bytes in the same harness; xcopy = ours / copy)")
    print(f"{'shape':22} {'B':>4} {'ours':>9} {'fla':>9} {'torch':>9} {'copy':>9} {'fla/ours':>8} {'torch/ours':>10} "
          f"{'GB/s':>7} {'%peak':>6} {'xfloor':>6} {'xcopy':>6}")
    for name, (hk, hv, d) in SHAPES.items():
        times = []
        for b in batches:
            layers = _decode_layers(b, hk, hv, d)
            ours, copy = _graph_us([_ours(t, hk, d) for t in layers]), _copy_us(layers)
            fla = None
            if fla_chunk() is not None:
                fla = _try(_graph_us, [_fla_decode(t, t["slots"], hk, hv, d) for t in layers])
            ref = _try(_graph_us, [_reference(t, hk, d) for t in layers]) if b <= 32 else None
            gbs = decode_bytes(b, hk, hv, d) / ours / 1e3
            ratio = lambda x: f"{x / ours:8.2f}" if isinstance(x, float) else f"{'-':>8}"  # noqa: E731
            print(f"{name:22} {b:4d} {_fmt(ours)} {_fmt(fla)} {_fmt(ref)} {_fmt(copy)} {ratio(fla)} {ratio(ref):>10} "
                  f"{gbs:7.0f} {gbs / peak / 10:6.1f} {peak * 1e3 / gbs:6.2f} {ours / copy:6.2f}", flush=True)
            times.append((ours, copy))
            del layers
        per_seq = (decode_bytes(2, hk, hv, d) - decode_bytes(1, hk, hv, d)) / peak / 1e6
        for i, what in enumerate(("ours", "copy")):
            _fit(name, batches, [t[i] for t in times], per_seq, what)


def _name(c: Launch) -> str:
    return f"{'staged' if c.staged else 'fused'} {c.bv}/{c.warps}"


def bench_decode_configs(batches, configs, peak):
    """Launch forms of the decode step (`Launch`): staged or fused, BV/warps."""
    configs = [Launch(*c) for c in configs]
    for name, (hk, hv, d) in SHAPES.items():
        print(f"\n## decode launch forms at {name}; default in a graph {_name(default_config(1, hk, hv, d, d))}, "
              f"between graphs {_name(default_config(1, hk, hv, d, d, eager=True))} below B*Hk=512 and "
              f"{_name(default_config(512, hk, hv, d, d, eager=True))} above; us (xfloor)")
        print(f"{'B':>4} " + " ".join(f"{_name(c):>16}" for c in configs))
        for b in batches:
            layers = _decode_layers(b, hk, hv, d)
            floor = decode_bytes(b, hk, hv, d) / peak / 1e6
            row = [_try(_graph_us, [_ours(t, hk, d, c) for t in layers]) for c in configs]
            print(f"{b:4d} " + " ".join(f"{x:8.1f} ({x / floor:4.2f})" if isinstance(x, float) else f"{'err':>16}"
                                        for x in row), flush=True)
            del layers


def _fla_prefill(t, n, hk, hv, d):
    from fla.modules.causal_conv1d import causal_conv1d

    h0 = t["rec_state"][:1].clone()

    def run():
        cu_cpu = torch.tensor([0, n])
        cu = cu_cpu.to(DEV, non_blocking=True)
        y, _ = causal_conv1d(t["mixed_qkv"][None], t["conv_weight"], None, initial_state=None,
                             output_final_state=True, activation="silu", cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
        q, k, v = y[0].split([hk * d, hk * d, hv * d], -1)
        fla_chunk()(q.view(1, n, hk, d), k.view(1, n, hk, d), v.view(1, n, hv, d), g=t["g"][None],
                    beta=t["beta"][None], initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                    cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
    return run


def bench_prefill(lengths, ref_max):
    print("\n## prefill, one sequence continuing from its cache slot (bf16 in, fp32 state); times in us")
    print(f"{'shape':22} {'T':>6} {'ours wall':>9} {'fla wall':>9} {'torch':>9} {'ours gpu':>9} {'fla gpu':>9} "
          f"{'fla/ours wall':>13} {'fla/ours gpu':>12}")
    for name, (hk, hv, d) in SHAPES.items():
        for n in lengths:
            t = _layer(n, hk, hv, d, 2)
            out = torch.empty(n, hv, d, device=DEV, dtype=DTYPE)
            args = (t["mixed_qkv"], t["conv_weight"], None, t["g"], t["beta"], out, (t["conv_state"], t["rec_state"]))
            ours = lambda: linear_attention_packed(*args, PackedBatch.build([n], DEV, [1], [5]), hk, d)  # noqa: E731
            wall, gpu = _us(ours), _try(_gpu_us, ours)
            fla_wall = fla_gpu = None
            if fla_chunk() is not None:
                fla = _fla_prefill(t, n, hk, hv, d)
                fla_wall, fla_gpu = _try(_us, fla), _try(_gpu_us, fla)
            ref = _try(_us, lambda: _torch_prefill(t, n, hk, hv, d)) if n <= ref_max else None
            ratio = lambda x, y: f"{x / y:.2f}" if isinstance(x, float) and isinstance(y, float) else "-"  # noqa: E731
            print(f"{name:22} {n:6d} {_fmt(wall)} {_fmt(fla_wall)} {_fmt(ref)} {_fmt(gpu)} {_fmt(fla_gpu)} "
                  f"{ratio(fla_wall, wall):>13} {ratio(fla_gpu, gpu):>12}", flush=True)
            del t


def _torch_prefill(t, n, hk, hv, d):
    x = causal_conv1d_packed(t["mixed_qkv"], t["conv_weight"], None, [0, n], t["conv_state"], [1], [True])
    q, k, v = x.split([hk * d, hk * d, hv * d], -1)
    chunk_gated_delta_rule_packed(q.view(n, hk, d), k.view(n, hk, d), v.view(n, hv, d), t["g"], t["beta"], [0, n],
                                  t["rec_state"], [1], [True])


def accuracy():
    """Max abs errors of our CUDA paths vs the fp32 torch references at Qwen3-Next's shape (bf16 inputs)."""
    hk, hv, d = SHAPES["qwen3-next 16/32x128"]
    print("\n## accuracy vs fp32 torch reference (qwen3-next shape, bf16 inputs)")
    for kind, n in (("decode B=64", 64), ("prefill T=1000", 1000)):
        t = _layer(n, hk, hv, d, n + 1 if kind.startswith("decode") else 2, seed=1)
        f = {k: None if v is None else v.float().clone() for k, v in t.items()}
        out, want = torch.empty(n, hv, d, device=DEV, dtype=DTYPE), torch.empty(n, hv, d, device=DEV)
        if kind.startswith("decode"):
            slots = torch.randperm(n + 1, device=DEV)[:n]
            fused_gdn_decode(out=out, slots=slots, num_k_heads=hk, head_k_dim=d, **t)
            linear_attention_decode_reference(out=want, slots=slots, num_k_heads=hk, head_k_dim=d, **f)
        else:
            linear_attention_packed(t["mixed_qkv"], t["conv_weight"], None, t["g"], t["beta"], out,
                                    (t["conv_state"], t["rec_state"]), PackedBatch.build([n], DEV, [1], [5]), hk, d)
            x = causal_conv1d_packed(f["mixed_qkv"], f["conv_weight"], None, [0, n], f["conv_state"], [1], [True])
            q, k, v = x.split([hk * d, hk * d, hv * d], -1)
            want = chunk_gated_delta_rule_packed(q.view(n, hk, d), k.view(n, hk, d), v.view(n, hv, d), f["g"],
                                                 f["beta"], [0, n], f["rec_state"], [1], [True])
        o_err = (out.float() - want).abs().max().item() / want.abs().max().item()
        s_err = (t["rec_state"] - f["rec_state"]).abs().max().item() / f["rec_state"].abs().max().item()
        print(f"{kind:16} out max|err|/max|ref| {o_err:.2e}   state max|err|/max|ref| {s_err:.2e}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak", type=float, default=None,
                   help="GPU memory bandwidth in TB/s for the floor (default: measured by a 1 GiB device copy)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    p.add_argument("--ref-max", type=int, default=2048, help="largest prefill length the torch reference runs")
    p.add_argument("--sweep", action="store_true", help="also sweep the decode kernel's launch forms")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("hattn.kernels.bench needs a CUDA GPU (the kernels are Triton); run it on the device machine")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"fla {'yes' if fla_chunk() is not None else 'not installed'}")
    torch.manual_seed(0)
    peak = a.peak or measure_peak()
    print(f"peak memory bandwidth {peak:.2f} TB/s ({'given' if a.peak else 'measured: 1 GiB device copy'})")
    accuracy()
    bench_decode(a.batches, peak)
    bench_prefill(a.lengths, a.ref_max)
    if a.sweep:
        bench_decode_configs([1, 8, 16, 32, 64, 256], [(32, 4), (64, 4), (64, 4, True), (32, 4, True), (64, 8, True),
                                                       (16, 2, True)], peak)


if __name__ == "__main__":
    main()
