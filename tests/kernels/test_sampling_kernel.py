"""GPU: the top_k/top_p sampling kernel keeps what its torch reference keeps (`reference.warped`) and draws from that
distribution; the CUDA-graph replay test excepted, also on CPU under TRITON_INTERPRET=1 (small chunks: many of them,
and rows whose ties spill past a chunk's candidates)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.kernels.launch import interpreting
from hattn.kernels.sampling import reference as ref
from tests.models.test_sampling import _top_k_top_p_by_stable_sort

try:
    from hattn.kernels.sampling import topk_topp
except ImportError:  # no triton: a CPU install
    topk_topp = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(topk_topp is None, reason="needs triton"),
    pytest.mark.skipif(DEV != "cuda" and not interpreting(), reason="needs CUDA (or TRITON_INTERPRET=1 on CPU)"),
]
SMALL_CHUNK = 64


def _near(scores: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Tokens whose cumulative probability in the stable ascending order lies within 1e-5 of 1 - p (float64): a
    float32 sum may keep or drop them."""
    return _top_k_top_p_by_stable_sort(scores, k, p)[1]


def _sample(logits, temperature, k, p, generator=None, min_chunk=SMALL_CHUNK):
    cut = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    tokens = topk_topp.sample_top_k_top_p(logits, temperature, k, p, generator, cut=cut, min_chunk=min_chunk)
    return tokens, cut


@settings(max_examples=40 if interpreting() else 200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), vocab=st.integers(1, 400), tied=st.integers(0, 200), dropped=st.integers(0, 100),
       rounded=st.booleans(), k=st.sampled_from([1, 2, 5, 17, 50, 256]),
       p=st.sampled_from([1.0, 0.999, 0.95, 0.75, 0.5, 1e-3, 0.0]), temperature=st.sampled_from([1.0, 0.7, 1.3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_kernel_keeps_what_the_reference_keeps_and_draws_a_kept_token(batch, vocab, tied, dropped, rounded, k, p,
                                                                      temperature, dtype, seed):
    """Random rows with many ties (rounded scores, a block of equal scores: ties of the k-th score past a chunk's
    candidates) and -inf scores: the kept tokens (the cut) are the reference's, but where a cumulative probability
    is within rounding of 1 - p; the token drawn is a kept one."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 4
    logits = logits.round() if rounded else logits
    logits[:, :min(tied, vocab)] = logits[:, :1]
    logits[:, torch.randint(0, vocab, (dropped,), generator=g)] = -torch.inf
    logits[:, 0] = logits[:, 0].clamp(min=-100.0)  # a finite score in each row (all -inf: no distribution)
    logits = logits.to(dtype).to(DEV)
    tokens, cut = _sample(logits, temperature, k, p, torch.Generator(DEV).manual_seed(seed))
    scores = logits.float().cpu() / temperature
    want = ref.warped(logits.cpu(), temperature, k, p).isfinite()
    got = ref.kept_by_cut(scores, cut.cpu())
    near = _near(scores, k, p) if p < 1 else torch.zeros_like(got)
    assert torch.equal(got | near, want | near)
    assert got.gather(1, tokens.cpu()[:, None]).all()


def test_rows_of_equal_scores_scan_for_their_ties():
    """Every score equal (each chunk's candidates all ties: the row is scanned for the count and the pick): top_p
    keeps the highest ids (the ascending order drops the lowest first), as many as the reference."""
    vocab, k = 300, 20
    logits = torch.zeros(2, vocab, device=DEV)
    for p in (0.5, 0.1):
        tokens, cut = _sample(logits, 1.0, k, p)
        kept = ref.kept_by_cut(logits.cpu(), cut.cpu())
        want = ref.warped(logits.cpu(), 1.0, k, p).isfinite()
        assert torch.equal(kept, want)
        assert kept[:, -1].all() and not kept[:, 0].any()
        assert kept.gather(1, tokens.cpu()[:, None]).all()


@pytest.mark.parametrize("case", ["distinct", "tied at the k-th"])
def test_draws_follow_the_kept_distribution(case):
    """Frequencies of many rows' draws == the reference's probabilities (the tied block's: each tie equally), for
    chunks of the kernel's default size and small ones."""
    if case == "distinct":
        row, k, p = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.25, -0.5], 4, 0.9
    else:  # the k-th score 1.0 is tied four times; top_p drops the lowest ids of them
        row, k, p = [2.5, 1.0, 1.0, -2.0, 1.0, 1.0, 0.0, 2.0], 3, 0.7
    logits = torch.tensor([row])
    probs = ref.warped(logits, 0.8, k, p).softmax(dim=-1)[0].double()
    rows = 300 if interpreting() else 200_000
    g = torch.Generator(DEV).manual_seed(0)
    for min_chunk in (topk_topp.MIN_CHUNK, 16):
        tokens, _ = _sample(logits.expand(rows, -1).contiguous().to(DEV), 0.8, k, p, g, min_chunk)
        freq = torch.bincount(tokens.cpu(), minlength=len(row)).double() / rows
        assert freq[probs == 0].sum() == 0
        torch.testing.assert_close(freq, probs, atol=0.08 if interpreting() else 0.004, rtol=0)


def test_a_seeded_generator_gives_the_same_tokens():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(3)).to(DEV)
    draws = [_sample(logits, 1.0, 50, 0.95, torch.Generator(DEV).manual_seed(s))[0] for s in (7, 7, 8)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])  # 64 rows of ~40 kept tokens: equal by chance ~never


def test_bad_arguments_name_the_problem():
    logits = torch.randn(2, 100, device=DEV)
    with pytest.raises(ValueError, match="top_k must be in 1"):
        topk_topp.sample_top_k_top_p(logits, 1.0, topk_topp.MAX_TOP_K + 1, 0.9)
    with pytest.raises(ValueError, match="contiguous"):
        topk_topp.sample_top_k_top_p(logits.t().contiguous().t(), 1.0, 5, 0.9)
    with pytest.raises(ValueError, match="temperature > 0"):
        topk_topp.sample_top_k_top_p(logits, 0.0, 5, 0.9)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs")
def test_the_kernel_replays_in_a_cuda_graph():
    """Captured once, replayed: each replay draws anew (the default generator's Philox offset moves in a graph) and
    keeps the cut."""
    logits = (torch.randn(16, 248320, device=DEV) * 3).to(torch.bfloat16)
    cut = torch.empty(16, dtype=torch.int64, device=DEV)
    topk_topp.sample_top_k_top_p(logits, 0.7, 50, 0.95, cut=cut)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = topk_topp.sample_top_k_top_p(logits, 0.7, 50, 0.95, cut=cut)
    draws = []
    for _ in range(3):
        graph.replay()
        draws.append(tokens.clone())
    torch.cuda.synchronize()
    scores = logits.float().cpu() / 0.7
    want = ref.warped(logits.cpu(), 0.7, 50, 0.95).isfinite()
    near = _near(scores, 50, 0.95)
    got = ref.kept_by_cut(scores, cut.cpu())
    assert torch.equal(got | near, want | near)
    for d in draws:
        assert got.gather(1, d.cpu()[:, None]).all()
    assert not torch.equal(draws[0], draws[1]) or not torch.equal(draws[1], draws[2])
