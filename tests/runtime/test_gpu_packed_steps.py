"""pcg and bcg serve the packed steps (prefill, extend, mixed) of hattn's linear attention and the decode steps of
its split ops from each call site's own CUDA graphs (`hattn.ops.packed_runner`): the logits and every cache state
are the bits of the op's path between graphs (of the site's launches, for decode), a bucket's graph is captured once
and replayed for other packings, and the graphs are counted. Run on the
device: python3 -m pytest -m gpu tests/runtime/test_gpu_packed_steps.py."""
from __future__ import annotations

import pytest
import torch

import hattn
from hattn.context import ForwardContext, forward_context
from hattn.models.hf import adapt
from hattn.models.presets import preset_config, random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
# (seq_lens, context_lens, slots) of each step, on one cache of 4 slots: short prompts (the recurrent form), a long
# one (fla's chunked form), an extend, a mixed step (decode rows among prompt rows), another packing of an earlier
# bucket (a replay), decode steps, a long prompt with a continuing sequence
STEPS = [
    ([5], [0], [0]),
    ([150], [0], [1]),
    ([20, 9], [5, 150], [0, 1]),
    ([1, 70, 1], [25, 0, 159], [0, 2, 1]),
    ([9, 20], [160, 0], [1, 3]),
    ([1, 1, 1, 1], [26, 169, 70, 20], [0, 1, 2, 3]),
    ([130, 2], [27, 21], [0, 3]),
]
REPLAY = 4  # STEPS[4] packs like STEPS[2]: same token bucket, sequence bucket and kernels


def _run(lm, mode, prepared, monkeypatch, steps=STEPS, launch_at=()):
    """The steps over one new cache; the steps of index in `launch_at` with the decode sites' graphs off (their
    launches, as `site_graphs=False`)."""
    from hattn.ops import packed_runner
    from hattn.runtime import graphs

    monkeypatch.setattr(graphs, "prepared", prepared)
    be = hattn.backend(mode=mode, capture_sizes=SIZES, inner_compiler="eager", progress=False, lazy_capture=False)
    model = torch.compile(lm, backend=be, dynamic=True)
    cache = lm.make_cache(slots=4, max_len=512)
    gen = torch.Generator().manual_seed(0)
    logits, graphs_after = [], []
    inputs = [(torch.randint(0, lm.config.vocab_size, (sum(seq_lens),), generator=gen).cuda(),
               torch.cat([torch.arange(c, c + n) for n, c in zip(seq_lens, context_lens)]).cuda())
              for seq_lens, context_lens, _ in steps]  # made first: the steps run without the host waiting
    site_graphs = packed_runner.site_graphs
    for i, ((seq_lens, context_lens, slots), (ids, pos)) in enumerate(zip(steps, inputs)):
        ctx = ForwardContext(seq_lens, context_lens, slots, cache=cache, layer_kinds=lm.layer_kinds)
        monkeypatch.setattr(packed_runner, "site_graphs", site_graphs and i not in launch_at)
        with forward_context(ctx):
            logits.append(model(ids, pos).float())
        graphs_after.append(be.stats.cuda_graphs)
    monkeypatch.setattr(packed_runner, "site_graphs", site_graphs)
    logits = [x.cpu() for x in logits]
    states = {i: [s[:cache.slots].cpu() for s in cache.state(i)] for i in lm.layer_kinds}
    return logits, states, graphs_after, be.stats


def _assert_same_bits(a, b, steps) -> None:
    """Two `_run`s gave the same logits every step and the same cache states, bit for bit."""
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        assert torch.equal(x, y), f"step {i} {steps[i]}: logits differ"
    for layer in a[1]:
        for x, y in zip(a[1][layer], b[1][layer]):
            assert torch.equal(x, y), f"layer {layer}: cache states differ"


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_packed_steps_from_call_site_graphs_give_the_bits_of_the_op(mode, monkeypatch):
    lm = adapt(random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0))
    linear = sum(1 for kind in lm.layer_kinds.values() if kind == "linear")
    assert linear > 0
    off = _run(lm, mode, False, monkeypatch)
    on = _run(lm, mode, True, monkeypatch)
    _assert_same_bits(off, on, STEPS)
    graphs_off, graphs_on, stats = off[2], on[2], on[3]
    captured = [b - a for a, b in zip([0, *graphs_on], graphs_on)]
    runtime_captured = [b - a for a, b in zip([0, *graphs_off], graphs_off)]
    packed = [i for i, (lens, _, _) in enumerate(STEPS) if any(n != 1 for n in lens)]
    for i in packed:  # a new (bucket, kernels): a graph per linear layer, besides what the runtime captured
        want = 0 if i == REPLAY else linear
        assert captured[i] - runtime_captured[i] == want, f"step {i}: {captured[i]} graphs"
    assert stats.prepared_calls >= linear * len(STEPS)  # every linear layer of every step, decode included
    assert any(key.startswith("packed steps") for key in stats.pool_bytes_by_pool)


# a prefill of four prompts, then decode steps of 2, 3 and 2 sequences: each site's graph of 2 sequences is captured
# at its first step and replayed with other slots and context lengths
DECODE = [
    ([7, 3, 12, 5], [0, 0, 0, 0], [0, 1, 2, 3]),
    ([1, 1], [7, 3], [0, 1]),
    ([1, 1], [8, 4], [0, 1]),
    ([1, 1, 1], [9, 12, 5], [0, 2, 3]),
    ([1, 1], [13, 6], [2, 3]),
    ([1, 1], [10, 5], [0, 1]),
]


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_decode_steps_from_site_graphs_give_the_bits_of_their_launches(mode, monkeypatch):
    """A site's decode graph (`DecodeRunner`) replays its launches over the step's slots and context lengths: the
    logits and cache states are those of the launches every step (`site_graphs` off), one graph per site and
    number of sequences."""
    from hattn.ops import packed_runner

    lm = adapt(random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0))
    sites = len(lm.layer_kinds)  # linear and full attention both have decode runners
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(packed_runner, "site_graphs", on)
        runs[on] = _run(lm, mode, True, monkeypatch, steps=DECODE)
        torch._dynamo.reset()
    _assert_same_bits(runs[False], runs[True], DECODE)
    extra = runs[True][2][-1] - runs[False][2][-1]
    assert extra == sites * 2, f"{extra} decode graphs for {sites} sites and 2 batch sizes"


def test_a_cache_serves_one_model_after_another(caplog, monkeypatch):
    """Models compiled one after another over one cache (the bench's targets): each captures its call sites' graphs
    (no capture fails, whenever the previous model's graphs die), and gives the op's logits."""
    from hattn.runtime import graphs

    lm = adapt(random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0))
    cache = lm.make_cache(slots=4, max_len=512)
    ids = torch.randint(0, lm.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1)).cuda()
    pos = torch.arange(150, device="cuda")
    ctx = ForwardContext([150], [0], [0], cache=cache, layer_kinds=lm.layer_kinds)
    for mode in ("pcg", "bcg", "pcg"):
        logits = {}
        for prepared in (False, True):
            monkeypatch.setattr(graphs, "prepared", prepared)
            be = hattn.backend(mode=mode, capture_sizes=[256], inner_compiler="eager", progress=False)
            model = torch.compile(lm, backend=be, dynamic=True)
            with forward_context(ctx):
                model(ids, pos)  # captures the runtime's graphs; then a replay: the call sites' graphs
                logits[prepared] = model(ids, pos).float().cpu()
            model = None
            torch._dynamo.reset()
        assert torch.equal(logits[True], logits[False]), mode
        assert be.stats.prepared_calls > 0
    assert "capturing them failed" not in caplog.text


# decode steps of 2 and 3 sequences, interleaved: per batch size the first step captures the sites' graphs, the
# second collects its replay, the later ones are stitched steps (2 + 1 here)
STITCH = [
    ([7, 3, 12, 5], [0, 0, 0, 0], [0, 1, 2, 3]),
    ([1, 1], [7, 3], [0, 1]),
    ([1, 1], [8, 4], [0, 1]),
    ([1, 1, 1], [9, 12, 5], [0, 2, 3]),
    ([1, 1], [13, 6], [2, 3]),
    ([1, 1, 1], [10, 5, 14], [0, 1, 2]),
    ([1, 1], [9, 5], [0, 1]),
    ([1, 1, 1], [15, 7, 11], [2, 3, 0]),
]


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_stitched_decode_steps_give_the_bits_of_their_replays(mode, monkeypatch, caplog):
    """A decode step stitched into one launch (`hattn.runtime.stitch`) computes what the replay of its graphs one by
    one computes: logits and cache states bit for bit; one CUDA launch, not the replay-each fallback."""
    from hattn.runtime import stitch

    launches = []
    one_launch = stitch._one_launch
    monkeypatch.setattr(stitch, "_one_launch", lambda graphs: launches.append(one_launch(graphs)) or launches[-1])
    lm = adapt(random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(stitch, "enabled", on)
        runs[on] = _run(lm, mode, True, monkeypatch, steps=STITCH)
        torch._dynamo.reset()
    _assert_same_bits(runs[False], runs[True], STITCH)
    assert runs[False][3].stitched_steps == 0 and runs[True][3].stitched_steps == 3
    assert stitch.one_launch and len(launches) == 2 and all(launches), caplog.text  # per batch size: one launch


@pytest.mark.parametrize("mode", ["pcg", "bcg"])
def test_a_step_that_a_stitched_guard_rejects_replays_as_before(mode, monkeypatch):
    """A decode step that the sites' guards reject (here: their graphs switched off for that step, so they launch) is
    not served by the stitched step of its batch size: that step is dropped, the step runs site by site, and every
    step gives the bits of the unstitched run; the next step of that size is collected again."""
    from hattn.runtime import stitch

    lm = adapt(random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0))
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(stitch, "enabled", on)
        runs[on] = _run(lm, mode, True, monkeypatch, steps=STITCH, launch_at={6})  # STITCH[6]: 2 sequences
        torch._dynamo.reset()
    _assert_same_bits(runs[False], runs[True], STITCH)
    # 2 sequences: step 4 stitched, step 6 rejected (its sites launched: nothing to collect); 3 sequences: step 7
    assert runs[True][3].stitched_steps == 2
