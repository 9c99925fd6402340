"""GPU: the varlen prefill attention kernel (and `write_kv`) == `packed_prefill_attention_reference` for random
packed steps (prefill, extend and decode-like sequences mixed, padding sequences and rows, slots in any order),
the cache untouched outside the written cells, and one CUDA graph of a bucket replayed for two packings. Also runs
on CPU under TRITON_INTERPRET=1 (the graph test excepted).

Tolerances: 1e-4 fp32, 2e-2 bf16, 5e-3 fp16, as the decode kernel's. Outputs are NaN-filled before each call, so a
row the kernel never writes (padding rows included) fails.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.attention import prefill_flash
from hattn.kernels.attention.reference import packed_prefill_attention_reference
from hattn.kernels.launch import interpreting

try:
    from hattn.kernels.attention import prefill_triton as pt
except ImportError:  # no triton: a CPU install
    pt = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(pt is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


class Step:
    """One packed step's host metadata and its device copies, as the runtime builds them.

    seqs: (new tokens, cached tokens, slot) of each sequence, padding sequences (0, 0, scratch) included.
    """

    def __init__(self, seqs, num_tokens, hq, hkv, scratch_slot):
        self.seq_lens, self.context_lens, self.slots = (list(c) for c in zip(*seqs))
        self.starts = [sum(self.seq_lens[:i]) for i in range(len(seqs))]
        self.num_tokens, self.real_tokens = num_tokens, sum(self.seq_lens)
        meta = torch.tensor([self.starts, self.seq_lens, self.context_lens, self.slots])
        self.meta = meta.to(DEV)  # rows: starts, seq_lens, context_lens, slots
        self.blocks = pt.block_table(self.seq_lens, num_tokens, hq, hkv).to(DEV)
        self.targets = pt.token_targets(self.seq_lens, self.context_lens, self.slots, num_tokens,
                                        scratch_slot).to(DEV)

    def write_kv(self, k, v, k_cache, v_cache):
        pt.write_kv(k, v, k_cache, v_cache, *self.targets)

    def attend(self, q, k_cache, v_cache, out):
        pt.prefill_attention(q, k_cache, v_cache, *self.meta, self.blocks, out, q.shape[-1] ** -0.5)

    def attend_flash(self, q, k_cache, v_cache, out, tight=False):
        """tight: FA's grid for the longest sequence (eager steps), not for every row (graphs)."""
        rows = prefill_flash.key_rows(*self.meta, k_cache.shape[1], q.shape[0])
        longest = max(*self.seq_lens, q.shape[0] - self.real_tokens)  # the padding rows are a sequence too
        prefill_flash.flash_prefill_attention(q, k_cache, v_cache, *rows, out, q.shape[-1] ** -0.5,
                                              longest if tight else None)

    def reference(self, q, k_cache, v_cache, dv):
        want = torch.empty(q.shape[0], q.shape[1], dv, device=DEV)
        packed_prefill_attention_reference(q, k_cache, v_cache, *self.meta, want, q.shape[-1] ** -0.5)
        return want


@st.composite
def steps(draw):
    """(seqs, num_tokens, num_slots): 1..4 sequences (new 1..70 tokens, cached 0..40, a third decode-like), 0..2
    padding sequences anywhere, live slots in random order, a bucket 0..20 rows above the step's tokens."""
    n = draw(st.integers(1, 4))
    num_slots = n + 1 + draw(st.integers(0, 2))  # the last one the scratch slot
    live = draw(st.permutations(range(num_slots - 1)))[:n]
    seqs = [(draw(st.sampled_from([1, draw(st.integers(1, 70))])), draw(st.integers(0, 40)), slot) for slot in live]
    for _ in range(draw(st.integers(0, 2))):
        seqs.insert(draw(st.integers(0, len(seqs))), (0, 0, num_slots - 1))
    return seqs, sum(s[0] for s in seqs) + draw(st.integers(0, 20)), num_slots


def _tensors(t, num_slots, max_len, hkv, rep, dk, dv, dtype, seed):
    """Random q, k, v of the bucket's t rows and random caches."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEV)  # noqa: E731
    return (r(t, hkv * rep, dk), r(t, hkv, dk), r(t, hkv, dv), r(num_slots, max_len, hkv, dk),
            r(num_slots, max_len, hkv, dv))


def _assert_written_only(cache, before, new, step):
    """The step's tokens are at their (slot, position); every cell outside the step's targets kept its value."""
    slot, pos = step.targets.cpu()
    untouched = torch.ones(cache.shape[:2], dtype=torch.bool)
    untouched[slot, pos] = False
    assert torch.equal(cache.cpu()[untouched], before.cpu()[untouched])
    real = slice(0, step.real_tokens)
    assert torch.equal(cache.cpu()[slot[real], pos[real]], new.cpu()[real])


def _run_and_check(seqs, num_tokens, num_slots, hkv, rep, dk, dv, dtype, seed, max_len=None, kernel="triton",
                   tight=False):
    max_len = max_len or max(n + past for n, past, _ in seqs)
    q, k, v, k_cache, v_cache = _tensors(num_tokens, num_slots, max_len, hkv, rep, dk, dv, dtype, seed)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    step = Step(seqs, num_tokens, hkv * rep, hkv, num_slots - 1)
    step.write_kv(k, v, k_cache, v_cache)
    _assert_written_only(k_cache, k_before, k, step)
    _assert_written_only(v_cache, v_before, v, step)
    out = torch.empty(num_tokens, hkv * rep, dv, device=DEV, dtype=dtype)
    if kernel == "flash":
        assert prefill_flash.fits(q, k_cache, v_cache)
        step.attend_flash(q, k_cache, v_cache, out, tight)
    else:
        step.attend(q, k_cache, v_cache, out)
    want = step.reference(q, k_cache, v_cache, dv)
    torch.testing.assert_close(out.float().cpu(), want.cpu(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(out[step.real_tokens:].cpu(), torch.zeros_like(out[step.real_tokens:]).cpu())


@given(step=steps(), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 3, 4, 8]),
       dims=st.sampled_from([(16, 16), (64, 64), (80, 80), (96, 64), (24, 40), (128, 128)]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_prefill_attention_matches_reference(step, hkv, rep, dims, dtype, seed, nan_empty):
    seqs, num_tokens, num_slots = step
    _run_and_check(seqs, num_tokens, num_slots, hkv, rep, *dims, dtype, seed)


@pytest.mark.parametrize("rep", [1, 4])
def test_prefill_attention_at_the_qwen35_1b_shape(rep, nan_empty):
    """Hq = 2 * rep, Hkv=2, D=256 in bf16 (32-key blocks): a prompt across block edges, an extend on a filled
    cache, a decode row, a padding sequence and padding rows, slots out of order."""
    seqs = [(70, 0, 3), (33, 31, 0), (1, 64, 2), (0, 0, 5), (16, 0, 1)]
    _run_and_check(seqs, 160, 6, 2, rep, 256, 256, torch.bfloat16, 3, max_len=100)


needs_flash = pytest.mark.skipif(DEV != "cuda", reason="FlashAttention runs on CUDA only")


@needs_flash
@given(step=steps(), hkv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 4, 8]), d=st.sampled_from([64, 80, 256]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16), tight=st.booleans())
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_flash_prefill_attention_matches_reference(step, hkv, rep, d, dtype, seed, tight, nan_empty):
    """FA-2 over the cache (prefill_flash) on the same random packed steps: padding sequences of length 0 anywhere,
    padding rows past the last sequence (zeros), slots in any order, decode-like rows (all of them one row long with
    `tight`: FA's grid is still for two rows)."""
    seqs, num_tokens, num_slots = step
    if num_tokens < 2:  # one row takes FA's decode layout: `fits` declines it
        return
    _run_and_check(seqs, num_tokens, num_slots, hkv, rep, d, d, dtype, seed, kernel="flash", tight=tight)


@needs_flash
@pytest.mark.parametrize("rep", [1, 4])
def test_flash_prefill_attention_at_the_qwen35_1b_shape(rep, nan_empty):
    seqs = [(70, 0, 3), (33, 31, 0), (1, 64, 2), (0, 0, 5), (16, 0, 1)]
    _run_and_check(seqs, 160, 6, 2, rep, 256, 256, torch.bfloat16, 3, max_len=100, kernel="flash")


@needs_flash
def test_flash_declines_what_it_cannot_serve(monkeypatch):
    q, _, _, k_cache, v_cache = _tensors(8, 3, 16, 2, 2, 64, 64, torch.bfloat16, 0)
    assert prefill_flash.fits(q, k_cache, v_cache)
    assert not prefill_flash.fits(q[:1], k_cache, v_cache)  # one row
    assert not prefill_flash.fits(q.float(), k_cache.float(), v_cache.float())  # fp32
    assert not prefill_flash.fits(q[..., :48], k_cache[..., :48].contiguous(), v_cache)  # head sizes differ
    assert not prefill_flash.fits(q, k_cache[:, :8], v_cache[:, :8])  # a cache view that is not contiguous
    monkeypatch.setattr(prefill_flash, "enabled", False)  # HATTN_PREFILL_ATTENTION=triton
    assert not prefill_flash.fits(q, k_cache, v_cache)


@given(lens=st.lists(st.integers(0, 200), min_size=1, max_size=6), extra=st.integers(0, 100),
       rep=st.sampled_from([1, 2, 3, 4, 5, 8]))
def test_block_table_covers_every_row_once_within_max_blocks(lens, extra, rep):
    """Each sequence's new tokens in blocks of block_tokens from 0, then the padding rows in blocks, then blocks
    starting at row T; never more than max_blocks(T, N, ...) blocks (the grid)."""
    num_tokens, size = sum(lens) + extra, pt.block_tokens(rep, 1)
    seq, start = pt.block_table(lens, num_tokens, rep, 1).tolist()
    assert len(seq) == pt.max_blocks(num_tokens, len(lens), rep, 1) == math.ceil(num_tokens / size) + len(lens)
    want = [(i, s) for i, n in enumerate(lens) for s in range(0, n, size)]
    want += [(-1, r) for r in range(sum(lens), num_tokens, size)]
    assert list(zip(seq, start)) == want + [(-1, num_tokens)] * (len(seq) - len(want))


def test_block_tokens_share_64_rows_among_the_query_heads_of_a_kv_head():
    assert [pt.block_tokens(rep * 2, 2) for rep in (1, 2, 3, 4, 8)] == [64, 32, 21, 16, 8]
    with pytest.raises(ValueError, match=r"Hq=6 query heads over Hkv=4 KV heads; Hq must be a multiple of Hkv"):
        pt.block_tokens(6, 4)


def test_host_helpers_reject_steps_larger_than_the_bucket():
    with pytest.raises(ValueError, match=r"seq_lens \[5, 4\] \(sum 9\) must be >= 0 and fit the bucket's 8 rows"):
        pt.block_table([5, 4], 8, 2, 1)
    with pytest.raises(ValueError, match=r"the step has 9 tokens but the bucket 8 rows"):
        pt.token_targets([5, 4], [0, 0], [0, 1], 8, 2)


def test_token_targets_put_padding_rows_on_the_scratch_slot():
    slot, pos = pt.token_targets([2, 0, 1], [3, 0, 7], [1, 4, 0], 5, 4).tolist()
    assert (slot, pos) == ([1, 1, 0, 4, 4], [3, 4, 7, 0, 0])


@pytest.mark.parametrize("bad", ["rep", "dk", "v_cache", "out", "slots", "lens_dims", "blocks", "float_meta"])
def test_prefill_attention_rejects_bad_arguments_naming_them(bad):
    seqs = [(3, 1, 0), (2, 0, 1)]
    q, _, _, k_cache, v_cache = _tensors(6, 3, 8, 2, 2, 16, 16, torch.float32, 0)
    step = Step(seqs, 6, 4, 2, 2)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, starts=step.meta[0], seq_lens=step.meta[1],
                context_lens=step.meta[2], slots=step.meta[3], blocks=step.blocks, out=torch.zeros_like(q))
    args.update({
        "rep": dict(q=q[:, :3]), "dk": dict(q=q[..., :8]), "v_cache": dict(v_cache=v_cache[:, :4]),
        "out": dict(out=args["out"][:, :, :8]), "slots": dict(slots=step.meta[3, :1]),
        "lens_dims": dict(seq_lens=step.meta[1:2]), "float_meta": dict(context_lens=step.meta[2].float()),
        "blocks": dict(blocks=pt.block_table([3, 2, 0, 0], 6, 4, 2).to(DEV)),  # built for 4 sequences, not 2
    }[bad])
    match = {"blocks": r"blocks has shape \(2, 5\), expected \(2, 3\) for T=6 rows, N=2 sequences, Hq=4, Hkv=2",
             "float_meta": r"context_lens must be an integer tensor contiguous in its last dim \(dtype torch.float32"
             }.get(bad, r"q \[.*\], k_cache \[.*\], v_cache \[.*\], out \[.*\], starts/seq_lens/context_lens/slots")
    for _ in range(2):  # checks run once per metadata: a failure must raise every time
        with pytest.raises(ValueError, match=match):
            pt.prefill_attention(scale=0.25, **args)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("kernel", ["triton", "flash"])
def test_write_kv_and_prefill_attention_captured_in_graph_replay_two_packings(kernel):
    """One graph of a 256-row bucket with at most 4 sequences, its static buffers refilled for a prefill + extend
    + decode step and then for a different packing (other lengths, contexts and slots). FA's metadata is derived
    inside the graph from the same buffers."""
    num_tokens, max_seqs, hkv, rep, d, num_slots, dtype = 256, 4, 2, 4, 128, 6, torch.bfloat16
    packings = [[(100, 0, 2), (1, 37, 0), (60, 20, 4), (0, 0, 5)], [(7, 5, 1), (120, 0, 3), (1, 0, 0), (1, 200, 4)]]
    q, k, v, k_cache, v_cache = _tensors(num_tokens, num_slots, 300, hkv, rep, d, d, dtype, 0)
    first = Step(packings[0], num_tokens, hkv * rep, hkv, num_slots - 1)
    meta, blocks, targets = first.meta.clone(), first.blocks.clone(), first.targets.clone()
    out = torch.full((num_tokens, hkv * rep, d), float("nan"), device=DEV, dtype=dtype)

    def run():
        pt.write_kv(k, v, k_cache, v_cache, *targets)
        if kernel == "flash":
            rows = prefill_flash.key_rows(*meta, k_cache.shape[1], num_tokens)
            prefill_flash.flash_prefill_attention(q, k_cache, v_cache, *rows, out, d**-0.5)
        else:
            pt.prefill_attention(q, k_cache, v_cache, *meta, blocks, out, d**-0.5)

    run()  # warm-up: compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    assert meta.shape == (4, max_seqs)
    for seed, seqs in enumerate(packings, start=1):
        step = Step(seqs, num_tokens, hkv * rep, hkv, num_slots - 1)
        new = _tensors(num_tokens, 1, 1, hkv, rep, d, d, dtype, seed)[:3]
        for buf, value in zip((q, k, v, meta, blocks, targets), (*new, step.meta, step.blocks, step.targets)):
            buf.copy_(value)
        k_want, v_want = k_cache.clone(), v_cache.clone()
        step.write_kv(k, v, k_want, v_want)
        want = step.reference(q, k_want, v_want, d)
        out.fill_(float("nan"))
        graph.replay()
        _assert_written_only(k_cache, k_want, k, step)
        _assert_written_only(v_cache, v_want, v, step)
        torch.testing.assert_close(out.float(), want, rtol=TOL[dtype], atol=TOL[dtype])
        assert torch.equal(out[step.real_tokens:], torch.zeros_like(out[step.real_tokens:]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 90), min_size=1, max_size=5), st.integers(0, 70),
       st.sampled_from([(8, 2), (4, 4), (6, 2), (16, 2)]))
def test_device_block_table_is_the_host_table(lens, extra, heads):
    """mode=full rebuilds the block table on the device at every replay from the step's sequence lengths."""
    tokens = sum(lens) + extra
    if tokens == 0:
        return
    want = pt.block_table(lens, tokens, *heads)
    assert torch.equal(pt.device_block_table(torch.tensor(lens, device=DEV), tokens, *heads).cpu(), want)
