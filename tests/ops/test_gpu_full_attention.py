"""Full attention's eager path for a step of several sequences over a cache (pcg's and bcg's prefill, extend and
mixed steps between graphs): one launch of the varlen Triton kernel gives what the per-sequence SDPA walk gives, out
and cache, padding rows zero. Run on the device: python3 -m pytest -m gpu tests/ops/test_gpu_full_attention.py."""
from __future__ import annotations

import pytest
import torch

from hattn.context import ForwardContext, forward_context
from hattn.models.cache import HybridCache
from hattn.ops import full

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (4, 4, 256)])
def test_several_sequences_in_one_launch_equal_the_per_sequence_walk(dtype, tol, hq, hkv, d, monkeypatch):
    # a decode row, an extend, an empty sequence, a prompt past one query block; then 5 padding rows
    lens, past, slots, padding = [1, 13, 0, 70], [7, 5, 0, 0], [2, 0, 3, 1], 5
    rows = sum(lens) + padding
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(rows, h, d, device="cuda", generator=gen, dtype=dtype) for h in (hq, hkv, hkv))
    spec = {0: full.cache_spec(hkv, d)}
    cached = [t.normal_(generator=gen) for t in HybridCache(spec, 4, 128, dtype, "cuda").state(0)]
    walk, walked = full._per_sequence, []
    monkeypatch.setattr(full, "_per_sequence", lambda *a: walked.append(1) or walk(*a))
    results = {}
    for one_launch in (True, False):
        if not one_launch:
            monkeypatch.setattr(full, "use_triton", lambda t: False)
        cache = HybridCache(spec, 4, 128, dtype, "cuda")
        for state, contents in zip(cache.state(0), cached):
            state.copy_(contents)  # tokens the extend and the decode row attend to
        out = torch.full((rows, hq, d), float("nan"), device="cuda", dtype=dtype)
        with forward_context(ForwardContext(lens, past, slots, cache=cache)):
            full._full_attention(q, k, v, out, 0, d ** -0.5)
        results[one_launch] = out, cache.state(0), len(walked)
    (packed, packed_cache, walks), (walked_out, walked_cache, all_walks) = results[True], results[False]
    assert walks == 0 and all_walks == 1  # the first run took the one launch, the second the walk
    torch.testing.assert_close(packed, walked_out, atol=tol, rtol=tol)
    assert torch.all(packed[sum(lens):] == 0)
    for a, b in zip(packed_cache, walked_cache):
        assert torch.equal(a, b)


def test_a_gqa_ratio_past_the_kernels_bound_walks_the_sequences(monkeypatch):
    """Hq / Hkv above the varlen kernel's BLOCK_M query heads per KV head (an MQA model of 71 heads, say): SDPA."""
    from hattn.kernels.attention.prefill_triton import BLOCK_M

    hq, hkv, d = 2 * BLOCK_M, 1, 32
    lens, past, slots = [3, 4], [0, 2], [0, 1]
    q, k, v = (torch.randn(sum(lens), h, d, device="cuda") for h in (hq, hkv, hkv))
    cache = HybridCache({0: full.cache_spec(hkv, d)}, 2, 16, torch.float32, "cuda")
    walk, walked = full._per_sequence, []
    monkeypatch.setattr(full, "_per_sequence", lambda *a: walked.append(1) or walk(*a))
    out = torch.empty(sum(lens), hq, d, device="cuda")
    with forward_context(ForwardContext(lens, past, slots, cache=cache)):
        full._full_attention(q, k, v, out, 0, d ** -0.5)
    assert walked == [1] and out.isfinite().all()
