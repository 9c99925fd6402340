"""Adapted models under torch.compile with the hattn backend: same tokens as HF eager, one graph for every
token count (prefill and decode), split ops where the layer table says."""
import importlib

import pytest
import torch

from hattn.compiler.backend import backend
from hattn.models.generate import SamplingParams, generate
from hattn.models.presets import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES)


def _run(case, mode, inner_compiler):
    be = backend(mode=mode, inner_compiler=inner_compiler, progress=False)
    model = torch.compile(case.lm, backend=be)
    cache = case.lm.make_cache(slots=3, max_len=64)
    res = generate(model, case.prompts, cache, SamplingParams(max_new_tokens=32), layer_kinds=case.lm.layer_kinds)
    return res, be.stats


@pytest.mark.parametrize("preset", FAMILIES)
def test_eager_mode_equals_hf(make_case, preset):
    c = make_case(preset)
    res, stats = _run(c, "eager", "eager")
    assert res.tokens == c.ref.tokens
    # one graph, no graph breaks, no recompiles for new token counts: the prefill and the decode steps (3 sequences)
    # name their logits rows in one tensor of the cache's slot count
    assert stats.graphs_compiled == 1
    mixers = len(c.lm.layer_kinds)
    assert stats.split_ops == mixers and stats.pieces == mixers + 1


@pytest.mark.parametrize("preset", FAMILIES)
def test_one_prompt_decodes_in_steps_padded_to_two_rows_as_hf(make_case, preset, monkeypatch):
    """With `pad_one_token` a one-sequence decode step runs as two rows, the second of no sequence
    (`ForwardContext.padding`): every family's split ops leave the real row as it was (the adapted model,
    uncompiled)."""
    monkeypatch.setattr(importlib.import_module("hattn.models.generate"), "pad_one_token", True)
    c = make_case(preset)
    for i, prompt in enumerate(c.prompts[:2]):
        got = generate(c.lm, [prompt], params=SamplingParams(max_new_tokens=8)).tokens
        assert got == [c.ref.tokens[i][:8]]


@pytest.mark.parametrize("preset", FAMILIES)
def test_one_prompt_decodes_one_token_steps_on_the_dynamic_graph_as_hf(make_case, preset):
    """Batch 1 compiled: the one-token decode steps are served by the graph Dynamo traced for the prompt's token
    count (symbolic), not a graph of their own, and every family gives HF's tokens."""
    c = make_case(preset)
    be = backend(mode="eager", inner_compiler="eager", progress=False)
    model = torch.compile(c.lm, backend=be)
    got = generate(model, c.prompts[:1], c.lm.make_cache(slots=1, max_len=64), SamplingParams(max_new_tokens=8))
    assert got.tokens == [c.ref.tokens[0][:8]]
    assert be.stats.graphs_compiled == 1


def test_eager_mode_with_inductor_pieces_equals_hf(make_case):
    c = make_case("tiny")
    res, stats = _run(c, "eager", "inductor")
    assert res.tokens == c.ref.tokens
    assert stats.graphs_compiled == 1


@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_graph_modes_run_graph_free_on_cpu(make_case, mode):
    c = make_case("tiny")
    be = backend(mode=mode, progress=False, inner_compiler="eager")
    res = generate(torch.compile(c.lm, backend=be), c.prompts, c.lm.make_cache(slots=3, max_len=64),
                   SamplingParams(max_new_tokens=8), layer_kinds=c.lm.layer_kinds)
    assert res.tokens == [t[:8] for t in c.ref.tokens]
    assert be.stats.cuda_graphs == 0
