"""Generation: packed prefill + decode, stop tokens, sampling, cache sizing errors, slot reuse."""
import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hattn.context import ForwardContext, forward_context
from hattn.models.generate import generate
from hattn.models.sampling import SamplingParams, sample

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
    for got, want in zip(res.tokens, c.ref.tokens, strict=True):
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


def test_kept_scores_and_logits_are_one_per_token_column(make_case):
    c = make_case("tiny")
    stop = c.ref.tokens[0][2]
    res = generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=12, stop_tokens=(stop,)),
                   keep=("scores", "logits"))
    width = max(map(len, res.tokens))
    assert len(res.scores) == len(res.logits) == width  # not the steps the loop may run past every stop
    assert all(s.dtype == torch.float32 and s.shape == (3, c.lm.config.vocab_size) for s in res.scores)


def test_keep_names_what_it_takes(make_case):
    with pytest.raises(ValueError, match="keep takes 'scores' and 'logits', got \\('hidden',\\)"):
        generate(make_case("tiny").lm, [[1, 2]], keep=("hidden",))


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_logits_rows_give_the_lm_head_on_those_rows_only(make_case):
    c = make_case("tiny")
    ids, pos = torch.tensor([5, 9, 2, 7, 7, 1]), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.inference_mode():
        every = c.lm(ids, pos)
        rows = torch.tensor([2, 5, 5])
        picked = c.lm(ids, pos, rows)
    assert every.shape == (6, c.lm.config.vocab_size) and picked.shape == (3, c.lm.config.vocab_size)
    torch.testing.assert_close(picked, every[rows])


def test_prefill_asks_for_the_last_row_of_each_prompt_padded_to_the_slot_count(make_case):
    c = make_case("tiny")
    seen = []

    def spy(ids, positions, logits_rows=None):
        seen.append(None if logits_rows is None else logits_rows.tolist())
        return c.lm(ids, positions, logits_rows)

    spy.layer_kinds = c.lm.layer_kinds
    cache = c.lm.make_cache(slots=5, max_len=64)
    got = generate(spy, c.prompts, cache, SamplingParams(max_new_tokens=3)).tokens
    assert got == [t[:3] for t in c.ref.tokens]
    assert [len(p) for p in c.prompts] == [5, 17, 9]  # last rows 4, 21, 30, padded to the cache's 5 slots
    assert seen == [[4, 21, 30, 30, 30], None, None]  # prefill, then two decode steps (every row: 3 of 5 slots)
    seen.clear()
    cache = c.lm.make_cache(slots=3, max_len=64)
    assert generate(spy, c.prompts, cache, SamplingParams(max_new_tokens=3)).tokens == [t[:3] for t in c.ref.tokens]
    assert seen == [[4, 21, 30], [0, 1, 2], [0, 1, 2]]  # the batch fills the slots: its rows are the prefill's count


@pytest.mark.parametrize("pad", [True, False])
def test_a_one_token_prompt_is_padded_to_two_rows_as_a_decode_step_is(make_case, monkeypatch, pad):
    """With `pad_one_token` every one-token step runs as two rows; without it (the default) as one."""
    monkeypatch.setattr(importlib.import_module("hattn.models.generate"), "pad_one_token", pad)
    c = make_case("tiny")
    rows = []

    def spy(ids, positions, logits_rows=None):
        rows.append(len(ids))
        return c.lm(ids, positions, logits_rows)

    spy.layer_kinds = c.lm.layer_kinds
    params = SamplingParams(max_new_tokens=4)
    got = generate(spy, [[7]], c.lm.make_cache(slots=1, max_len=8), params).tokens
    assert got == _reference_loop(c.lm, [[7]], params)
    assert rows == [2 if pad else 1] * 4  # the prefill and three decode steps: one token (and a padding row) each


@pytest.mark.parametrize("prompts, slots, pad, graphs", [(3, 3, True, 1), (2, 2, True, 1), (1, 1, True, 1),
                                                         (3, 5, True, 2), (1, 5, True, 2), (1, 1, False, 1),
                                                         (1, 5, False, 2)])
def test_decode_steps_that_fill_the_cache_replay_the_prefills_graph(make_case, monkeypatch, prompts, slots, pad,
                                                                    graphs):
    """A decode batch that fills the cache's slots names its rows as the prefill does: one Dynamo graph for the whole
    generate, batch 1 included (its one token served by the graph traced for every size, padded to two rows or not).
    Fewer sequences than slots return every row (a second graph, no LM head on empty slots)."""
    from hattn.compiler.backend import backend

    gen_mod = importlib.import_module("hattn.models.generate")
    monkeypatch.setattr(gen_mod, "pad_one_token", pad)
    c = make_case("tiny")
    be = backend(mode="eager", inner_compiler="eager", progress=False)
    got = generate(torch.compile(c.lm, backend=be), c.prompts[:prompts], c.lm.make_cache(slots=slots, max_len=64),
                   SamplingParams(max_new_tokens=4))
    assert got.tokens == [t[:4] for t in c.ref.tokens[:prompts]]
    assert be.stats.graphs_compiled == graphs


def test_a_prefill_step_with_fewer_logits_rows_than_prompts_is_refused(make_case):
    from hattn.models.generate import step_inputs

    c = make_case("tiny")
    cache = c.lm.make_cache(slots=3, max_len=64)
    step = [(i, 0, len(p)) for i, p in enumerate(c.prompts)]
    ctx, ids, pos, rows = step_inputs(c.prompts, step, [0, 1, 2], cache, c.lm.layer_kinds, "cpu")
    assert rows.tolist() == [4, 21, 30] and ids.dtype == pos.dtype == rows.dtype == torch.long
    with pytest.raises(ValueError, match="3 prompts needs at least as many logits rows, got 2"):
        step_inputs(c.prompts, step, [0, 1, 2], cache, c.lm.layer_kinds, "cpu", rows=2)


def _reference_loop(lm, prompts, params):
    """The loop generate replaced: one sequence at a time, host-side argmax, a host sync every step."""
    out = []
    for p in prompts:
        cache = lm.make_cache(1, len(p) + params.max_new_tokens)
        with torch.inference_mode():
            toks, ids, past = [], torch.tensor(p), 0
            while len(toks) < params.max_new_tokens and not (toks and toks[-1] in params.stop_tokens):
                ctx = ForwardContext(seq_lens=[len(ids)], context_lens=[past], slots=[0], cache=cache)
                with forward_context(ctx):
                    logits = lm(ids, torch.arange(past, past + len(ids)))
                past += len(ids)
                toks.append(int(logits[-1].argmax()))
                ids = torch.tensor(toks[-1:])
        out.append(toks)
    return out


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(1, 20), min_size=1, max_size=3), st.integers(0, 2**16))
def test_device_loop_equals_the_per_sequence_host_loop_with_stop_tokens(make_case, lens, seed):
    c = make_case("tiny")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, c.lm.config.vocab_size, (n,), generator=g).tolist() for n in lens]
    free_run = generate(c.lm, prompts, params=SamplingParams(max_new_tokens=12)).tokens
    stops = tuple({row[int(torch.randint(0, 12, (1,), generator=g))] for row in free_run})  # each stops somewhere
    params = SamplingParams(max_new_tokens=12, stop_tokens=stops)
    got = generate(c.lm, prompts, params=params)
    assert got.tokens == _reference_loop(c.lm, prompts, params)
    assert got.decode_tokens == sum(len(t) - 1 for t in got.tokens)


def test_the_decode_loop_reads_nothing_back_but_its_finished_flags(make_case, monkeypatch):
    """Per step the host reads no token (no .tolist/.item/bool of a device tensor): only, with stop tokens, the 0-d
    "all finished" flags it copied out asynchronously. On a GPU each such read would wait for the step."""
    gen_mod = importlib.import_module("hattn.models.generate")  # the package exports a function of that name
    c = make_case("tiny")
    reads = []
    real_decode = gen_mod._Loop._decode

    def watched_decode(self):
        with pytest.MonkeyPatch.context() as mp:
            for name in ("tolist", "item", "__bool__", "cpu", "numpy"):
                mp.setattr(torch.Tensor, name, _recording(getattr(torch.Tensor, name), name, reads))
            return real_decode(self)

    monkeypatch.setattr(gen_mod._Loop, "_decode", watched_decode)
    generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=6))
    assert reads == []
    generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=6, stop_tokens=(c.ref.tokens[0][2],)))
    assert reads and all(r == ("__bool__", (), torch.bool) for r in reads)


def _recording(real, name, reads):
    def call(self, *args, **kwargs):
        reads.append((name, tuple(self.shape), self.dtype))
        return real(self, *args, **kwargs)
    return call


def test_prefills_with_caches_of_other_slot_counts_keep_one_dynamic_size(make_case):
    """Two caches (4 and 6 slots) give prefills of 4 and 6 logits rows: each its own static graph, never a graph
    with a second dynamic size (which graph modes would have to run graph-free)."""
    from hattn.compiler.backend import backend
    from hattn.runtime.graphs import graph_layout

    c = make_case("tiny")
    layouts = []
    real = backend(mode="eager", inner_compiler="eager", progress=False)

    def spy(gm, example_inputs, **kwargs):
        layouts.append(graph_layout(gm))
        return real(gm, example_inputs, **kwargs)

    model = torch.compile(c.lm, backend=spy)
    for slots in (4, 6):
        got = generate(model, c.prompts, c.lm.make_cache(slots=slots, max_len=64), SamplingParams(max_new_tokens=2))
        assert got.tokens == [t[:2] for t in c.ref.tokens]
    assert len(layouts) == 3 and all(layout.reason is None for layout in layouts)  # prefill x2 (static rows), decode


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.one_of(st.none(), st.integers(1, 50)))
def test_prefill_steps_carry_every_prompt_token_once_in_order_within_the_limit(lens, limit):
    from hattn.models.generate import prefill_steps

    steps = prefill_steps(lens, limit)
    done = [0] * len(lens)
    for step in steps:
        assert step and (limit is None or sum(n for _, _, n in step) <= limit)
        assert [i for i, _, _ in step] == sorted({i for i, _, _ in step})  # each prompt once a step, in order
        for i, start, n in step:
            assert start == done[i] and n >= 1  # continues where the last step left the prompt
            done[i] += n
    assert done == lens
    sizes = [sum(n for _, _, n in s) for s in steps]
    if limit is not None:  # as few steps as the limit allows: full steps, but the first may give one token to the last
        assert len(steps) == -(-sum(lens) // limit) and all(t == limit for t in sizes[1:-1])
        if len(steps) > 1:
            assert sizes[0] >= limit - 1 and (limit < 3 or sizes[-1] >= 2)  # one token: another Dynamo graph


@pytest.mark.parametrize("mode", ["full", "pcg", "bcg"])
def test_prompts_longer_than_the_largest_capture_size_prefill_in_steps_with_the_same_tokens(make_case, monkeypatch,
                                                                                            mode):
    """A graph mode's prefill goes in steps of its largest capture size (each continuing from the cache), so that
    every step is one its graphs serve; tokens stay those of transformers' greedy generate."""
    from hattn.compiler.backend import backend

    gen_mod = importlib.import_module("hattn.models.generate")
    c = make_case("tiny")
    steps = []
    real = gen_mod.run_step

    def spy(model, ctx, *args):
        if not ctx.is_decode:
            steps.append((list(ctx.seq_lens), list(ctx.context_lens)))
        return real(model, ctx, *args)

    monkeypatch.setattr(gen_mod, "run_step", spy)
    torch._dynamo.reset()
    model = torch.compile(c.lm, backend=backend(mode=mode, inner_compiler="eager", capture_sizes=[4, 8],
                                                progress=False))
    got = generate(model, c.prompts, c.lm.make_cache(slots=3, max_len=64), SamplingParams(max_new_tokens=6))
    assert got.tokens == [t[:6] for t in c.ref.tokens]
    assert [len(p) for p in c.prompts] == [5, 17, 9]  # 31 tokens in steps of 8
    assert steps == [([5, 3], [0, 0]), ([8], [3]), ([6, 2], [11, 0]), ([7], [2])]


def test_step_token_limit_is_the_largest_capture_size_of_a_graph_mode():
    import hattn
    from hattn.compiler.backend import step_token_limit
    from hattn.compiler.config import DEFAULT_CAPTURE_SIZES

    m = torch.nn.Linear(2, 2)
    assert step_token_limit(torch.compile(m, backend=hattn.backend(mode="full", capture_sizes=[64, 4]))) == 64
    assert step_token_limit(torch.compile(m, backend="hattn", mode="bcg")) == max(DEFAULT_CAPTURE_SIZES)
    assert step_token_limit(torch.compile(m, backend="hattn", options={"mode": "pcg", "capture_sizes": [8]})) == 8
    assert step_token_limit(torch.compile(m, backend="hattn", options={"mode": "eager"})) is None  # no graphs
    assert step_token_limit(torch.compile(m, backend="eager")) is None
    assert step_token_limit(m) is None
    from hattn.parallel.overlap import TwoBatchOverlap

    tbo = TwoBatchOverlap.for_model(m, compile=lambda x: torch.compile(x, backend=hattn.backend(capture_sizes=[8])))
    assert step_token_limit(tbo) == 8 and step_token_limit(TwoBatchOverlap.for_model(m)) is None


def test_seed_zero_is_a_seed(make_case):
    """seed=0 samples from its own generator (not the global one): two calls give the same tokens."""
    c = make_case("tiny")
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=0)
    torch.manual_seed(1)
    first = generate(c.lm, c.prompts, params=params).tokens
    torch.manual_seed(2)
    assert generate(c.lm, c.prompts, params=params).tokens == first


def test_keep_takes_a_single_name_as_a_string(make_case):
    c = make_case("tiny")
    res = generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=3), keep="scores")
    assert len(res.scores) == 3 and res.logits is None


def test_a_cache_of_exactly_the_positions_generate_writes_is_enough(make_case):
    """The last new token is never fed back: len(prompt) + max_new_tokens - 1 positions suffice; one fewer is
    refused, naming how many it needs."""
    c = make_case("tiny")
    prompt, new = c.prompts[1], 6
    got = generate(c.lm, [prompt], c.lm.make_cache(1, len(prompt) + new - 1), SamplingParams(max_new_tokens=new))
    assert got.tokens == [c.ref.tokens[1][:new]]
    with pytest.raises(ValueError, match=f"it needs {len(prompt) + new - 1} cache positions"):
        generate(c.lm, [prompt], c.lm.make_cache(1, len(prompt) + new - 2), SamplingParams(max_new_tokens=new))


def test_steps_the_host_ran_past_every_stop_are_dropped_from_tokens_and_kept_scores(make_case, monkeypatch):
    """On a GPU the loop runs up to LOOKAHEAD steps past the last stop before it reads the finished flags (on a CPU
    it reads them at once). Here the read always says 'not yet', so every step runs: what the steps after the last
    stop made must not show in the tokens, the kept scores or the kept logits."""
    gen_mod = importlib.import_module("hattn.models.generate")
    c = make_case("tiny")
    stops = (c.ref.tokens[0][2], c.ref.tokens[1][4], c.ref.tokens[2][3])
    params = SamplingParams(max_new_tokens=12, stop_tokens=stops)
    want = generate(c.lm, c.prompts, params=params, keep=("scores", "logits"))
    monkeypatch.setattr(gen_mod._Loop, "_all_done", lambda self: False)
    got = generate(c.lm, c.prompts, params=params, keep=("scores", "logits"))
    assert got.tokens == want.tokens and got.decode_tokens == want.decode_tokens
    width = max(map(len, want.tokens))
    assert width < 12 and len(got.scores) == len(got.logits) == len(want.scores) == width
    assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores))


def test_decode_steps_counts_the_steps_that_ran_when_every_sequence_stops_early(make_case):
    c = make_case("tiny")
    stops = (c.ref.tokens[0][2], c.ref.tokens[1][4], c.ref.tokens[2][3])
    res = generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=12, stop_tokens=stops))
    width = max(map(len, res.tokens))
    assert width < 12 and res.decode_steps == width - 1  # on a CPU the flags are read at once: no step runs past


def test_bool_token_ids_are_refused(make_case):
    """A mask passed where ids belong ([[True, 2]]) is a TypeError, not token 1."""
    with pytest.raises(TypeError, match=r"prompt 0 holds non-int token ids \[True, 2\]"):
        generate(make_case("tiny").lm, [[True, 2]], params=SamplingParams(max_new_tokens=2))
