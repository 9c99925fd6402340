"""CPU: the Mamba2 scan's torch forms. The chunked scan == the token-by-token recurrence == transformers' own torch
chunk scan (Nemotron-H's, which Granite 4.0-H and Bamba copy), on odd lengths and chunk edges; the batched decode
step == the recurrence per sequence, reading and writing only its slots; the mamba2 and short_conv ops' batched
decode steps start a new sequence from zeros whatever its slot held; lightning and KDA the same."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hattn.context import ForwardContext, forward_context
from hattn.kernels.mamba2.reference import chunked_ssd, recurrent_ssd, ssd_step

hf = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
hf_chunk_scan = getattr(hf.mamba2_chunk_scan, "__wrapped__", hf.mamba2_chunk_scan)  # its torch form
TOL = dict(rtol=1e-4, atol=1e-4)


def _inputs(t, h, p, n, seed):
    g = torch.Generator().manual_seed(seed)
    x, b, c = torch.randn(t, h, p, generator=g), torch.randn(t, h, n, generator=g), torch.randn(t, h, n, generator=g)
    dt = F.softplus(torch.randn(t, h, generator=g))
    a, d = -torch.rand(h, generator=g) * 2, torch.randn(h, generator=g)
    return x, dt, a, b, c, d, torch.randn(h, p, n, generator=g)


@given(t=st.integers(1, 140), chunk=st.sampled_from([1, 4, 63, 64]), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_chunked_scan_equals_the_recurrence(t, chunk, seed):
    x, dt, a, b, c, d, s0 = _inputs(t, 3, 4, 8, seed)
    s1, s2 = s0.clone(), s0.clone()
    torch.testing.assert_close(chunked_ssd(x, dt, a, b, c, d, s1, chunk), recurrent_ssd(x, dt, a, b, c, d, s2), **TOL)
    torch.testing.assert_close(s1, s2, **TOL)


@given(t=st.integers(1, 100), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_chunked_scan_equals_transformers_torch_chunk_scan(t, seed):
    """From a carried state, as transformers' prefill after a cached prefix (its chunk size 8 against our 64)."""
    x, dt, a, b, c, d, s0 = _inputs(t, 4, 4, 8, seed)
    want, want_state = hf_chunk_scan(x[None], dt[None], a, b[None], c[None], chunk_size=8, D=d,
                                     initial_states=s0[None].clone(), return_final_states=True)
    state = s0.clone()
    torch.testing.assert_close(chunked_ssd(x, dt, a, b, c, d, state), want[0], **TOL)
    torch.testing.assert_close(state, want_state[0], **TOL)


def test_the_batched_step_reads_and_writes_only_its_slots():
    h, p, n = 3, 4, 8
    cache = torch.randn(6, h, p, n)
    before = cache.clone()
    slots, started = torch.tensor([4, 0, 2]), torch.tensor([True, False, True])
    x, dt, a, b, c, d, _ = _inputs(3, h, p, n, seed=5)
    got = ssd_step(x, dt, a, b, c, d, cache, slots, started)
    for i, slot in enumerate(slots.tolist()):
        state = before[slot].clone() if started[i] else torch.zeros(h, p, n)
        torch.testing.assert_close(got[i:i + 1], recurrent_ssd(x[i:i + 1], dt[i:i + 1], a, b[i:i + 1], c[i:i + 1], d,
                                                               state), **TOL)
        torch.testing.assert_close(cache[slot], state, **TOL)
    assert torch.equal(cache[[1, 3, 5]], before[[1, 3, 5]])


@pytest.mark.parametrize("preset", ["tiny-bamba", "tiny-lfm2", "tiny-minimax", "tiny-kimi-linear"])
def test_a_decode_step_starts_a_new_sequence_from_zeros_whatever_its_slot_held(preset):
    """A one-token step is the batched path: a sequence without context (its first token, in a decode step beside
    running ones) must not read the stale states a finished sequence left in its slot."""
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model

    lm = adapt(random_model(preset_config(preset), seed=0))
    ids, pos = torch.tensor([7, 11]), torch.tensor([5, 0])  # slot 0: a running sequence; slot 1: a new one
    outs = []
    for fill in (0.0, 3.0):
        cache = lm.make_cache(2, 16)
        for layer in cache.specs:
            for state in cache.state(layer):
                state.fill_(fill)
        ctx = ForwardContext(seq_lens=[1, 1], context_lens=[5, 0], slots=[0, 1], cache=cache,
                             layer_kinds=lm.layer_kinds)
        with forward_context(ctx), torch.no_grad():
            outs.append(lm(ids, pos))
    assert not torch.allclose(outs[0][0], outs[1][0])  # the running sequence reads its slot
    # the new one reads nothing (MiniMax's MoE batches a token's expert GEMM with the other row's: rounding only)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-5)


@given(t=st.integers(1, 140), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_chunked_lightning_equals_its_recurrence(t, seed):
    from hattn.kernels.lightning.reference import chunked_lightning, recurrent_lightning

    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, 2, 8, generator=g) for _ in range(3))
    slope, s0 = torch.rand(2, generator=g), torch.randn(2, 8, 8, generator=g)
    s1, s2 = s0.clone(), s0.clone()
    torch.testing.assert_close(chunked_lightning(q, k, v, slope, s1), recurrent_lightning(q, k, v, slope, s2), **TOL)
    torch.testing.assert_close(s1, s2, **TOL)


def test_the_batched_lightning_step_equals_its_recurrence_per_slot():
    from hattn.kernels.lightning.reference import lightning_step, recurrent_lightning

    g = torch.Generator().manual_seed(2)
    cache = torch.randn(5, 2, 8, 8, generator=g)
    before = cache.clone()
    q, k, v = (torch.randn(3, 2, 8, generator=g) for _ in range(3))
    slope, slots, started = torch.rand(2, generator=g), torch.tensor([2, 4, 0]), torch.tensor([True, False, True])
    got = lightning_step(q, k, v, slope, cache, slots, started)
    for i, slot in enumerate(slots.tolist()):
        state = before[slot].clone() if started[i] else torch.zeros(2, 8, 8)
        torch.testing.assert_close(got[i:i + 1], recurrent_lightning(q[i:i + 1], k[i:i + 1], v[i:i + 1], slope, state),
                                   **TOL)
        torch.testing.assert_close(cache[slot], state, **TOL)
    assert torch.equal(cache[[1, 3]], before[[1, 3]])


def test_the_batched_kda_step_equals_its_recurrence_per_slot():
    from hattn.kernels.kda.reference import kda_step, recurrent_kda

    g = torch.Generator().manual_seed(3)
    cache = torch.randn(5, 2, 8, 8, generator=g)
    before = cache.clone()
    q, k, v = (torch.randn(3, 2, 8, generator=g) for _ in range(3))
    decay, beta = -torch.rand(3, 2, 8, generator=g), torch.rand(3, 2, generator=g)
    slots, started = torch.tensor([2, 4, 0]), torch.tensor([True, False, True])
    got = kda_step(q, k, v, decay, beta, cache, slots, started)
    for i, slot in enumerate(slots.tolist()):
        state = before[slot].clone() if started[i] else torch.zeros(2, 8, 8)
        rows = slice(i, i + 1)
        torch.testing.assert_close(got[rows], recurrent_kda(q[rows], k[rows], v[rows], decay[rows], beta[rows], state),
                                   **TOL)
        torch.testing.assert_close(cache[slot], state, **TOL)
    assert torch.equal(cache[[1, 3]], before[[1, 3]])


# -- the ops' decode steps: padding rows, no cache, a slot left non-finite --------------------------------------------
H, P, N, W, D = 2, 4, 8, 4, 8
KINDS = ["mamba2", "lightning", "kda", "short_conv"]


def _op_case(kind, rows, g):
    """(cache spec, call(out), out's shape) of one layer-0 call of `kind`'s op on `rows` rows of random inputs."""
    import hattn.ops.kda, hattn.ops.lightning, hattn.ops.mamba2, hattn.ops.short_conv  # noqa: E401, F401

    if kind == "mamba2":
        c = H * P + 2 * N
        args = (torch.randn(rows, c, generator=g), torch.randn(c, W, generator=g), None,
                torch.rand(rows, H, generator=g), -torch.rand(H, generator=g), torch.randn(H, generator=g))
        return (hattn.ops.mamba2.cache_spec(H, P, 1, N, W),
                lambda out: torch.ops.hattn.mamba2_mixer(*args, out, 0, 1, N), (rows, H, P))
    if kind == "lightning":
        q, k, v = (torch.randn(rows, H, D, generator=g) for _ in range(3))
        slope = torch.rand(H, generator=g)
        return (hattn.ops.lightning.cache_spec(H, D),
                lambda out: torch.ops.hattn.lightning_attention(q, k, v, slope, out, 0), (rows, H, D))
    if kind == "kda":
        args = (torch.randn(rows, 3 * H * D, generator=g), torch.randn(3 * H * D, W, generator=g), None,
                -torch.rand(rows, H, D, generator=g), torch.rand(rows, H, generator=g))
        return hattn.ops.kda.cache_spec(3 * H * D, W, H, D), lambda out: torch.ops.hattn.kda_attention(*args, out, 0), \
            (rows, H, D)
    args = (torch.randn(rows, 6, generator=g), torch.randn(6, W, generator=g), None)
    return hattn.ops.short_conv.cache_spec(6, W), lambda out: torch.ops.hattn.short_conv(*args, out, 0), (rows, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_steps_padding_rows_come_out_zero(kind):
    from hattn.models.cache import HybridCache

    spec, call, shape = _op_case(kind, 3, torch.Generator().manual_seed(0))
    cache = HybridCache({0: spec}, slots=2, max_len=16, dtype=torch.float32)
    out = torch.full(shape, float("nan"))
    with forward_context(ForwardContext([1, 1], [3, 0], [0, 1], cache, padding=1)), torch.no_grad():
        call(out)
    assert out[:2].isfinite().all() and torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("kind", KINDS)
def test_one_token_without_a_cache_runs_from_zero_states(kind):
    spec, call, shape = _op_case(kind, 1, torch.Generator().manual_seed(1))
    out = torch.empty(shape)
    with torch.no_grad():
        call(out)
    assert out.isfinite().all()


@pytest.mark.parametrize("kind", KINDS)
def test_a_new_sequence_in_a_slot_a_diverged_one_left_nan_starts_from_zeros(kind):
    """0 * NaN is NaN: a new sequence's states are selected away, not multiplied by 0."""
    from hattn.models.cache import HybridCache

    outs = []
    for fill in (0.0, float("nan")):
        spec, call, shape = _op_case(kind, 1, torch.Generator().manual_seed(2))
        cache = HybridCache({0: spec}, slots=2, max_len=16, dtype=torch.float32)
        for state in cache.state(0):
            state.fill_(fill)
        out = torch.empty(shape)
        with forward_context(ForwardContext([1], [0], [1], cache)), torch.no_grad():
            call(out)
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])


def test_the_chunked_scan_is_as_accurate_as_the_recurrence_after_a_large_time_step():
    """exp(cumsum[t] - cumsum[s]) loses the small steps after one large one in fp32 (cumsum near -320); the segment
    sums are summed directly, as transformers' segment_sum."""
    g = torch.Generator().manual_seed(0)
    t, h, p, n = 64, 3, 4, 8
    x, b, c = torch.randn(t, h, p, generator=g), torch.randn(t, h, n, generator=g), torch.randn(t, h, n, generator=g)
    a, d, s0 = torch.full((h,), -16.0), torch.randn(h, generator=g), torch.randn(h, p, n, generator=g)
    dt = torch.full((t, h), 0.01)
    dt[0] = 20.0
    want = recurrent_ssd(*(z.double() for z in (x, dt, a, b, c, d)), s0.double().clone())

    def error(y):
        return ((y.double() - want).abs() / (want.abs() + 1e-2)).max().item()

    got, rec = chunked_ssd(x, dt, a, b, c, d, s0.clone()), recurrent_ssd(x, dt, a, b, c, d, s0.clone())
    assert error(got) < 10 * error(rec) + 1e-5, (error(got), error(rec))


def test_every_form_returns_the_dtype_of_its_values():
    """The recurrences rebound v to fp32 before casting the output to v's dtype (so they returned fp32 for bf16)."""
    from hattn.kernels.kda.reference import kda_step, recurrent_kda
    from hattn.kernels.lightning.reference import chunked_lightning, lightning_step, recurrent_lightning

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 8, generator=g).bfloat16() for _ in range(3))
    slope, decay, beta = torch.rand(2, generator=g), -torch.rand(3, 2, 8, generator=g), torch.rand(3, 2, generator=g)
    state, slots = torch.zeros(3, 2, 8, 8), torch.tensor([0, 1, 2])
    outs = [recurrent_lightning(q, k, v, slope, state[0].clone()), chunked_lightning(q, k, v, slope, state[0].clone()),
            lightning_step(q, k, v, slope, state.clone(), slots), recurrent_kda(q, k, v, decay, beta, state[0].clone()),
            kda_step(q, k, v, decay, beta, state.clone(), slots)]
    x, dt, a, b, c, d, s0 = _inputs(5, 2, 4, 8, seed=1)
    outs += [recurrent_ssd(x.bfloat16(), dt, a, b, c, d, s0.clone()), chunked_ssd(x.bfloat16(), dt, a, b, c, d, s0)]
    assert [o.dtype for o in outs] == [torch.bfloat16] * 7


# -- KDA's chunked form ------------------------------------------------------------------------------------------
def _kda_inputs(t, h, dk, dv, seed, strong=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(t, h, dk, generator=g), torch.randn(t, h, dk, generator=g), torch.randn(t, h, dv, generator=g)
    decay = -torch.rand(t, h, dk, generator=g) * (20.0 if strong else 1.0)
    return q, k, v, decay, torch.rand(t, h, generator=g), torch.randn(h, dk, dv, generator=g)


@given(t=st.integers(1, 140), chunk=st.sampled_from([1, 4, 64]), strong=st.booleans(), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_chunked_kda_equals_its_recurrence(t, chunk, strong, seed):
    from hattn.kernels.kda.reference import chunked_kda, recurrent_kda

    q, k, v, decay, beta, s0 = _kda_inputs(t, 2, 8, 4, seed, strong)
    s1, s2 = s0.clone(), s0.clone()
    torch.testing.assert_close(chunked_kda(q, k, v, decay, beta, s1, chunk), recurrent_kda(q, k, v, decay, beta, s2),
                               **TOL)
    torch.testing.assert_close(s1, s2, **TOL)


def test_chunked_kda_equals_transformers_torch_chunk_kda():
    """From a carried state, against transformers' own torch chunk form of Kimi-Linear (qk l2-normalised inside)."""
    from hattn.kernels.kda.reference import chunked_kda

    kimi = pytest.importorskip("transformers.models.kimi_linear.modeling_kimi_linear")
    hf_chunk = getattr(kimi.chunk_kimi_delta_attention, "__wrapped__", kimi.chunk_kimi_delta_attention)
    q, k, v, decay, beta, s0 = _kda_inputs(100, 2, 8, 4, seed=7)
    want, want_state = hf_chunk(q[None], k[None], v[None], decay[None], beta[None], initial_state=s0[None].clone(),
                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    state = s0.clone()
    torch.testing.assert_close(chunked_kda(q, k, v, decay, beta, state), want[0], **TOL)
    torch.testing.assert_close(state, want_state[0], **TOL)
