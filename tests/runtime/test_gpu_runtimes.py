"""PCG, BCG and full graph on the GPU: replay == eager, split ops eager on every replay, segments, pool sharing,
the seed-000 regression. Run on the device: python3 -m pytest -m gpu tests/runtime."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hattn
from hattn.models.cache import HybridCache, full_spec, linear_spec
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_model
from hattn.passes.guards import UnregisteredAttentionError
from hattn.runtime.breakable import BreakableGraphRunner
from hattn.runtime.full import NotCaptureSafeError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SIZES = [1, 2, 4, 8, 16, 32]
PATTERN = ["linear", "linear", "full", "linear"]


def _ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


_COMPILED = {}


def _compiled(mode):
    """One compiled model per mode for the whole module (compiles once, captures once)."""
    if mode not in _COMPILED:
        model = toy_model(pattern=PATTERN, device="cuda")
        be = hattn.backend(mode=mode, capture_sizes=SIZES, inner_compiler="eager", progress=False)
        fn = torch.compile(model, backend=be, dynamic=True)
        _COMPILED[mode] = (model, fn, be)
    return _COMPILED[mode]


@pytest.fixture(autouse=True)
def _reset_dynamo():  # overrides the CPU suite's per-test reset: keep the compiled models
    yield


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 1000), fresh=st.booleans())
def test_replay_equals_eager_for_random_token_counts(mode, n, seed, fresh):
    model, fn, be = _compiled(mode)
    ids = _ids(n, seed)
    if fresh:  # the same content at a new address
        ids = ids.clone()
    with torch.no_grad():
        torch.testing.assert_close(fn(ids), model(ids), rtol=2e-4, atol=2e-4)
    if n <= max(SIZES):
        assert be.stats.replays > 0
    assert be.stats.cuda_graphs > 0


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_outputs_are_owned_across_replays(mode):
    model, fn, _ = _compiled(mode)
    with torch.no_grad():
        first = fn(_ids(5, 1))
        kept = first.clone()
        fn(_ids(5, 2))  # same size: same graphs replayed
    torch.testing.assert_close(first, kept)


# -- split ops run eagerly on every replay: an op reading a per-step host value -----------------------------------
@torch.library.custom_op("hattn_test::add_step_bias", mutates_args=())
def add_step_bias(x: torch.Tensor) -> torch.Tensor:
    return x + float(hattn.runtime.context.get_forward_context().extra["bias"])


@add_step_bias.register_fake
def _(x):
    return torch.empty_like(x)


hattn.register_split_op(torch.ops.hattn_test.add_step_bias, "stepbias")


class StepBias(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.proj = nn.Linear(c.hidden, c.hidden, bias=False)

    def forward(self, x):
        return self.proj(torch.ops.hattn_test.add_step_bias(x))


def _step_bias_model():
    torch.manual_seed(0)
    return ToyHybridModel(ToyConfig(pattern=["stepbias", "linear", "stepbias"]), {"stepbias": StepBias}).cuda().eval()


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_split_ops_run_eagerly_on_every_replay(mode):
    model = _step_bias_model()
    fn = torch.compile(model, backend=hattn.backend(mode=mode, capture_sizes=[8], inner_compiler="eager",
                                                     progress=False))
    ids = _ids(6, 0)
    for bias in (0.0, 1.5, -3.0, 1.5):
        ctx = hattn.ForwardContext(seq_lens=[6], extra={"bias": bias})
        with torch.no_grad(), hattn.forward_context(ctx):
            got = fn(ids)
            want = model(ids)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)


def test_full_mode_rejects_a_split_op_that_is_not_capture_safe():
    fn = torch.compile(_step_bias_model(), backend=hattn.backend(mode="full", capture_sizes=[8],
                                                                  inner_compiler="eager"))
    with pytest.raises(Exception, match="hattn_test::add_step_bias is not registered capture-safe"):
        with hattn.forward_context(hattn.ForwardContext(seq_lens=[6], extra={"bias": 0.0})):
            fn(_ids(6, 0))


# -- BCG on a plain module ----------------------------------------------------------------------------------------
def test_bcg_segments_equal_split_calls_plus_one_and_match_eager():
    model = toy_model(pattern=PATTERN, device="cuda")
    runner = BreakableGraphRunner(model, capture_sizes=[4, 8], progress=False)
    with torch.no_grad():
        for n, seed in [(3, 0), (8, 1), (5, 2), (11, 3)]:
            torch.testing.assert_close(runner(_ids(n, seed)), model(_ids(n, seed)), rtol=2e-4, atol=2e-4)
    assert runner.segments(4) == runner.segments(8) == len(PATTERN) + 1
    assert runner.stats.eager_runs == 1  # 11 tokens > 8


class SdpaMixer(nn.Module):
    def __init__(self, c: ToyConfig, layer_id: int):
        super().__init__()
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(0).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)[0]


def test_seed000_unregistered_attention_rejected_before_capture():
    torch.manual_seed(0)
    model = ToyHybridModel(ToyConfig(pattern=["linear", "sdpa"]), {"sdpa": SdpaMixer}).cuda().eval()
    with torch.no_grad(), pytest.raises(UnregisteredAttentionError, match="scaled_dot_product"):
        BreakableGraphRunner(model, capture_sizes=[4], progress=False)(_ids(3, 0))
    with torch.no_grad(), pytest.raises(Exception, match="not a registered hattn split op"):
        torch.compile(model, backend=hattn.backend(mode="bcg", capture_sizes=[4]))(_ids(3, 0))
    # a later capture of a good model still works (capture state restored)
    good = toy_model(pattern=["linear", "full"], device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(BreakableGraphRunner(good, [4], progress=False)(_ids(3, 0)), good(_ids(3, 0)),
                                   rtol=2e-4, atol=2e-4)


def test_one_pool_for_sixteen_sizes():
    sizes = [8 * i for i in range(1, 17)]
    pools = {}
    for name, sz in (("largest", sizes[-1:]), ("all16", sizes)):
        model = toy_model(pattern=PATTERN, device="cuda", hidden=256, intermediate=1024)
        runner = BreakableGraphRunner(model, capture_sizes=sz, progress=False)
        with torch.no_grad():
            runner(_ids(5, 0))
        pools[name] = runner.stats.pool_bytes
    assert pools["all16"] <= 2 * max(pools["largest"], 2 << 20), pools


# -- full graph: decode steps with a cache ------------------------------------------------------------------------
def _toy_cache(c: ToyConfig, slots=4, max_len=64):
    conv_dim = 2 * c.k_heads * c.k_dim + c.v_heads * c.v_dim
    specs = {i: full_spec(c.kv_heads, c.head_dim) if k == "full" else
             linear_spec(conv_dim, c.conv_kernel, c.v_heads, c.k_dim, c.v_dim) for i, k in enumerate(c.pattern)}
    return HybridCache(specs, slots, max_len, torch.float32, "cuda")


@pytest.mark.parametrize("mode", ["full", "pcg", "bcg"])
def test_decode_steps_with_cache_equal_eager(mode):
    model = toy_model(pattern=PATTERN, device="cuda")
    fn = torch.compile(model, backend=hattn.backend(mode=mode, capture_sizes=[1, 2, 4], inner_compiler="eager",
                                                     progress=False), dynamic=True)
    caches = [_toy_cache(model.config), _toy_cache(model.config)]
    prompts = [[3, 5, 7], [11, 2], [9]]
    lens = [len(p) for p in prompts]
    ids = torch.tensor(sum(prompts, []), device="cuda")
    outs = []
    with torch.no_grad():
        for cache, run in zip(caches, (model, fn)):
            ctx = hattn.ForwardContext(seq_lens=lens, slots=[0, 1, 2], cache=cache)
            with hattn.forward_context(ctx):
                logits = [model(ids)]  # prefill eagerly in both
            ctx_lens, tok = list(lens), torch.tensor([1, 2, 3], device="cuda")
            for step in range(5):
                ctx = hattn.ForwardContext(seq_lens=[1, 1, 1], context_lens=ctx_lens, slots=[0, 1, 2], cache=cache)
                with hattn.forward_context(ctx):
                    out = run(tok)
                logits.append(out)
                tok = out.argmax(-1)
                ctx_lens = [c + 1 for c in ctx_lens]
            outs.append(logits)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=2e-4, atol=2e-4)
    be_stats = hattn.stats()
    assert be_stats.cuda_graphs > 0
