"""GPU paths of the linear-attention op vs the plain-torch references: packed prefill (Triton conv + fla's chunked
rule, or the torch chunked reference without fla), the batched decode step through dispatch (padding rows zero),
the decode step captured in a CUDA graph (other slots untouched), and the fla facts our wrapper relies on.

fla runs at the benchmark's layer shapes in bf16 only: each new (heads, dims, dtype) costs fla a minute of
autotuning. Tolerance for fla (bf16 tensor-core math): relative error 3e-2 on outputs and states.
"""
from __future__ import annotations

import logging

import pytest
import torch

from hattn.kernels.conv1d.reference import causal_conv1d_packed
from hattn.kernels.gated_delta.decode import linear_attention_decode
from hattn.kernels.gated_delta.chunk import fla_chunk
from hattn.kernels.gated_delta.reference import chunk_gated_delta_rule_packed, linear_attention_decode_reference
from hattn.kernels.launch import warn_reference
from hattn.context import ForwardContext, forward_context

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_fla = pytest.mark.skipif(fla_chunk() is None, reason="flash-linear-attention not installed")
SHAPES = [(16, 32, 128), (16, 16, 128)]  # (Hk, Hv, D): Qwen3-Next's linear layers; the 1B-class preset's


class _Cache:
    def __init__(self, slots, conv_dim, kernel, hv, dk, dv, dtype, seed=0):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.conv = torch.randn(slots, conv_dim, kernel - 1, device="cuda", generator=gen).to(dtype)
        self.rec = torch.randn(slots, hv, dk, dv, device="cuda", generator=gen) * 0.1

    def state(self, layer_id):
        return self.conv, self.rec


def _inputs(t, hk, hv, dk, dv, kernel, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    c = 2 * hk * dk + hv * dv
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    return (r(t, c).to(dtype), (r(c, kernel) * 0.3).to(dtype), -torch.rand(t, hv, device="cuda", generator=gen),
            torch.rand(t, hv, device="cuda", generator=gen).to(dtype))


def _reference(mixed, w, g, beta, cache, ctx, hk, dk):
    """Packed fp32 references on copies of the states; returns (out, conv, rec)."""
    conv, rec = cache.conv.float().clone(), cache.rec.clone()
    hv, dv = rec.shape[1], rec.shape[3]
    cu = [0]
    for n in ctx.seq_lens:
        cu.append(cu[-1] + n)
    has = [c > 0 for c in ctx.context_lens]
    x = causal_conv1d_packed(mixed[:cu[-1]].float(), w.float(), None, cu, conv, ctx.slots, has)
    q, k, v = x.split([hk * dk, hk * dk, hv * dv], -1)
    t = cu[-1]
    out = chunk_gated_delta_rule_packed(q.reshape(t, hk, dk), k.reshape(t, hk, dk), v.reshape(t, hv, dv),
                                        g[:t], beta[:t].float(), cu, rec, ctx.slots, has)
    return out, conv, rec


def _rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _prefill(hk, hv, d, dtype, lens, past, slots, seed):
    mixed, w, g, beta = _inputs(sum(lens) + 3, hk, hv, d, d, 4, dtype, seed)  # 3 padding rows
    cache = _Cache(8, mixed.shape[1], 4, hv, d, d, dtype, seed)
    ctx = ForwardContext(seq_lens=lens, context_lens=past, slots=slots, cache=cache)
    want, conv, rec = _reference(mixed, w, g, beta, cache, ctx, hk, d)
    untouched = [s for s in range(8) if s not in [sl for sl, n in zip(slots, lens) if n]]
    before = cache.rec[untouched].clone()
    out = torch.full((sum(lens) + 3, hv, d), float("nan"), device="cuda", dtype=dtype)
    linear_op(mixed, w, None, g, beta, out, 0, hk, d, ctx)
    assert not out.isnan().any() and (out[-3:] == 0).all()
    assert torch.equal(cache.rec[untouched], before)
    torch.testing.assert_close(cache.conv.float(), conv, rtol=0, atol=0)  # conv states are copied inputs: exact
    return _rel(out[:-3], want), _rel(cache.rec, rec)


@needs_fla
@pytest.mark.parametrize("hk, hv, d", SHAPES)
def test_fla_packed_prefill_matches_reference(hk, hv, d, nan_empty):
    out_err, state_err = _prefill(hk, hv, d, torch.bfloat16, [63, 1, 0, 130, 17], [0, 5, 3, 0, 9], [3, 0, 6, 5, 2], 0)
    assert out_err < 3e-2 and state_err < 3e-2, (out_err, state_err)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_short_packed_prefill_runs_the_recurrent_kernel(dtype, tol, monkeypatch, nan_empty):
    """Every sequence <= MAX_RECURRENT_TOKENS_EAGER (an exact batch): one recurrent launch, not fla's chunk path.
    bf16: q, k, v leave the conv rounded to bf16 as for fla (1.2e-2 over 128 tokens under the interpreter)."""
    from hattn.kernels.gated_delta import packed, recurrent

    calls = []
    monkeypatch.setattr(packed, "chunk_gated_delta_rule_slots", lambda *a, **kw: calls.append("chunk"))
    real = packed.packed_recurrent_gated_delta
    monkeypatch.setattr(packed, "packed_recurrent_gated_delta", lambda *a: calls.append("recurrent") or real(*a))
    lens = [recurrent.MAX_RECURRENT_TOKENS_EAGER, 1, 0, 7, 33]
    out_err, state_err = _prefill(2, 4, 64, dtype, lens, [0, 2, 0, 4, 1], [1, 4, 2, 7, 3], 4)
    assert out_err < tol and state_err < tol, (out_err, state_err)
    assert calls == ["recurrent"]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_prefill_without_fla_runs_the_torch_reference(dtype, tol, monkeypatch, nan_empty):
    monkeypatch.setattr("hattn.kernels.gated_delta.packed.fla_chunk", lambda: None)
    monkeypatch.setattr("hattn.kernels.gated_delta.recurrent.MAX_RECURRENT_TOKENS_EAGER", 0)  # not the short path
    out_err, state_err = _prefill(2, 4, 64, dtype, [65, 1, 0, 7], [0, 2, 0, 4], [1, 4, 2, 7], 1)
    assert out_err < tol and state_err < tol, (out_err, state_err)


@pytest.mark.parametrize("d", [8, 24])
def test_head_dims_the_kernels_cannot_tile_run_the_torch_reference(d, caplog, nan_empty):
    """Found by the GPU fuzz: a model with 8-wide linear heads raised in the fused decode step."""
    warn_reference.cache_clear()
    caplog.set_level(logging.WARNING, logger="hattn")
    out_err, state_err = _prefill(2, 4, d, torch.float32, [9, 1, 0, 4], [0, 2, 0, 4], [1, 4, 2, 7], 2)
    assert out_err < 1e-4 and state_err < 1e-4, (out_err, state_err)
    assert f"head dims ({d}, {d}) are not powers of two >= 16" in caplog.text
    _dispatch_decode(d, with_cache=True)


def _dispatch_decode(d: int, with_cache: bool):
    hk, hv, b = 2, 4, 5
    mixed, w, g, beta = _inputs(b + 2, hk, hv, d, d, 4, torch.bfloat16, 3)
    cache = _Cache(8, mixed.shape[1], 4, hv, d, d, torch.bfloat16, 3) if with_cache else None
    slots, past = [6, 0, 3, 1, 7], [4, 0, 9, 1, 2]
    ctx = ForwardContext(seq_lens=[1] * b, context_lens=past, slots=slots, cache=cache)
    want = torch.empty(b, hv, d, device="cuda")
    states = (cache.conv.float().clone(), cache.rec.clone(), torch.tensor(slots, device="cuda")) if cache else \
        (None, None, None)
    linear_attention_decode_reference(mixed[:b].float(), w.float(), None, g[:b], beta[:b].float(), want, *states,
                                      hk, d, torch.tensor(past, device="cuda") if cache else None)
    out = torch.full((b + 2, hv, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    linear_op(mixed, w, None, g, beta, out, 0, hk, d, ctx)
    assert (out[b:] == 0).all()
    assert _rel(out[:b], want) < 1e-2
    if cache:  # the torch path rounds the conv output to bf16 before the delta rule: a looser bound
        tol = 2e-3 if d == 64 else 5e-3
        torch.testing.assert_close(cache.rec, states[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("with_cache", [True, False])
def test_dispatch_decode_batch_is_the_fused_step_and_zeroes_padding(with_cache, nan_empty):
    _dispatch_decode(64, with_cache)


def test_decode_step_captured_in_graph_matches_reference_and_spares_other_slots():
    hk, hv, dk, b = 2, 4, 64, 3
    mixed, w, g, beta = _inputs(b, hk, hv, dk, dk, 4, torch.float32, 1)
    cache = _Cache(8, mixed.shape[1], 4, hv, dk, dk, torch.float32)
    slots = torch.tensor([6, 1, 3], device="cuda")
    static = [t.clone() for t in (mixed, g, beta)]
    out = torch.empty(b, hv, dk, device="cuda")
    graph = torch.cuda.CUDAGraph()
    linear_attention_decode(static[0], w, None, static[1], static[2], out, cache.conv.clone(), cache.rec.clone(),
                            slots, hk, dk)  # warm-up on copies
    with torch.cuda.graph(graph):
        linear_attention_decode(static[0], w, None, static[1], static[2], out, cache.conv, cache.rec, slots, hk, dk)
    for seed in (2, 3):  # replay with new inputs
        mixed, _, g, beta = _inputs(b, hk, hv, dk, dk, 4, torch.float32, seed)
        for s, new in zip(static, (mixed, g, beta)):
            s.copy_(new)
        ctx = ForwardContext(seq_lens=[1] * b, context_lens=[4] * b, slots=slots.tolist(), cache=cache)
        want, conv, rec = _reference(mixed, w, g, beta, cache, ctx, hk, dk)
        untouched = [i for i in range(8) if i not in slots.tolist()]
        before = cache.rec[untouched].clone()
        graph.replay()
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.rec, rec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.conv, conv, rtol=0, atol=0)
        assert torch.equal(cache.rec[untouched], before)


@needs_fla
def test_fla_facts_our_wrappers_rely_on():
    """fla 0.6.0: chunk's final state is a new fp32 tensor (the initial state is left alone); the fused recurrent
    kernel's 5th positional parameter is `gk`, not `beta` (pass beta by keyword); chunk wants B == 1 with cu_seqlens;
    the chunk forward's stages we call directly take the arguments we pass them."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    hk, hv, d, t = 16, 32, 128, 40
    mixed, _, g, beta = _inputs(t, hk, hv, d, d, 4, torch.bfloat16, 5)
    q, k, v = mixed.split([hk * d, hk * d, hv * d], -1)
    q, k, v = q.reshape(1, t, hk, d), k.reshape(1, t, hk, d), v.reshape(1, t, hv, d)
    h0 = torch.randn(2, hv, d, d, device="cuda")
    h0_copy = h0.clone()
    cu = torch.tensor([0, 15, t], device="cuda")
    _, ht = chunk_gated_delta_rule(q, k, v, g=g[None], beta=beta[None], initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    assert ht.dtype == torch.float32 and ht.data_ptr() != h0.data_ptr() and torch.equal(h0, h0_copy)
    with pytest.raises(ValueError, match="batch size is expected to be 1"):
        chunk_gated_delta_rule(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1),
                               g=g[None].expand(2, -1, -1), beta=beta[None].expand(2, -1, -1), cu_seqlens=cu)
    import inspect

    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_o import chunk_fwd_o
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra
    from fla.ops.utils import chunk_local_cumsum
    assert list(inspect.signature(fused_recurrent_gated_delta_rule).parameters)[4] == "gk"
    # what chunk._fla_forward passes to the stages it calls (by keyword) in place of chunk_gated_delta_rule_fwd
    at = {"chunk_size", "cu_seqlens", "chunk_indices"}
    for stage, own in ((chunk_local_cumsum, {"g", "scale"}),
                       (chunk_gated_delta_rule_fwd_intra, {"k", "v", "g", "beta"}),
                       (chunk_gated_delta_rule_fwd_h, {"k", "w", "u", "g", "initial_state", "output_final_state",
                                                       "chunk_offsets"}),
                       (chunk_fwd_o, {"q", "k", "v", "h", "g", "scale"})):
        assert at | own <= set(inspect.signature(stage).parameters), stage.__name__
    # chunk._output_pass launches the output kernel itself (into the caller's buffer), with fla's keywords
    from fla.ops.common.chunk_o import chunk_fwd_kernel_o
    kernel = chunk_fwd_kernel_o
    while not hasattr(kernel, "arg_names"):  # autotuner / heuristics wrappers
        kernel = kernel.fn
    assert {"q", "k", "v", "h", "g", "g_gamma", "o", "cu_seqlens", "chunk_indices", "scale", "T", "H", "HV", "K", "V",
            "BT", "STATE_V_FIRST"} <= set(kernel.arg_names)


@needs_fla
def test_output_pass_writes_what_fla_returns_into_the_callers_buffer():
    """chunk._output_pass (fla's output kernel launched into the split op's `out`) == fla's `chunk_fwd_o` bit for
    bit, every row written (NaN-filled buffers), over padded buckets (a padding-rows sequence, zero-length ones,
    no-op chunk entries, an empty step) and exact batches; buffers fla's kernel cannot address take fla's call."""
    from fla.ops.common.chunk_o import chunk_fwd_o

    from hattn.kernels.gated_delta import chunk
    from hattn.kernels.packing import CHUNK, Bucket, PackedBatch

    hk, hv, dk, dv = 16, 16, 128, 128  # the 1B preset's layer: fla's shipped configs
    bucket = Bucket.for_tokens(256, 3)
    batches = [(bucket.batch(bucket.host(lens, ctx, slots, 5).cuda()), 256) for lens, ctx, slots in
               (([70, 0, 9], [0, 5, 3], [1, 2, 3]), ([64, 1], [2, 0], [4, 0]), ([], [], []))]
    batches += [(PackedBatch.build(lens, "cuda", list(range(len(lens))), [0] * len(lens)), sum(lens))
                for lens in ([70, 9], [64, 1, 130], [1])]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, t in batches:
        ci = batch.memo("fla_chunk_indices", lambda: chunk._chunk_indices(batch))
        r = lambda *shape: torch.randn(*shape, device="cuda", generator=gen)  # noqa: E731
        q, k, v = r(1, t, hk, dk).bfloat16(), r(1, t, hk, dk).bfloat16(), r(1, t, hv, dv).bfloat16()
        h = (r(1, len(ci), hv, dk, dv) * 0.1).bfloat16()
        g = -torch.rand(1, t, hv, device="cuda", generator=gen).cumsum(1) * 0.01
        ref = chunk_fwd_o(q=q, k=k, v=v, h=h, g=g, scale=dk ** -0.5, cu_seqlens=batch.cu, chunk_indices=ci,
                          chunk_size=CHUNK)
        out = torch.full_like(v, float("nan"))
        assert chunk._output_pass(q, k, v, h, g, batch.cu, ci, out) is out and torch.equal(out, ref)
        wide = torch.full((1, t, hv, dv + 8), float("nan"), device="cuda", dtype=torch.bfloat16)[..., :dv]
        assert torch.equal(chunk._output_pass(q, k, v, h, g, batch.cu, ci, wide), ref)  # fla's call and a copy
        assert torch.equal(chunk._output_pass(q, k, v, h, g, batch.cu, ci, None), ref)


def linear_op(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx):
    """hattn::linear_attention's implementation under the forward context `ctx`."""
    from hattn.ops.linear import _linear_attention

    with forward_context(ctx):
        _linear_attention(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim)


@needs_fla
def test_padded_bucket_prefill_in_a_cuda_graph_equals_the_exact_packing(monkeypatch, nan_empty):
    """mode=full's packed steps: fla's chunked rule + our conv over a bucket's padded layout (a padding-rows sequence,
    zero-length ones and no-op chunk entries at the scratch slot), captured once and replayed for two packings whose
    metadata is refilled into the same static buffer, equal the exact eager packing; padding rows are zeros and only
    the step's slots change."""
    from hattn.kernels.gated_delta.packed import linear_attention_packed
    from hattn.kernels.packing import Bucket, PackedBatch, PackedStep

    # the exact packings' sequences are short enough for the recurrent form between graphs: compare chunk to chunk
    monkeypatch.setattr("hattn.kernels.gated_delta.recurrent.MAX_RECURRENT_TOKENS_EAGER", 0)
    hk, hv, d, tokens, scratch = 16, 16, 128, 256, 7
    bucket = Bucket.for_tokens(tokens, max_real_seqs=4)
    flat = torch.zeros(bucket.numel, dtype=torch.long, device="cuda")
    step = PackedStep.over(bucket, flat)
    mixed, w, g, beta = (t.contiguous() for t in _inputs(tokens, hk, hv, d, d, 4, torch.bfloat16, 5))
    cache = _Cache(8, mixed.shape[1], 4, hv, d, d, torch.bfloat16, 5)
    out = torch.zeros(tokens, hv, d, device="cuda", dtype=torch.bfloat16)
    packings = [([100, 1, 63], [0, 7, 12], [2, 0, 5]), ([64, 129, 1, 30], [3, 0, 0, 9], [1, 4, 6, 3])]

    def run():
        linear_attention_packed(mixed, w, None, g, beta, out, (cache.conv, cache.rec), step.batch, hk, d)

    flat.copy_(bucket.host([tokens], [0], [scratch], scratch).cuda())
    run()  # warm-up: autotuning, lazy init
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for lens, past, slots in packings:
        n = sum(lens)
        conv0, rec0 = cache.conv.clone(), cache.rec.clone()
        want = torch.empty(n, hv, d, device="cuda", dtype=torch.bfloat16)
        linear_attention_packed(mixed[:n], w, None, g[:n], beta[:n], want, (cache.conv, cache.rec),
                                PackedBatch.build(lens, "cuda", slots, past), hk, d)
        want_conv, want_rec = cache.conv.clone(), cache.rec.clone()
        cache.conv.copy_(conv0), cache.rec.copy_(rec0)
        flat.copy_(bucket.host(lens, past, slots, scratch).cuda())
        graph.replay()
        real = out[:n].float()
        assert _rel(real, want) < 1e-3
        others = [s for s in range(7) if s not in slots]
        torch.testing.assert_close(cache.rec[others], rec0[others], rtol=0, atol=0)
        assert _rel(cache.rec[slots], want_rec[slots]) < 1e-3
        torch.testing.assert_close(cache.conv[slots], want_conv[slots], rtol=0, atol=0)
