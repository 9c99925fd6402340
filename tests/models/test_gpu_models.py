"""Adapted HF models on the GPU in bf16: every graph mode gives HF eager's greedy tokens (a divergence is allowed
only where HF itself is at a near-tie), CUDA graphs are really used, and mode="full" refuses mixers whose split op
is not capture-safe. Run on the device: python3 -m pytest -m gpu tests/models."""
import copy
import importlib

import pytest
import torch

from hattn.compiler.backend import backend
from hattn.compiler.dispatch import dispatch_for
from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import adapt
from hattn.models.presets import TINY_FAMILIES, preset_config, random_model
from hattn.models.reference import check_tokens, hf_greedy
from hattn.registry import split_ops

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FAMILIES = list(TINY_FAMILIES)
SIZES = [1, 2, 4, 8, 16, 32, 64]
TIE = 0.1  # bf16 logits: HF's top-2 margin below this may legitimately flip
NEW = 32
_CASES = {}


def _case(preset: str, new_tokens: int = NEW):
    if preset not in _CASES:
        hf = random_model(preset_config(preset), torch.bfloat16, "cuda", seed=0)
        reference = copy.deepcopy(hf)
        lm = adapt(hf)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, lm.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
        _CASES[preset] = (lm, prompts, hf_greedy(reference, prompts, new_tokens))
        del reference
    return _CASES[preset]


def _capture_safe(lm) -> bool:
    safe = {op.kind for op in split_ops() if op.capture_safe}
    return set(lm.layer_kinds.values()) <= safe


def _run(lm, prompts, mode, inner, new_tokens=NEW, **options):
    be = backend(mode=mode, capture_sizes=SIZES, inner_compiler=inner, progress=False, **options)
    model = torch.compile(lm, backend=be)
    cache = lm.make_cache(slots=len(prompts), max_len=64)  # 3 decode rows pad to a graph of 4
    params = SamplingParams(max_new_tokens=new_tokens)
    first = generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds).tokens
    second = generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds).tokens
    return first, second, be.stats


@pytest.mark.parametrize("preset", FAMILIES)
def test_eager_mode_bf16_matches_hf(preset):
    lm, prompts, ref = _case(preset)
    first, second, _ = _run(lm, prompts, "eager", "eager")
    ok, note = check_tokens(ref, first, TIE)
    assert ok, note
    assert first == second


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
@pytest.mark.parametrize("preset", FAMILIES)
def test_graph_modes_bf16_match_hf(preset, mode):
    lm, prompts, ref = _case(preset)
    if mode == "full" and not _capture_safe(lm):
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="not registered capture-safe"):
            _run(lm, prompts, mode, "eager")
        return
    first, second, stats = _run(lm, prompts, mode, "eager")
    ok, note = check_tokens(ref, first, TIE)
    assert ok, note
    assert first == second  # replays of captured graphs give what the capturing run gave
    assert stats.cuda_graphs > 0 and stats.replays > 0


@pytest.mark.parametrize("mode", ["eager", "pcg", "bcg", "full"])
def test_inductor_pieces_bf16_match_hf(mode):
    lm, prompts, ref = _case("tiny")
    first, second, stats = _run(lm, prompts, mode, "inductor")
    ok, note = check_tokens(ref, first, TIE)
    assert ok, note
    assert first == second


@pytest.mark.parametrize("mode", ["eager", "full"])
def test_gated_mlp_option_bf16_matches_hf(mode):
    """gated_mlp: the MLP's down projection reads the fused gate/up output itself at M <= 4 (decode rows)."""
    lm, prompts, ref = _case("tiny")
    first, second, stats = _run(lm, prompts, mode, "inductor", gated_mlp=True)
    ok, note = check_tokens(ref, first, TIE)
    assert ok, note
    assert first == second and stats.small_m_linears > 0


@pytest.mark.parametrize("mode", ["bcg", "pcg"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3-next"])
def test_prepared_split_ops_give_the_tokens_of_their_general_path(preset, mode, monkeypatch):
    """bcg and pcg replay the linear- and full-attention calls of decode steps through their prepared runners (the
    same kernels, planned once): the tokens are those of the ops' general path, and the runners really served every
    layer of every decode step."""
    from hattn.runtime import graphs

    lm, prompts, ref = _case(preset)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(graphs, "prepared", on)
        first, second, stats = _run(lm, prompts, mode, "eager")
        runs[on] = (first, second, stats.prepared_calls)
    assert runs[True][:2] == runs[False][:2]
    assert runs[False][2] == 0 and runs[True][2] >= (NEW - 1) * len(lm.layer_kinds)  # every layer, every step
    ok, note = check_tokens(ref, runs[True][0], TIE)
    assert ok, note


def test_qwen3_5_1b_preset_generates_in_pcg():
    hf = random_model(preset_config("qwen3.5-1b"), torch.bfloat16, "cuda", seed=0)
    prompts = [[11, 22, 33, 44, 55, 66, 77], [5] * 40, [1, 2, 3]]
    ref = hf_greedy(hf, prompts, 8)
    lm = adapt(hf)
    first, second, stats = _run(lm, prompts, "pcg", "eager", new_tokens=8)
    ok, note = check_tokens(ref, first, TIE)
    assert ok, note
    assert stats.cuda_graphs > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_full_mode_decode_loop_replays_its_graph_without_calling_the_model(batch):
    """After the first decode step, generate writes the next inputs into the full-mode graph's static buffers on the
    device and replays it: the compiled model (Dynamo guards, runtime Python) is called for the prefill and the first
    decode step only, and the tokens are HF's."""
    lm, prompts, ref = _case("tiny")
    be = backend(mode="full", capture_sizes=SIZES, inner_compiler="eager", progress=False)
    model = torch.compile(lm, backend=be)
    calls = []

    def counted(*args):  # generate's calls, through the model's dispatcher as generate makes them
        calls.append(len(args[0]))
        return dispatch_for(model)(*args)

    counted.layer_kinds = lm.layer_kinds
    res = generate(counted, prompts[:batch], lm.make_cache(slots=batch, max_len=64), SamplingParams(max_new_tokens=NEW))
    ok, note = check_tokens(type(ref)(ref.tokens[:batch], ref.margins[:batch]), res.tokens, TIE)
    assert ok, note
    # the prefill, then the first decode step only
    assert calls == [sum(len(p) for p in prompts[:batch]), batch]
    # replayed: the prefill's packed-bucket graph, the first decode step's graph, then NEW - 2 direct replays
    assert be.stats.replays == NEW
    assert be.stats.graphs_compiled == 1  # the cache's slots filled: prefill and decode are one Dynamo graph
    assert be.stats.small_m_linears > 0 and be.stats.fused_linears > 0  # decode's GEMMs: fused, skinny-or-cuBLAS


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
@pytest.mark.parametrize("preset, inner, pad", [("tiny", "eager", False), ("tiny", "inductor", False),
                                                ("tiny-qwen3-next", "eager", False), ("tiny", "inductor", True)])
def test_one_prompt_replays_the_dynamic_graph_at_one_row_as_hf(preset, inner, pad, mode, monkeypatch):
    """Batch 1: the prefill and every decode step (one token, given to the graph traced for every size by the
    dispatcher, or padded to two rows with `pad_one_token`) are one Dynamo graph, served by graphs at capture size 1
    (pcg / bcg: stitched after the first steps), and the tokens are HF's."""
    monkeypatch.setattr(importlib.import_module("hattn.models.generate"), "pad_one_token", pad)
    lm, prompts, ref = _case(preset)
    be = backend(mode=mode, capture_sizes=SIZES, inner_compiler=inner, progress=False)
    model = torch.compile(lm, backend=be)
    res = generate(model, prompts[:1], lm.make_cache(slots=1, max_len=64), SamplingParams(max_new_tokens=NEW))
    ok, note = check_tokens(type(ref)(ref.tokens[:1], ref.margins[:1]), res.tokens, TIE)
    assert ok, note
    stats = be.stats
    assert stats.graphs_compiled == 1 and stats.cuda_graphs > 0 and stats.eager_runs == 0
    if mode != "full":
        assert stats.stitched_steps > 0
