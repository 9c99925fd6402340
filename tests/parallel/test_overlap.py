"""Two-batch overlap on one process: micro-batches split at sequence boundaries, each under its own forward
context, for every split-op kind (a kind registered here included), per-token tensors sliced on their token dim."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import hattn
from hattn.context import ForwardContext, LayerSpec, StaticMeta, forward_context, get_forward_context, op_context
from hattn.context import sequence_states, zero_padding
from hattn.models.cache import HybridCache
from hattn.models.presets import load
from hattn.models.toy import ToyConfig, ToyHybridModel, toy_cache, toy_model
from hattn.ops import full, linear
from hattn.parallel.overlap import TwoBatchOverlap, split_context, split_point
from hattn.runtime import graph_layout

SEEN: list[tuple[int, list[int], list[int]]] = []  # (layer, seq_lens, slots) of every running_sum call


def _running_sum(x: torch.Tensor, out: torch.Tensor, layer_id: int) -> None:
    """A new split-op kind: each sequence's running sum of x [T, D], carried across steps in its cache slot."""
    ctx = op_context("running_sum", layer_id, x.shape[0])
    SEEN.append((layer_id, list(ctx.seq_lens), list(ctx.slots)))
    for rows, (state,) in sequence_states(ctx, layer_id, lambda: (x.new_zeros(x.shape[1]),)):
        sums = state + x[rows].cumsum(0)
        out[rows] = sums
        state.copy_(sums[-1])
    zero_padding(out, ctx.num_tokens)


running_sum = torch.library.custom_op("hattn_test::running_sum", mutates_args=("out",))(_running_sum)
running_sum.register_fake(lambda x, out, layer_id: None)
hattn.register_split_op(running_sum, "running_sum", direct=_running_sum)


class RunningSumMixer(nn.Module):
    def __init__(self, hidden: int, layer_id: int):
        super().__init__()
        self.layer_id, self.proj = layer_id, nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):  # [T, hidden]
        out = torch.empty_like(x)
        torch.ops.hattn_test.running_sum(self.proj(x), out, self.layer_id)
        return out * 0.1


PATTERN = ["running_sum", "linear", "full", "running_sum"]
LENS = [5, 7, 3, 6]  # 21 tokens: the best boundary is after two sequences (12 | 9)


def _toy():
    torch.manual_seed(0)
    c = ToyConfig(pattern=PATTERN)
    return ToyHybridModel(c, {"running_sum": lambda c, i: RunningSumMixer(c.hidden, i)}).eval(), c


def _cache(c: ToyConfig, slots: int = 4, max_len: int = 16) -> HybridCache:
    conv_dim = 2 * c.k_heads * c.k_dim + c.v_heads * c.v_dim
    spec = {"full": full.cache_spec(c.kv_heads, c.head_dim),
            "linear": linear.cache_spec(conv_dim, c.conv_kernel, c.v_heads, c.k_dim, c.v_dim),
            "running_sum": LayerSpec("running_sum", states=(((c.hidden,), torch.float32),))}
    return HybridCache({i: spec[k] for i, k in enumerate(c.pattern)}, slots, max_len, dtype=torch.float32)


def _two_steps(model, c: ToyConfig) -> list[torch.Tensor]:
    """A packed prefill of LENS, then one decode step, over a fresh cache."""
    cache, kinds = _cache(c), c.layer_kinds()
    ids = torch.arange(sum(LENS)) % c.vocab
    steps = [(ForwardContext(LENS, [0] * 4, [0, 1, 2, 3], cache, kinds), ids),
             (ForwardContext([1] * 4, LENS, [0, 1, 2, 3], cache, kinds), torch.tensor([3, 1, 4, 1]))]
    outs = []
    for ctx, x in steps:
        with forward_context(ctx), torch.no_grad():
            outs.append(model(x))
    return outs


@pytest.mark.parametrize("mode", [None, "pcg"])
def test_a_newly_registered_kind_is_served_per_micro_batch(mode):
    model, c = _toy()
    run = model if mode is None else torch.compile(model, backend=hattn.backend(mode=mode, inner_compiler="eager",
                                                                                  progress=False))
    want = _two_steps(model, c)
    SEEN.clear()
    got = _two_steps(TwoBatchOverlap(run, token_dims=(0,)), c)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    a, b = ([5, 7], [0, 1]), ([3, 6], [2, 3])  # prefill: 12 | 9 tokens; decode: 2 | 2 sequences
    assert SEEN == [(0, *a), (3, *a), (0, *b), (3, *b), (0, [1, 1], [0, 1]), (3, [1, 1], [0, 1]),
                    (0, [1, 1], [2, 3]), (3, [1, 1], [2, 3])]


class MropeModel(nn.Module):
    """ids [T] and mrope positions [3, T] -> [T, hidden], through a running-sum layer (tokens mix per sequence)."""

    def __init__(self, hidden: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.pos = nn.Embedding(64, hidden), nn.Linear(3, hidden)
        self.mixer = RunningSumMixer(hidden, 0)
        self.seen: list[tuple[list[int], list[list[int]]]] = []

    def forward(self, ids, positions):
        self.seen.append((ids.tolist(), positions.tolist()))
        return self.mixer(self.embed(ids) + self.pos(positions.T.float()))


def _mrope_step():
    t = torch.cat([torch.arange(n) for n in LENS])
    positions = torch.stack([t, t // 2, t % 3])  # temporal, height, width rows differ
    return torch.arange(sum(LENS)) % 64, positions, ForwardContext(LENS, layer_kinds={0: "running_sum"})


def test_instances_compiled_with_one_backend_object_are_an_error():
    """One hattn.backend object compiles a Dynamo graph once for both instances: one runtime, whose graphs and
    static inputs the two micro-batches would use at once on CUDA. A backend per instance is fine."""
    model, _ = _toy()
    shared = hattn.backend(mode="pcg", progress=False)
    with pytest.raises(ValueError, match="a backend per instance"):
        TwoBatchOverlap.for_model(model, compile=lambda m: torch.compile(m, backend=shared))
    own = TwoBatchOverlap.for_model(model, compile=lambda m: torch.compile(m, backend=hattn.backend(progress=False)))
    assert own.models[0] is not own.models[1]


def test_mrope_positions_are_sliced_on_their_token_dim():
    model = MropeModel()
    ids, positions, ctx = _mrope_step()
    with forward_context(ctx), torch.no_grad():
        want = model(ids, positions)
        model.seen.clear()
        got = TwoBatchOverlap(model)(ids, positions)  # default token dims: ids 0, positions -1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.seen == [(ids[:12].tolist(), positions[:, :12].tolist()),
                          (ids[12:].tolist(), positions[:, 12:].tolist())]


def test_mrope_positions_sliced_on_dim_0_are_an_error():
    ids, positions, ctx = _mrope_step()
    with forward_context(ctx), pytest.raises(ValueError, match=r"argument 1 has shape \(3, 21\): its token dim 0 "
                                                                 r"should hold the step's 21 tokens"):
        TwoBatchOverlap(MropeModel(), token_dims=(0, 0))(ids, positions)


class Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args):
        ctx = get_forward_context()
        self.calls.append((ctx.seq_lens, ctx.context_lens, ctx.slots, [a.tolist() for a in args]))
        return self.fn(*args)


def test_positions_1d_sliced_on_dim_0_and_each_half_to_its_own_model():
    lm = load("tiny")
    ids = torch.arange(sum(LENS)) % lm.config.vocab_size
    pos = torch.cat([torch.arange(n) for n in LENS])
    first, second = Recorder(lm), Recorder(lm)
    with forward_context(ForwardContext(LENS, slots=[4, 5, 6, 7])), torch.no_grad():
        want = lm(ids, pos)
        got = TwoBatchOverlap(first, second)(ids, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert first.calls == [([5, 7], [0, 0], [4, 5], [ids[:12].tolist(), pos[:12].tolist()])]
    assert second.calls == [([3, 6], [0, 0], [6, 7], [ids[12:].tolist(), pos[12:].tolist()])]


def test_one_sequence_runs_whole_on_the_first_model():
    first, second = Recorder(lambda x: x * 2), Recorder(lambda x: x * 3)
    with forward_context(ForwardContext([4])):
        out = TwoBatchOverlap(first, second, token_dims=(0,))(torch.ones(4))
    assert out.tolist() == [2.0] * 4 and len(first.calls) == 1 and second.calls == []


@given(st.lists(st.integers(0, 50), min_size=2, max_size=12))
def test_split_point_is_the_most_balanced_sequence_boundary(lens):
    k = split_point(lens)
    gap = [abs(sum(lens[:j]) - sum(lens[j:])) for j in range(1, len(lens))]
    assert 1 <= k < len(lens) and gap[k - 1] == min(gap) and gap.index(min(gap)) == k - 1


@given(st.lists(st.integers(0, 9), min_size=1, max_size=10))
def test_micro_batches_partition_the_step(lens):
    cache = _cache(ToyConfig(), slots=10, max_len=27)
    ctx = ForwardContext(lens, [2 * n for n in lens], list(range(len(lens))), cache, {0: "full"}, extra={"t": 0.5})
    parts = split_context(ctx)
    if len(parts) == 1:  # every boundary leaves one side without tokens
        k = split_point(lens)
        assert parts[0].ctx is ctx and parts[0].rows == slice(0, sum(lens)) and 0 in (sum(lens[:k]), sum(lens[k:]))
        return
    a, b = (p.ctx for p in parts)
    assert (a.seq_lens + b.seq_lens, a.context_lens + b.context_lens, a.slots + b.slots) == \
        (ctx.seq_lens, ctx.context_lens, ctx.slots)
    assert [p.rows for p in parts] == [slice(0, a.num_tokens), slice(a.num_tokens, ctx.num_tokens)]
    assert a.num_tokens > 0 and b.num_tokens > 0
    assert all(c.cache is cache and c.layer_kinds == {0: "full"} and c.extra == {"t": 0.5} for c in (a, b))


def test_a_tensor_in_extra_is_an_error():
    with pytest.raises(ValueError, match=r"cannot tell which dimension of ctx.extra\['bias'\] holds tokens"):
        split_context(ForwardContext([2, 2], extra={"bias": torch.zeros(4)}))


def test_a_captured_context_is_an_error():
    static = StaticMeta(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="this context is a captured graph's"):
        split_context(ForwardContext([1, 1], static=static))


def test_no_forward_context_is_an_error():
    with pytest.raises(ValueError, match="call it inside hattn.forward_context"):
        TwoBatchOverlap(lambda x: x, token_dims=(0,))(torch.ones(3))


def test_logits_rows_are_taken_from_the_micro_batch_that_holds_each():
    lm = load("tiny")
    ids = torch.arange(sum(LENS)) % lm.config.vocab_size
    pos = torch.cat([torch.arange(n) for n in LENS])
    rows = torch.tensor([4, 11, 14, 20, 20, 0])  # each sequence's last token (A: 4, 11; B: 14, 20), padded, a first
    with forward_context(ForwardContext(LENS)), torch.no_grad():
        want = lm(ids, pos)[rows]
        got = TwoBatchOverlap(lm)(ids, pos, rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_one_token_micro_batches_run_padded_to_two_rows():
    lm = load("tiny")
    ids, pos = torch.tensor([7, 9]), torch.tensor([3, 5])
    first, second = Recorder(lm), Recorder(lm)
    with forward_context(ForwardContext([1, 1], [3, 5])), torch.no_grad():
        want = lm(ids, pos)
        got = TwoBatchOverlap(first, second)(ids, pos)
    with forward_context(ForwardContext([1, 1], [3, 5], padding=1)), torch.no_grad():
        padded = TwoBatchOverlap(first, second)(torch.tensor([7, 9, 0]), torch.tensor([3, 5, 0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, want, atol=1e-5, rtol=1e-5)  # the caller's row dropped, the micro-batches'
    assert first.calls[0] == ([1], [3], [0], [[7, 0], [3, 0]]) and second.calls[0] == ([1], [5], [1], [[9, 0], [5, 0]])


def test_a_decode_step_of_one_token_micro_batches_replays_the_prefills_graph():
    lm = load("tiny")
    graphs = []
    compiled = torch.compile(lm, backend=lambda gm, _: graphs.append(gm) or gm.forward)
    cache = lm.make_cache(slots=2, max_len=16)
    kinds, tbo = lm.layer_kinds, TwoBatchOverlap(compiled)
    steps = [(ForwardContext([3, 4], [0, 0], [0, 1], cache, kinds), torch.tensor([1, 2, 3, 4, 5, 6, 7]),
              torch.tensor([0, 1, 2, 0, 1, 2, 3])),
             (ForwardContext([1, 1], [3, 4], [0, 1], cache, kinds), torch.tensor([8, 9]), torch.tensor([3, 4]))]
    for ctx, ids, pos in steps:
        with forward_context(ctx), torch.inference_mode():
            out = tbo(ids, pos)
        assert out.shape[0] == ctx.num_tokens
    assert len(graphs) == 1  # the one-token micro-batches ran the prefill's dynamic graph at two rows


def test_each_instance_compiles_one_graph_of_the_token_count_alone():
    """Two instances, a backend each (as on CUDA): B's compile traced its rows as they were, a view at storage
    offset 12 (the prefill's A holds 12 tokens), and Dynamo made that offset a symbol of its own (A's offset 0 it
    specializes): a graph of two dynamic sizes, which graphs cannot pad (runtime/graphs.py, `served_layout`: it ran
    graph-free on the GPU). Each instance's graph has the token count as its one dynamic size, for the prefill and
    every decode step."""
    model = toy_model(pattern=["linear", "full", "linear", "full"])
    layouts = []

    def compile(m):
        backend = hattn.backend(mode="pcg", capture_sizes=[2, 4, 8, 16], inner_compiler="eager", progress=False)

        def recording(gm, example_inputs):  # on CPU the backend runs graph-free before it asks for the layout
            layouts.append(graph_layout(gm))
            return backend(gm, example_inputs)
        return torch.compile(m, backend=recording, dynamic=True)

    tbo = TwoBatchOverlap.for_model(model, compile=compile, token_dims=(0,))
    c = model.config
    cache, kinds, slots = toy_cache(c, slots=4, max_len=16), c.layer_kinds(), [0, 1, 2, 3]
    steps = [(ForwardContext(LENS, [0] * 4, slots, cache, kinds), torch.arange(sum(LENS)) % c.vocab)]
    steps += [(ForwardContext([1] * 4, [n + i for n in LENS], slots, cache, kinds), torch.tensor([3, 1, 4, 1]))
              for i in range(2)]
    for ctx, ids in steps:
        with forward_context(ctx), torch.no_grad():
            assert tbo(ids).shape[0] == ctx.num_tokens
    assert [layout.reason for layout in layouts] == [None, None]  # one graph per instance, none graph-free


def test_the_overlap_wrapper_shows_its_models_layer_table_and_cache():
    """generate checks each layer's route against the model's `layer_kinds` and makes its cache from the model it
    is given: through the wrapper, the model's (a wrapper without them ran with no route check)."""
    lm = load("tiny")
    tbo = TwoBatchOverlap.for_model(lm)
    assert tbo.layer_kinds == lm.layer_kinds and tbo.config is lm.config
    assert tbo.cache_specs() == lm.cache_specs() and tbo.make_cache(2, 8).slots == 2
    with pytest.raises(AttributeError):
        tbo.no_such_attribute  # noqa: B018
