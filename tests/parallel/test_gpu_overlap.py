"""Two-batch overlap with two compiled instances on one GPU: micro-batch A's graphs replay on one stream while B's
replay on another. Graphs that replay at once must not share cuBLAS's workspace (a capture stream per backend and
replay stream: runtime/graphs.py, `GraphPools.capture_stream`); a shared one gives wrong logits and no error."""
import pytest
import torch

import hattn
from hattn.context import ForwardContext, forward_context
from hattn.models.toy import toy_cache, toy_model
from hattn.parallel.overlap import TwoBatchOverlap

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LENS = [5, 7, 3, 6]  # micro-batches of 12 and 9 tokens, then decode steps of 2 and 2 sequences
DECODE_STEPS = 24


def _steps(run, c) -> list[torch.Tensor]:
    """A packed prefill of LENS and DECODE_STEPS decode steps (fixed random ids) over a fresh cache."""
    cache, kinds = toy_cache(c, slots=4, max_len=64, dtype=torch.bfloat16, device="cuda"), c.layer_kinds()
    gen = torch.Generator().manual_seed(0)
    slots, outs = [0, 1, 2, 3], []
    steps = [(ForwardContext(LENS, [0] * 4, slots, cache, kinds), sum(LENS))]
    steps += [(ForwardContext([1] * 4, [n + i for n in LENS], slots, cache, kinds), 4) for i in range(DECODE_STEPS)]
    for ctx, tokens in steps:
        ids = torch.randint(0, c.vocab, (tokens,), generator=gen).cuda()
        with forward_context(ctx), torch.no_grad():
            outs.append(run(ids).float())
    return outs


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_two_instances_on_two_streams_equal_the_model(mode):
    torch._dynamo.reset()
    # intermediate 8192: every layer's MLP down projection is a small-M GEMM with K = 8192, which cuBLAS splits over
    # K through its workspace; hattn's skinny GEMM is off, so that cuBLAS serves it
    model = toy_model(pattern=["linear", "full", "linear", "full"], intermediate=8192, dtype=torch.bfloat16,
                      device="cuda")

    backends = []

    def compile(m):
        backends.append(hattn.backend(mode=mode, capture_sizes=[2, 4, 8, 16], inner_compiler="eager",
                                      small_m_gemm=False, progress=False))
        return torch.compile(m, backend=backends[-1], dynamic=True)

    tbo = TwoBatchOverlap.for_model(model, compile=compile, token_dims=(0,))
    got, want = _steps(tbo, model.config), _steps(model, model.config)
    assert all(be.stats.replays > DECODE_STEPS for be in backends), [be.stats.replays for be in backends]
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2, msg=lambda m: f"step {step}: {m}")
