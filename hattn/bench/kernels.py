"""`hattn bench --suite kernels`: each kernel alone at the model shapes, its implementations side by side (columns:
ours, fla, torch reference, a plain copy of the same bytes), every row against its bytes floor.

A workload is a name, its points and its implementations. Each point says the bytes one call must move and how
many layer copies (`calls`) are timed together: each copy has its own inputs and states, >= 256 MiB in all, so they
come from HBM and not from L2. An implementation maps (point, device) to one zero-argument call per copy, or
raises Skip. On a GPU a decode workload's calls are captured in one CUDA graph and replayed, as `mode="full"`
runs them; a prefill workload's are launched eagerly, as every mode runs them. The figure is per call.

    register(KernelWorkload("gemm", points=..., impls={"cublas": ..., "ours": ...}))   # a new workload
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hattn.bench.floor import state_bytes
from hattn.bench.harness import Skip
from hattn.bench.target import Target
from hattn.bench.workloads import Point
from hattn.context import LayerSpec
from hattn.ops import full, linear

COPIES_BYTES, MAX_COPIES = 256 << 20, 64
DTYPE, WIDTH = torch.bfloat16, 4
GDN_SHAPES = {"qwen3-next": (16, 32, 128), "1B": (16, 16, 128)}  # key heads, value heads, head dim
ATTN_SHAPE = (8, 2, 256)                                         # qwen3.5-1b: Hq, Hkv, D


@dataclass(frozen=True)
class KernelWorkload:
    """name: the points' kind; points(quick, device) -> rows; impls: column name -> (point, device) -> calls;
    graph: time the calls inside one CUDA graph (on a GPU)."""

    name: str
    points: Callable[[bool, torch.device], list[Point]]
    impls: dict[str, Callable[[Point, torch.device], list[Callable[[], object]]]]
    graph: bool = True


WORKLOADS: dict[str, KernelWorkload] = {}


def register(workload: KernelWorkload) -> KernelWorkload:
    WORKLOADS[workload.name] = workload
    return workload


def copies(nbytes: int, device: torch.device) -> int:
    """Layer copies timed together: enough to pass 256 MiB on a GPU (at most 64); one on a CPU."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_COPIES, -(-COPIES_BYTES // max(nbytes, 1))))


def impl_names(workloads: list[str]) -> list[str]:
    """Every implementation of the workloads, in order of first appearance: the suite's columns."""
    names: list[str] = []
    for w in workloads:
        names += [n for n in WORKLOADS[w].impls if n not in names]
    return names


class KernelImpl(Target):
    """One implementation (column) over every kernel workload that has it."""

    kind, warmup, est_s = "kernel", 2, (5.0, 1.0)

    def __init__(self, setup, name: str):
        super().__init__(setup)
        self.name, self.about = name, f"kernel implementation {name!r}"

    def step(self, point: Point):
        workload = WORKLOADS[point.kind]
        if self.name not in workload.impls:
            raise Skip(f"{point.kind} has no {self.name!r} implementation")
        calls = workload.impls[self.name](point, self.s.device)
        if workload.graph and self.s.device.type == "cuda":
            return _in_graph(calls)
        return lambda: [c() for c in calls]


def _in_graph(calls: list[Callable[[], object]]) -> Callable[[], None]:
    """A step that replays one CUDA graph of `calls`; the first step runs each once (compile, autotune), captures."""
    graph = None

    def step():
        nonlocal graph
        if graph is None:
            for c in calls:
                c()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
        graph.replay()
    return step


def graph_us(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """Device us per call: `calls` captured in one CUDA graph (`_in_graph`), replayed `reps` times between events
    (scripts' sweeps and A/Bs)."""
    step = _in_graph(calls)
    step()  # runs each call once, captures, replays
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * len(calls))


def _need_triton(device: torch.device) -> None:
    from hattn.kernels.launch import has_triton

    if device.type != "cuda" or not has_triton():
        raise Skip("our Triton kernels need a CUDA device with triton installed")


def _need_fla() -> None:
    from hattn.kernels.gated_delta.chunk import fla_chunk

    if fla_chunk() is None:
        raise Skip("flash-linear-attention is not installed (pip install fla-core)")


# -- gated delta net: decode step and packed prefill ----------------------------------------------------------------
def _gdn_spec(shape: str) -> tuple[tuple[int, int, int], LayerSpec]:
    hk, hv, d = GDN_SHAPES[shape]
    return (hk, hv, d), linear.cache_spec(2 * hk * d + hv * d, WIDTH, hv, d, d)


def _gdn_layer(rows: int, shape: str, slots: int, device, seed: int) -> dict:
    """One layer's inputs for `rows` tokens and its conv and recurrent states of `slots` slots."""
    (hk, hv, d), _ = _gdn_spec(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    c = 2 * hk * d + hv * d

    def r(*s):
        return torch.randn(*s, device=device, generator=gen)
    return dict(mixed_qkv=r(rows, c).to(DTYPE), conv_weight=(r(c, WIDTH) * 0.3).to(DTYPE), conv_bias=None,
                g=-torch.rand(rows, hv, device=device, generator=gen) * 0.1,
                beta=torch.rand(rows, hv, device=device, generator=gen).to(DTYPE),
                conv_state=r(slots, c, WIDTH - 1).to(DTYPE), rec_state=r(slots, hv, d, d) * 0.05)


def _gdn_io_bytes(rows: int, shape: str) -> int:
    """Inputs, outputs and conv weight of `rows` tokens: mixed_qkv, out, g (fp32), beta, the conv weight."""
    (hk, hv, d), _ = _gdn_spec(shape)
    c, e = 2 * hk * d + hv * d, DTYPE.itemsize
    return rows * (c * e + hv * d * e + hv * (4 + e)) + c * WIDTH * e


def gdn_decode_points(quick: bool, device: torch.device) -> list[Point]:
    """B sequences, one token each: state read + write (floor.state_bytes) plus inputs and outputs."""
    shapes, batches = (["1B"], [1, 4]) if quick else (list(GDN_SHAPES), [1, 8, 32, 64, 128, 256])
    out = []
    for shape in shapes:
        for b in batches:
            nbytes = state_bytes({0: _gdn_spec(shape)[1]}, b, 0, DTYPE.itemsize) + _gdn_io_bytes(b, shape)
            out.append(Point("gdn-decode", shape=shape, batch=b, bytes=nbytes, calls=copies(nbytes, device)))
    return out


def _gdn_decode_layers(point: Point, device) -> list[dict]:
    layers = [_gdn_layer(point.batch, point.shape, point.batch + 1, device, seed=i) for i in range(point.calls)]
    for t in layers:
        t["slots"] = torch.randperm(point.batch, device=device)
        t["out"] = torch.empty(point.batch, GDN_SHAPES[point.shape][1], GDN_SHAPES[point.shape][2], device=device,
                               dtype=DTYPE)
    return layers


def _gdn_decode(fn) -> Callable[[Point, torch.device], list]:
    """An implementation calling fn(layer inputs, hk, d) on each layer copy."""
    def build(point: Point, device) -> list:
        hk, _, d = GDN_SHAPES[point.shape]
        return [lambda t=t: fn(t, hk, d) for t in _gdn_decode_layers(point, device)]
    return build


def _gdn_decode_ours(point: Point, device) -> list:
    _need_triton(device)
    from hattn.kernels.gated_delta.fused_decode import fused_gdn_decode

    return _gdn_decode(lambda t, hk, d: fused_gdn_decode(num_k_heads=hk, head_k_dim=d, **t))(point, device)


def _gdn_decode_fla(point: Point, device) -> list:
    """fla's fused recurrent step on states gathered from the slots and scattered back (fla has no conv by slot)."""
    _need_fla()
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    def run(t, hk, d):
        b, hv = t["g"].shape
        q, k, v = t["mixed_qkv"].split([hk * d, hk * d, hv * d], -1)
        h0 = t["rec_state"].index_select(0, t["slots"])
        _, ht = fused_recurrent_gated_delta_rule(q.view(b, 1, hk, d), k.view(b, 1, hk, d), v.view(b, 1, hv, d),
                                                 g=t["g"][:, None], beta=t["beta"][:, None], initial_state=h0,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
        t["rec_state"].index_copy_(0, t["slots"], ht)
    return _gdn_decode(run)(point, device)


def _gdn_decode_torch(point: Point, device) -> list:
    from hattn.kernels.gated_delta.reference import linear_attention_decode_reference

    return _gdn_decode(lambda t, hk, d: linear_attention_decode_reference(num_k_heads=hk, head_k_dim=d, **t))(
        point, device)


def _gdn_decode_copy(point: Point, device) -> list:
    """A plain copy of each layer's recurrent-state rows: the step's state traffic with nothing else."""
    pairs = [(t["rec_state"][:point.batch], torch.empty_like(t["rec_state"][:point.batch]))
             for t in _gdn_decode_layers(point, device)]
    return [lambda s=s, d=d: d.copy_(s) for s, d in pairs]


def gdn_prefill_points(quick: bool, device: torch.device) -> list[Point]:
    """One sequence of T tokens continuing from its slot: state read + write plus inputs and outputs."""
    shapes, lengths = (["1B"], [64, 256]) if quick else (list(GDN_SHAPES), [512, 2048, 8192, 16384])
    out = []
    for shape in shapes:
        for n in lengths:
            nbytes = state_bytes({0: _gdn_spec(shape)[1]}, 1, 0, DTYPE.itemsize) + _gdn_io_bytes(n, shape)
            out.append(Point("gdn-prefill", shape=shape, tokens=n, seqs=1, bytes=nbytes, calls=copies(nbytes, device)))
    return out


def _gdn_prefill(fn) -> Callable[[Point, torch.device], list]:
    """An implementation calling fn(layer inputs, T, hk, hv, d) on each layer copy (slot 1 of 2, continued)."""
    def build(point: Point, device) -> list:
        hk, hv, d = GDN_SHAPES[point.shape]
        layers = [_gdn_layer(point.tokens, point.shape, 2, device, seed=i) for i in range(point.calls)]
        return [lambda t=t: fn(t, point.tokens, hk, hv, d) for t in layers]
    return build


def _gdn_prefill_ours(point: Point, device) -> list:
    _need_triton(device)
    from hattn.kernels.gated_delta.packed import linear_attention_packed
    from hattn.kernels.packing import PackedBatch

    def run(t, n, hk, hv, d):
        out = torch.empty(n, hv, d, device=t["g"].device, dtype=DTYPE)
        linear_attention_packed(t["mixed_qkv"], t["conv_weight"], None, t["g"], t["beta"], out,
                                (t["conv_state"], t["rec_state"]), PackedBatch.build([n], out.device, [1], [5]), hk, d)
    return _gdn_prefill(run)(point, device)


def _gdn_prefill_fla(point: Point, device) -> list:
    """fla's causal_conv1d + chunk_gated_delta_rule (q/k L2 norm in fla), cu_seqlens built per call as ours."""
    _need_fla()
    from fla.modules.causal_conv1d import causal_conv1d

    from hattn.kernels.gated_delta.chunk import fla_chunk

    def run(t, n, hk, hv, d):
        cu_cpu = torch.tensor([0, n])
        cu = cu_cpu.to(t["g"].device, non_blocking=True)
        y, _ = causal_conv1d(t["mixed_qkv"][None], t["conv_weight"], None, initial_state=None,
                             output_final_state=True, activation="silu", cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
        q, k, v = y[0].split([hk * d, hk * d, hv * d], -1)
        fla_chunk()(q.view(1, n, hk, d), k.view(1, n, hk, d), v.view(1, n, hv, d), g=t["g"][None],
                    beta=t["beta"][None], initial_state=t["rec_state"][1:2], output_final_state=True,
                    use_qk_l2norm_in_kernel=True, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu)
    return _gdn_prefill(run)(point, device)


def _gdn_prefill_torch(point: Point, device) -> list:
    if point.tokens > 2048:
        raise Skip("the torch reference runs up to 2048 tokens (a chunk loop on the host)")
    from hattn.kernels.conv1d.reference import causal_conv1d_packed
    from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed

    def run(t, n, hk, hv, d):
        x = causal_conv1d_packed(t["mixed_qkv"], t["conv_weight"], None, [0, n], t["conv_state"], [1], [True])
        q, k, v = x.split([hk * d, hk * d, hv * d], -1)
        chunk_gated_delta_rule_packed(q.view(n, hk, d), k.view(n, hk, d), v.view(n, hv, d), t["g"], t["beta"],
                                      [0, n], t["rec_state"], [1], [True])
    return _gdn_prefill(run)(point, device)


# -- decode attention over the KV cache ------------------------------------------------------------------------------
def attn_decode_points(quick: bool, device: torch.device) -> list[Point]:
    """B sequences at `context` cached tokens: the K/V rows attended (floor.state_bytes), q and out."""
    hq, hkv, d = ATTN_SHAPE
    contexts, batches = ([64], [1, 4]) if quick else ([1024, 8192], [1, 4, 16, 64])
    spec = {0: full.cache_spec(hkv, d)}
    out = []
    for c in contexts:
        for b in batches:
            nbytes = state_bytes(spec, b, c, DTYPE.itemsize) + 2 * b * hq * d * DTYPE.itemsize
            out.append(Point("attn-decode", batch=b, context=c, bytes=nbytes, calls=copies(nbytes, device)))
    return out


def _attn_decode(fn) -> Callable[[Point, torch.device], list]:
    """An implementation calling fn(q, k_cache, v_cache, slots, context_lens, out, scale) on each layer copy."""
    def build(point: Point, device) -> list:
        hq, hkv, d = ATTN_SHAPE
        b, c = point.batch, point.context
        gen = torch.Generator(device=device).manual_seed(0)
        slots = torch.randperm(b, device=device, generator=gen)
        lens = torch.full((b,), c, dtype=torch.long, device=device)
        calls = []
        for _ in range(point.calls):
            q = torch.randn(b, hq, d, device=device, generator=gen).to(DTYPE)
            k, v = (torch.randn(b + 1, c + 1, hkv, d, device=device, generator=gen).to(DTYPE) for _ in range(2))
            out = torch.empty_like(q)
            calls.append(lambda q=q, k=k, v=v, out=out: fn(q, k, v, slots, lens, out, d ** -0.5))
        return calls
    return build


def _attn_decode_ours(point: Point, device) -> list:
    _need_triton(device)
    from hattn.kernels.attention.decode_triton import decode_attention

    return _attn_decode(decode_attention)(point, device)


def _attn_decode_torch(point: Point, device) -> list:
    from hattn.kernels.attention.decode import decode_attention_reference

    return _attn_decode(decode_attention_reference)(point, device)


# -- small-M GEMMs: the decode step's linears ------------------------------------------------------------------------
# (K, N) of the qwen3.5-1b decode step's linears (hidden 1024); "-fused": as the same-input fusion makes them
GEMM_SHAPES = {"gdn-qkv": (1024, 6144), "gdn-z": (1024, 2048), "gdn-ab": (1024, 16),
               "gdn-fused": (1024, 6144 + 2048 + 16 + 16), "out-proj": (2048, 1024), "attn-q": (1024, 4096),
               "attn-kv": (1024, 512), "attn-fused": (1024, 4096 + 512 + 512), "mlp-up": (1024, 3584),
               "mlp-fused": (1024, 7168), "mlp-down": (3584, 1024), "lm-head": (1024, 248320)}


def gemm_points(quick: bool, device: torch.device) -> list[Point]:
    """y[M, N] = x[M, K] w[N, K]^T at decode's M (`batch`): the weight, x and y read or written once."""
    shapes, ms = (["mlp-down"], [1, 4]) if quick else (list(GEMM_SHAPES), [1, 16, 64])
    out = []
    for shape in shapes:
        k, n = GEMM_SHAPES[shape]
        for m in ms:
            nbytes = (n * k + m * (k + n)) * DTYPE.itemsize
            out.append(Point("gemm", shape=shape, batch=m, bytes=nbytes, calls=copies(nbytes, device)))
    return out


def _gemm(fn) -> Callable[[Point, torch.device], list]:
    """An implementation calling fn(x, weight) on each weight copy."""
    def build(point: Point, device) -> list:
        k, n = GEMM_SHAPES[point.shape]
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(point.batch, k, device=device, generator=gen).to(DTYPE)
        weights = [(torch.randn(n, k, device=device, generator=gen) * k ** -0.5).to(DTYPE) for _ in range(point.calls)]
        return [lambda w=w: fn(x, w) for w in weights]
    return build


def _gemm_ours(point: Point, device) -> list:
    """The Triton skinny GEMM at its default launch (hattn_kernels::linear picks it or cuBLAS per shape)."""
    _need_triton(device)
    from hattn.kernels.gemm.skinny import skinny_linear

    return _gemm(skinny_linear)(point, device)


register(KernelWorkload("gdn-decode", gdn_decode_points, {"ours": _gdn_decode_ours, "fla": _gdn_decode_fla,
                                                          "torch": _gdn_decode_torch, "copy": _gdn_decode_copy}))
register(KernelWorkload("gdn-prefill", gdn_prefill_points, {"ours": _gdn_prefill_ours, "fla": _gdn_prefill_fla,
                                                            "torch": _gdn_prefill_torch}, graph=False))
register(KernelWorkload("attn-decode", attn_decode_points, {"ours": _attn_decode_ours, "torch": _attn_decode_torch}))
register(KernelWorkload("gemm", gemm_points, {"ours": _gemm_ours, "torch": _gemm(torch.nn.functional.linear)}))
