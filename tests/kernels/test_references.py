"""CPU: the linear-attention references == transformers' own torch fallbacks (Qwen3.5 GatedDeltaNet), in fp32.

`_plain` reaches HF's plain-torch functions even where a kernel package would be routed to instead.
Hypothesis varies shapes, lengths (T=63, odd, empty sequences) and cu_seqlens packings.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.kernels.conv1d.reference import causal_conv1d_packed, causal_conv1d_step
from hattn.kernels.gated_delta.reference import (chunk_gated_delta_rule, chunk_gated_delta_rule_packed,
                                                 gated_delta_rule_step, linear_attention_decode_reference,
                                                 recurrent_gated_delta_rule)
from hattn.context import ForwardContext, forward_context

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def _plain(fn):
    """HF's torch fallback: the function under its kernel-hub decorator (`__wrapped__` up to transformers 5.24; from
    5.25 the decorator makes a module that calls the function when no hub kernel is active, as here)."""
    return getattr(fn, "__wrapped__", fn)


hf_chunk = _plain(hf.torch_chunk_gated_delta_rule)
hf_recurrent = _plain(hf.torch_recurrent_gated_delta_rule)
hf_conv_fn = _plain(hf.causal_conv1d_fn)
hf_conv_update = _plain(hf.causal_conv1d_update)

TOL = dict(rtol=1e-4, atol=1e-4)


def _gdn_inputs(t, hk, rep, dk, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    hv = hk * rep
    q, k = torch.randn(t, hk, dk, generator=gen), torch.randn(t, hk, dk, generator=gen)
    v = torch.randn(t, hv, dv, generator=gen)
    g = -torch.rand(t, hv, generator=gen) * 2  # log decay <= 0
    beta = torch.rand(t, hv, generator=gen)
    return q, k, v, g, beta


def _hf(fn, q, k, v, g, beta, h0):
    """One sequence through an HF fallback (batch 1): returns (o [T, Hv, Dv], final state [Hv, Dk, Dv])."""
    o, s = fn(q[None], k[None], v[None], g[None], beta[None], initial_state=h0[None], output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    return o[0], s[0]


heads = st.sampled_from([(1, 1), (2, 1), (2, 2), (1, 3), (2, 4)])  # (Hk, Hv // Hk)
dims = st.sampled_from([(8, 8), (16, 32), (32, 16)])


@given(t=st.integers(1, 150), hd=heads, dd=dims, seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_chunk_and_recurrent_match_hf(t, hd, dd, seed):
    (hk, rep), (dk, dv) = hd, dd
    q, k, v, g, beta = _gdn_inputs(t, hk, rep, dk, dv, seed)
    h0 = torch.randn(hk * rep, dk, dv, generator=torch.Generator().manual_seed(seed + 1))
    want_o, want_s = _hf(hf_chunk, q, k, v, g, beta, h0)
    s = h0.clone()
    torch.testing.assert_close(chunk_gated_delta_rule(q, k, v, g, beta, s), want_o, **TOL)
    torch.testing.assert_close(s, want_s, **TOL)
    want_o, want_s = _hf(hf_recurrent, q, k, v, g, beta, h0)
    s = h0.clone()
    torch.testing.assert_close(recurrent_gated_delta_rule(q, k, v, g, beta, s), want_o, **TOL)
    torch.testing.assert_close(s, want_s, **TOL)


def _packing(draw_lens):
    cu = [0]
    for n in draw_lens:
        cu.append(cu[-1] + n)
    return cu


@given(lens=st.lists(st.sampled_from([0, 1, 2, 7, 63, 64, 65, 100]), min_size=1, max_size=4),
       hd=heads, seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=20)
def test_packed_chunk_reads_and_writes_slots(lens, hd, seed, data):
    hk, rep = hd
    cu = _packing(lens)
    q, k, v, g, beta = _gdn_inputs(cu[-1], hk, rep, 16, 16, seed)
    slots_total = len(lens) + 2
    slots = data.draw(st.permutations(range(slots_total)))[:len(lens)]
    has_state = data.draw(st.lists(st.booleans(), min_size=len(lens), max_size=len(lens)))
    states = torch.randn(slots_total, hk * rep, 16, 16, generator=torch.Generator().manual_seed(seed))
    before = states.clone()
    out = chunk_gated_delta_rule_packed(q, k, v, g, beta, cu, states, slots, has_state)
    for i, (a, b) in enumerate(zip(cu, cu[1:])):
        if a == b:
            torch.testing.assert_close(states[slots[i]], before[slots[i]], rtol=0, atol=0)
            continue
        h0 = before[slots[i]] if has_state[i] else torch.zeros_like(before[0])
        want_o, want_s = _hf(hf_chunk, q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], h0)
        torch.testing.assert_close(out[a:b], want_o, **TOL)
        torch.testing.assert_close(states[slots[i]], want_s, **TOL)
    untouched = [s for s in range(slots_total) if s not in slots]
    assert torch.equal(states[untouched], before[untouched])


@given(b=st.integers(1, 5), hd=heads, dd=dims, seed=st.integers(0, 2**16))
@settings(max_examples=20)
def test_step_matches_hf_recurrent_per_sequence(b, hd, dd, seed):
    (hk, rep), (dk, dv) = hd, dd
    q, k, v, g, beta = _gdn_inputs(b, hk, rep, dk, dv, seed)
    states = torch.randn(b + 2, hk * rep, dk, dv)
    before = states.clone()
    slots = torch.randperm(b + 2)[:b]
    has_state = torch.rand(b) > 0.3
    o = gated_delta_rule_step(q, k, v, g, beta, states, slots, has_state)
    for i in range(b):
        h0 = before[slots[i]] * has_state[i]
        want_o, want_s = _hf(hf_recurrent, q[i:i + 1], k[i:i + 1], v[i:i + 1], g[i:i + 1], beta[i:i + 1], h0)
        torch.testing.assert_close(o[i], want_o[0], **TOL)
        torch.testing.assert_close(states[slots[i]], want_s, **TOL)


@given(lens=st.lists(st.integers(0, 9), min_size=1, max_size=4), width=st.sampled_from([2, 3, 4]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25)
def test_packed_conv_matches_hf_fn_and_update(lens, width, bias, seed):
    """New sequences == HF causal_conv1d_fn; the written state then continues like HF causal_conv1d_update."""
    gen = torch.Generator().manual_seed(seed)
    c, cu = 6, _packing(lens)
    x, w = torch.randn(cu[-1], c, generator=gen), torch.randn(c, width, generator=gen)
    b = torch.randn(c, generator=gen) if bias else None
    conv_state = torch.randn(len(lens), c, width - 1, generator=gen)
    before = conv_state.clone()
    y = causal_conv1d_packed(x, w, b, cu, conv_state, list(range(len(lens))), [False] * len(lens))
    nxt = torch.randn(len(lens), c, generator=gen)
    for i, (a, e) in enumerate(zip(cu, cu[1:])):
        if a == e:
            assert torch.equal(conv_state[i], before[i])
            continue
        torch.testing.assert_close(y[a:e], hf_conv_fn(x[a:e].t()[None], w, b, activation="silu")[0].t(), **TOL)
        hf_state = conv_state[i:i + 1].clone()
        want = hf_conv_update(nxt[i][None, :, None], hf_state, w, b, activation="silu")[0, :, 0]
        got = causal_conv1d_step(nxt[i:i + 1], w, b, conv_state, torch.tensor([i]))[0]
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(conv_state[i], hf_state[0], **TOL)


def _hf_decode(mixed, w, bias, g, beta, conv_state, rec_state, hk, dk, hv, dv):
    """The HF model's cached decode path for one sequence: causal_conv1d_update then the recurrent rule."""
    x = hf_conv_update(mixed[None, :, None], conv_state[None], w, bias, activation="silu")[0, :, 0]
    q, k, v = x.split([hk * dk, hk * dk, hv * dv])
    o, s = hf_recurrent(q.view(1, 1, hk, dk), k.view(1, 1, hk, dk), v.view(1, 1, hv, dv), g.view(1, 1, hv),
                        beta.view(1, 1, hv), initial_state=rec_state[None], output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
    return o[0, 0], s[0]


@given(b=st.integers(1, 4), hd=heads, seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_fused_decode_reference_matches_hf_decode_path(b, hd, seed):
    (hk, rep), dk, dv, width = hd, 8, 16, 4
    hv, c = hk * rep, 2 * hk * 8 + hk * rep * 16
    gen = torch.Generator().manual_seed(seed)
    mixed, w, bias = torch.randn(b, c, generator=gen), torch.randn(c, width, generator=gen), torch.randn(c)
    g, beta = -torch.rand(b, hv, generator=gen), torch.rand(b, hv, generator=gen)
    conv, rec = torch.randn(b + 1, c, width - 1, generator=gen), torch.randn(b + 1, hv, dk, dv, generator=gen)
    conv0, rec0 = conv.clone(), rec.clone()
    slots, ctx_lens = torch.randperm(b + 1)[:b], torch.randint(0, 3, (b,))
    out = torch.full((b, hv, dv), float("nan"))
    linear_attention_decode_reference(mixed, w, bias, g, beta, out, conv, rec, slots, hk, dk, ctx_lens)
    for i, s in enumerate(slots.tolist()):
        keep = float(ctx_lens[i] > 0)
        hf_conv = conv0[s] * keep
        want_o, want_s = _hf_decode(mixed[i], w, bias, g[i], beta[i], hf_conv, rec0[s] * keep, hk, dk, hv, dv)
        torch.testing.assert_close(out[i], want_o, **TOL)
        torch.testing.assert_close(rec[s], want_s, **TOL)
        torch.testing.assert_close(conv[s], hf_conv, **TOL)


class _Cache:
    def __init__(self, conv, rec):
        self.conv, self.rec = conv, rec

    def state(self, layer_id):
        return self.conv, self.rec


def test_dispatch_prefill_then_decode_equals_one_long_prefill():
    """CPU dispatch: a prompt then decode steps through the cache == the whole sequence at once (no cache)."""
    hk, hv, dk, dv, width, t = 2, 4, 8, 8, 4, 11
    c = 2 * hk * dk + hv * dv
    gen = torch.Generator().manual_seed(0)
    mixed, w = torch.randn(t, c, generator=gen), torch.randn(c, width, generator=gen)
    g, beta = -torch.rand(t, hv, generator=gen), torch.rand(t, hv, generator=gen)
    whole = torch.empty(t, hv, dv)
    linear_op(mixed, w, None, g, beta, whole, 0, hk, dk, ForwardContext(seq_lens=[t]))
    cache = _Cache(torch.randn(3, c, width - 1), torch.randn(3, hv, dk, dv))  # garbage: context 0 must ignore it
    step = torch.empty(t, hv, dv)
    linear_op(mixed[:6], w, None, g[:6], beta[:6], step[:6], 0, hk, dk,
                             ForwardContext(seq_lens=[6], context_lens=[0], slots=[2], cache=cache))
    for i in range(6, t):
        linear_op(mixed[i:i + 1], w, None, g[i:i + 1], beta[i:i + 1], step[i:i + 1], 0, hk, dk,
                                 ForwardContext(seq_lens=[1], context_lens=[i], slots=[2], cache=cache))
    torch.testing.assert_close(step, whole, **TOL)


def linear_op(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim, ctx):
    """hattn::linear_attention's implementation under the forward context `ctx`."""
    from hattn.ops.linear import _linear_attention

    with forward_context(ctx):
        _linear_attention(mixed_qkv, conv_weight, conv_bias, g, beta, out, layer_id, num_k_heads, head_k_dim)
