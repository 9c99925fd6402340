"""Generation: packed prefill + decode, stop tokens, sampling, cache sizing errors, slot reuse."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.models.generate import SamplingParams, generate, sample

GREEDY = SamplingParams(max_new_tokens=32)


def test_slots_are_reused_across_calls(make_case):
    c = make_case("tiny")
    cache = c.lm.make_cache(slots=4, max_len=64)
    other = generate(c.lm, [[1, 2, 3, 4, 5, 6, 7]] * 4, cache, SamplingParams(max_new_tokens=8))  # dirty all slots
    assert len(other.tokens) == 4 and cache.num_free == 4
    assert generate(c.lm, c.prompts, cache, GREEDY).tokens == c.ref.tokens
    assert generate(c.lm, c.prompts, cache, GREEDY).tokens == c.ref.tokens


def test_stop_tokens_end_sequences_others_continue(make_case):
    c = make_case("tiny")
    stop = c.ref.tokens[0][5]
    res = generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=32, stop_tokens=(stop,)))
    for got, want in zip(res.tokens, c.ref.tokens):
        end = want.index(stop) + 1 if stop in want else len(want)
        assert got == want[:end]
    assert len(res.tokens[0]) <= 6


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 12), min_size=1, max_size=4), st.integers(0, 2**16))
def test_packed_batch_equals_each_prompt_alone(make_case, lens, seed):
    c = make_case("tiny")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, c.lm.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    params = SamplingParams(max_new_tokens=4)
    together = generate(c.lm, prompts, params=params).tokens
    assert together == [generate(c.lm, [p], params=params).tokens[0] for p in prompts]


def test_seeded_sampling_is_reproducible(make_case):
    c = make_case("tiny")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = generate(c.lm, c.prompts, params=params).tokens
    assert a == generate(c.lm, c.prompts, params=params).tokens
    params.seed = 8
    assert a != generate(c.lm, c.prompts, params=params).tokens
    nucleus_of_one = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=7)
    assert generate(c.lm, c.prompts, params=nucleus_of_one).tokens == [t[:8] for t in c.ref.tokens]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.05, 1.0))
def test_top_p_samples_only_from_the_nucleus(seed, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
    probs = logits.softmax(-1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        tok = sample(logits, SamplingParams(temperature=1.0, top_p=top_p), gen)
        for row, t in enumerate(tok.tolist()):
            sorted_p = probs[row].sort(descending=True).values
            mass_before = sorted_p[sorted_p > probs[row, t]].sum()
            assert mass_before < top_p + 1e-6  # t is in the smallest prefix whose mass reaches top_p


def test_cache_too_small_names_the_sizes(make_case):
    c = make_case("tiny")
    cache = c.lm.make_cache(slots=3, max_len=20)
    with pytest.raises(ValueError, match=r"prompt 1 has 17 tokens and max_new_tokens=32: it needs 48 .*max_len=20"):
        generate(c.lm, c.prompts, cache, GREEDY)
    with pytest.raises(ValueError, match="4 prompts but the cache has 3 free slots"):
        generate(c.lm, [[1]] * 4, cache, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="at least one token"):
        generate(c.lm, [[1], []], cache, SamplingParams(max_new_tokens=2))
    assert cache.num_free == 3


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
