"""hattn's next-token choice against transformers' logits processors: the same filtered scores for random logits
and settings, and generate's tokens equal to transformers' generate with the stateful settings (repetition penalty,
min_new_tokens) on every family."""
import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                    MinPLogitsWarper, NoRepeatNGramLogitsProcessor,
                                                    RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import hattn
from hattn.models import sampling
from hattn.models.sampling import Sampler, SamplingParams, ban_repeated_ngrams, penalize, sample, warp
from hattn.models.hf_generate import repad
from tests.models.test_frontdoor import HF_BATCH_DIVERGES, PAD, fresh, padded


def _hf_processors(p: SamplingParams, prompt_len: int) -> LogitsProcessorList:
    """transformers' processors for `p` (as GenerationMixin._get_logits_processor orders them)."""
    procs = []
    if p.repetition_penalty != 1:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if p.min_new_tokens and p.stop_tokens:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, p.min_new_tokens, torch.tensor(p.stop_tokens)))
    if p.temperature:
        procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(TopPLogitsWarper(p.top_p))
        if p.min_p:
            procs.append(MinPLogitsWarper(p.min_p))
    return LogitsProcessorList(procs)


@st.composite
def cases(draw):
    batch, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 300))
    params = SamplingParams(
        temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 1.7])),
        top_k=draw(st.sampled_from([0, 1, 5, 50, 400])),
        top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 1e-3])),
        min_p=draw(st.sampled_from([0.0, 0.05, 0.5])),
        repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.7])),
        no_repeat_ngram_size=draw(st.sampled_from([0, 0, 1, 2, 3])),
        min_new_tokens=draw(st.integers(0, 3)),
        stop_tokens=tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=2))),
    )
    history = draw(st.integers(1, 12))  # tokens so far per row: the prompt (same length in every row) + new ones
    return params, batch, vocab, history, draw(st.integers(0, history - 1)), draw(st.integers(0, 2**16))


@contextlib.contextmanager
def _switch(name: str, value):
    old = getattr(sampling, name)
    setattr(sampling, name, value)
    try:
        yield
    finally:
        setattr(sampling, name, old)


@settings(max_examples=200, deadline=None)
@given(cases())
def test_filtered_scores_are_transformers(case):
    """Bit for bit, with top_p sorting the vocabulary after top_k as transformers does (top_p over top_k's survivors,
    the default from 32 rows, differs where transformers' unstable sort is arbitrary: the next test)."""
    with _switch("TOP_P_AFTER_TOP_K_MIN_ROWS", 10**9):
        _filtered_scores_are_transformers(case)


def _filtered_scores_are_transformers(case):
    params, batch, vocab, history, new, seed = case
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 4
    logits[:, :vocab // 3] = logits[:, :1]  # ties, as a bf16 model's logits have
    ids = torch.randint(0, min(vocab, 4), (batch, history), generator=g)  # few distinct tokens: n-grams repeat
    want = _hf_processors(params, history - new)(ids, logits.clone())
    got = logits
    if params.repetition_penalty != 1:
        seen = torch.zeros(batch, vocab, dtype=torch.bool).scatter_(1, ids, True)
        got = penalize(got, seen, params.repetition_penalty)
    if params.no_repeat_ngram_size:  # the history in a wider buffer, as the sampler keeps it
        buffer = torch.cat([ids, torch.randint(0, vocab, (batch, 5), generator=g)], dim=1)
        got = ban_repeated_ngrams(got, buffer, torch.full((batch,), history), params.no_repeat_ngram_size)
    if new < params.min_new_tokens and params.stop_tokens:
        got = got.index_fill(-1, torch.tensor(params.stop_tokens), -torch.inf)
    if params.temperature:
        got = warp(got, params)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _top_k_top_p_by_stable_sort(scores: torch.Tensor, k: int, p: float):
    """transformers' TopK then TopP warpers with a stable sort (ties in id order), and where each token's cumulative
    probability (float64) lies within 1e-5 of 1 - p (a float32 sum may fall on either side there)."""
    scores = TopKLogitsWarper(k)(None, scores.clone())
    ascending, order = scores.sort(dim=-1, stable=True)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    near = (ascending.double().softmax(dim=-1).cumsum(dim=-1) - (1 - p)).abs() < 1e-5
    return scores.masked_fill(drop.scatter(-1, order, drop), -torch.inf), near.scatter(-1, order, near)


@settings(max_examples=300, deadline=None)
@given(batch=st.integers(1, 3), vocab=st.integers(2, 400), tied=st.integers(0, 200), dropped=st.integers(0, 100),
       rounded=st.booleans(), k=st.sampled_from([1, 2, 5, 50, 500]),
       p=st.sampled_from([0.999, 0.95, 0.75, 0.5, 1e-3, 0.0]), seed=st.integers(0, 2**16))
def test_top_p_over_top_ks_survivors_is_the_stable_sorts(batch, vocab, tied, dropped, rounded, k, p, seed):
    """The default top_k + top_p (no sort of the vocabulary: the survivors are the top k and the tokens tied with the
    k-th, any number of them) keeps what transformers' warpers keep with a stable sort, but where a cumulative
    probability is within rounding of 1 - p; and as many tokens as transformers' own (unstable) sort keeps: among
    equal scores only which ones go may differ."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 4
    logits = logits.round() if rounded else logits  # many ties, at the k-th score too
    logits[:, :min(tied, vocab)] = logits[:, :1]
    logits[:, torch.randint(0, vocab, (dropped,), generator=g)] = -torch.inf  # banned tokens: their ties too
    params = SamplingParams(temperature=1.0, top_k=k, top_p=p)
    with _switch("TOP_P_AFTER_TOP_K_MIN_ROWS", 0):
        got = warp(logits, params)
    want, near = _top_k_top_p_by_stable_sort(logits, k, p)
    assert torch.equal(got.isfinite() | near, want.isfinite() | near)
    assert torch.equal(got[got.isfinite()], logits[got.isfinite()])  # kept tokens keep their scores
    assert torch.equal(got.amax(dim=-1), logits.amax(dim=-1))  # the most likely token stays, whatever p
    transformers_kept = _hf_processors(params, 0)(None, logits.clone()).isfinite().sum(dim=-1)
    exact = ~near.any(dim=-1)
    assert torch.equal(got.isfinite().sum(dim=-1)[exact], transformers_kept[exact])


def test_top_p_after_top_k_sorts_below_the_row_threshold_and_ranks_survivors_from_it(monkeypatch):
    """The default picks by rows: fewer than TOP_P_AFTER_TOP_K_MIN_ROWS sort as transformers (bit for bit), from
    there top_k's survivors are ranked (spied)."""
    calls = []
    real = sampling.top_k_top_p
    monkeypatch.setattr(sampling, "top_k_top_p", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.8)
    for rows in (1, sampling.TOP_P_AFTER_TOP_K_MIN_ROWS - 1, sampling.TOP_P_AFTER_TOP_K_MIN_ROWS):
        logits = torch.randn(rows, 500, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16).float()
        got = warp(logits, params)
        if rows < sampling.TOP_P_AFTER_TOP_K_MIN_ROWS:
            torch.testing.assert_close(got, _hf_processors(params, 0)(None, logits.clone()), rtol=0, atol=0)
    assert calls == [sampling.TOP_P_AFTER_TOP_K_MIN_ROWS]


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    probs = warp(logits, params).softmax(-1)[0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits.expand(4000, -1), params, g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[probs == 0].sum() == 0  # filtered tokens are never drawn
    torch.testing.assert_close(freq, probs.double(), atol=0.01, rtol=0)


def test_the_sampler_remembers_the_tokens_it_chose_and_counts_new_tokens():
    params = SamplingParams(repetition_penalty=2.0, min_new_tokens=2, stop_tokens=(0,))
    sampler = Sampler(params, [[3], [3]])
    logits = torch.tensor([[9.0, 1.0, 2.0, 8.0], [9.0, 4.0, 3.5, 1.0]])
    assert sampler(logits).tolist() == [3, 1]  # 0 masked (a stop token before 2 new tokens); 3 seen: 8 -> 4
    assert sampler(logits).tolist() == [3, 2]  # row 1 chose 1 (4 -> 2 now): 2 wins
    assert sampler(logits).tolist() == [0, 0]  # 2 new tokens: the stop token may come
    assert sampler.seen.tolist() == [[True, False, False, True], [True, True, True, True]]


def test_stop_ids_past_the_vocabulary_are_not_masked_and_top_p_0_keeps_the_top_token():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    params = SamplingParams(min_new_tokens=1, stop_tokens=(1, 7), repetition_penalty=1.5, no_repeat_ngram_size=1)
    sampler = Sampler(params, [[0, 9, 9]])
    assert sampler(logits).tolist() == [2]  # 1 masked, 7 ignored; 9 (past the vocabulary) neither penalized nor banned
    many = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    top = SamplingParams(temperature=1.0, top_p=0.0)  # transformers keeps the most likely token alone
    assert torch.equal(sample(many, top, torch.Generator().manual_seed(1)), many.argmax(-1))


@pytest.mark.parametrize("args", [dict(top_k=-1), dict(top_k=2.5), dict(min_p=1.5), dict(repetition_penalty=0.0),
                                  dict(min_new_tokens=-1), dict(no_repeat_ngram_size=-2),
                                  dict(temperature=float("nan")), dict(temperature=float("inf")),
                                  dict(temperature="0.5"), dict(top_p=float("nan")), dict(top_p=1.5), dict(top_p=-0.1),
                                  dict(seed="a"),
                                  dict(stop_tokens="2"), dict(stop_tokens=[-1]), dict(stop_tokens=[2 ** 64]),
                                  dict(stop_tokens=[1.0]), dict(max_new_tokens=True)],
                         ids=lambda a: f"{next(iter(a))}={next(iter(a.values()))!r}")
def test_settings_out_of_range_name_themselves(args):
    with pytest.raises(ValueError, match=next(iter(args))):
        SamplingParams(**args)


def test_stop_tokens_take_one_id_or_none_as_transformers_eos_does():
    assert SamplingParams(stop_tokens=2).stop_tokens == (2,)
    assert SamplingParams(stop_tokens=None).stop_tokens == ()
    assert SamplingParams(stop_tokens=[3, 4]).stop_tokens == (3, 4)


def test_tuple_prompts_serve_the_ngram_rule(make_case):
    c = make_case("tiny")
    params = SamplingParams(max_new_tokens=6, no_repeat_ngram_size=2)
    assert hattn.generate(c.lm, [(5, 6, 5)], params=params).tokens == hattn.generate(c.lm, [[5, 6, 5]],
                                                                                     params=params).tokens


def test_generate_with_penalty_and_min_new_tokens_equals_transformers(family_case):
    c = family_case
    ids, mask = padded(c.prompts)
    stop = c.ref.tokens[0][1]  # the second greedy token of row 0: min_new_tokens keeps it out of the first two
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=stop,
                  repetition_penalty=1.8, min_new_tokens=3)
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if c.preset in HF_BATCH_DIVERGES:  # transformers' padded batch differs from its prompts alone: those
            alone = [c.hf.generate(torch.tensor([p]), **{**kwargs, "attention_mask": None})[0, len(p):].tolist()
                     for p in c.prompts]
            want = repad(ids, [row[:row.index(stop) + 1] if stop in row else row for row in alone], PAD)
        else:
            want = c.hf.generate(ids, **kwargs)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    unpenalized = model.generate(ids, **{**kwargs, "repetition_penalty": 1.0, "min_new_tokens": 0})
    assert not torch.equal(got, unpenalized)  # the settings changed the tokens: the comparison above tested them


@pytest.mark.parametrize("n", [1, 3])
def test_no_repeat_ngram_size_equals_transformers_over_prompts_of_unequal_lengths(make_case, n):
    c = make_case("tiny")
    prompts, new = [[5, 6, 5, 6, 5], [7, 8, 7], [9]], 24
    got = hattn.generate(c.lm, prompts, params=SamplingParams(max_new_tokens=new, no_repeat_ngram_size=n)).tokens
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = [c.hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, no_repeat_ngram_size=n,
                              eos_token_id=None, pad_token_id=PAD)[0, len(p):].tolist() for p in prompts]
    assert got == want
    for prompt, tokens in zip(prompts, got):
        row = prompt + tokens
        for k in range(len(prompt), len(row)):  # no new token completes an n-gram seen before it
            assert tuple(row[k - n + 1:k + 1]) not in set(zip(*(row[i:k] for i in range(n))))
    if n == 1:  # the control: greedy repeats a token within 24 (the setting changed the tokens compared above)
        assert got != hattn.generate(c.lm, prompts, params=SamplingParams(max_new_tokens=new)).tokens


def test_num_return_sequences_samples_each_input_that_many_times(make_case):
    c = make_case("tiny")
    ids, mask = padded(c.prompts)
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, seed=5,
                  pad_token_id=PAD, num_return_sequences=3)
    out = model.generate(ids, **kwargs)
    assert out.shape == (3 * len(c.prompts), ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))  # transformers' row order
    assert len({tuple(row) for row in out[:3, ids.shape[1]:].tolist()}) > 1  # the copies draw on their own
    assert torch.equal(out, model.generate(ids, **kwargs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sampler_chooses_on_cuda_what_it_chooses_on_the_cpu():
    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=2,
                            stop_tokens=(3, 999))  # 999: past the vocabulary
    prompts = [[1, 2, 1, 60], [4]]  # 60: past the vocabulary
    steps = torch.randn(8, 2, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    cpu, gpu = Sampler(params, prompts), Sampler(params, prompts)
    for logits in steps:
        assert torch.equal(cpu(logits), gpu(logits.cuda()).cpu())
    assert torch.equal(cpu.history, gpu.history.cpu()) and torch.equal(cpu.seen, gpu.seen.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 16])
def test_top_p_over_top_ks_survivors_on_cuda_keeps_what_the_stable_sort_keeps(batch, monkeypatch):
    """The default top_k + top_p on CUDA (its topk and small stable sorts) at the preset's vocabulary, bf16 logits
    (ties at the k-th score are common there): the stable sort's survivors, but within rounding of 1 - p."""
    monkeypatch.setattr(sampling, "TOP_P_AFTER_TOP_K_MIN_ROWS", 0)
    logits = (torch.randn(batch, 248320, generator=torch.Generator().manual_seed(1)) * 3).to(torch.bfloat16).float()
    for k, p in [(50, 0.95), (20, 0.8), (1000, 0.5)]:
        params = SamplingParams(temperature=0.7, top_k=k, top_p=p)
        got = warp(logits.cuda(), params).cpu()
        want, near = _top_k_top_p_by_stable_sort(logits / 0.7, k, p)
        assert torch.equal(got.isfinite() | near, want.isfinite() | near)


def test_the_sampler_routes_top_k_sampling_to_the_kernel_where_it_serves(monkeypatch):
    """Where the kernel serves (CUDA, top_k 1..256, no min_p, no kept scores, not switched off), the Sampler's
    tokens are the kernel's (a stand-in here, on CPU); else warp + draw choose them."""
    calls = []

    def kernel(rows, temperature, k, p, generator):
        calls.append((rows.shape, temperature, k, p))
        return torch.zeros(rows.shape[0], dtype=torch.long)

    monkeypatch.setattr(sampling, "use_triton", lambda t: True)
    monkeypatch.setattr(sampling, "_kernel", lambda logits, params: kernel if sampling._serves(logits, params)
                        else None)
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(0))
    served = SamplingParams(temperature=0.7, top_k=50, top_p=0.9)
    assert Sampler(served, [[1], [2]])(logits).tolist() == [0, 0] and calls == [((2, 300), 0.7, 50, 0.9)]
    keep = Sampler(served, [[1], [2]], torch.Generator().manual_seed(0), keep=True)
    keep(logits)
    assert keep.scores is not None and torch.equal(keep.scores, warp(logits.float(), served))
    for params in (SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0.7, top_k=257),
                   SamplingParams(temperature=0.7, top_k=50, min_p=0.1), SamplingParams()):
        Sampler(params, [[1], [2]], torch.Generator().manual_seed(0))(logits)
    monkeypatch.setattr(sampling, "fused_sampling", False)
    Sampler(served, [[1], [2]], torch.Generator().manual_seed(0))(logits)
    assert len(calls) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sampler_on_cuda_draws_with_the_kernel_from_the_reference_distribution():
    """generate's Sampler on CUDA (the kernel) at the preset's vocabulary: every token drawn is one that the torch
    path keeps (with the stable sort's rule for ties, or within rounding of 1 - p), and a seeded generator repeats
    its tokens."""
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.95)
    logits = (torch.randn(16, 248320, generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    want, near = _top_k_top_p_by_stable_sort(logits.float() / 0.7, 50, 0.95)
    allowed = want.isfinite() | near
    runs = []
    for _ in range(2):
        sampler = Sampler(params, [[1]] * 16, torch.Generator("cuda").manual_seed(5))
        runs.append(torch.stack([sampler(logits.cuda()) for _ in range(20)]).cpu())
    assert torch.equal(runs[0], runs[1])
    assert allowed.gather(1, runs[0].T).all()
