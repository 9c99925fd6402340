"""Fuzzing (issue 8): random hybrid configs, token counts and batch packings; every mode on CPU == eager."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hattn
from hattn.compiler.config import MODES
from hattn.models.toy import toy_model


@st.composite
def cases(draw):
    pattern = draw(st.lists(st.sampled_from(["full", "linear"]), min_size=1, max_size=4))
    k_heads = draw(st.sampled_from([1, 2]))
    shape = dict(
        pattern=pattern,
        hidden=draw(st.sampled_from([16, 32])),
        heads=4, kv_heads=draw(st.sampled_from([1, 2, 4])), head_dim=draw(st.sampled_from([8, 16])),
        k_heads=k_heads, v_heads=k_heads * draw(st.sampled_from([1, 2])), k_dim=8, v_dim=8,
        conv_kernel=draw(st.sampled_from([2, 4])), intermediate=32,
    )
    seq_lens = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(lambda s: sum(s) > 0))
    return shape, seq_lens, draw(st.sampled_from(MODES)), draw(st.integers(0, 1000))


@settings(max_examples=25)
@given(cases())
def test_every_mode_equals_eager_on_random_configs(case):
    shape, seq_lens, mode, seed = case
    torch._dynamo.reset()
    model = toy_model(seed=seed, **shape)
    ids = torch.randint(0, 128, (sum(seq_lens),), generator=torch.Generator().manual_seed(seed))
    compiled = torch.compile(model, backend=hattn.backend(mode=mode, inner_compiler="eager"))
    with hattn.forward_context(hattn.ForwardContext(seq_lens=seq_lens)):
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-5, atol=1e-5)
