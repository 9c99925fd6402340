"""hattn.compile(model).generate on an unmodified transformers model: transformers' tokens and layout for a padded
batch, for every family and every mode (all pairs on the GPU); eos and padding sides; compiling again; what
hattn.compile refuses. GPU: python3 -m pytest -m gpu tests/models/test_frontdoor.py"""
import copy
import os
import warnings

import pytest
import torch
from transformers import GenerationConfig

import hattn
from hattn.compiler.backend import step_token_limit
from hattn.frontdoor import CompiledLM
from hattn.models.presets import TINY_FAMILIES, preset_config, random_model
from hattn.models.reference import check_tokens, hf_greedy
from hattn.registry import split_ops
from hattn.runtime.full import NotCaptureSafeError

NEW = 16
PAD = 0
_HF_BATCH: dict[str, torch.Tensor] = {}
# transformers 5.24's MiniMax continues a left-padded row differently from the same prompt alone (its cached
# lightning-attention decode; its no-cache forward of the padded row agrees with the prompt alone): for it the
# reference is transformers' generate of each prompt alone, laid out as transformers lays out a batch
HF_BATCH_DIVERGES = {"tiny-minimax"}


def padded(prompts, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [B, longest] of `prompts`, padded with PAD on `side`."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    return ids, mask


def hf_batch(c) -> torch.Tensor:
    """transformers' own generate of the left-padded batch (the unmodified copy), computed once per family."""
    if c.preset not in _HF_BATCH:
        ids, mask = padded(c.prompts)
        if c.preset in HF_BATCH_DIVERGES:
            _HF_BATCH[c.preset] = torch.cat([ids, torch.tensor([t[:NEW] for t in c.ref.tokens])], dim=1)
        else:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _HF_BATCH[c.preset] = c.hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                                    pad_token_id=PAD)
    return _HF_BATCH[c.preset]


def fresh(c) -> torch.nn.Module:
    """An unmodified copy of the family's transformers model."""
    return copy.deepcopy(c.hf)


def capture_safe(lm) -> bool:
    return set(lm.layer_kinds.values()) <= {op.kind for op in split_ops() if op.capture_safe}


# Every family once and every mode at least twice (the tests below add eager, pcg and bcg on tiny): on a CPU pcg,
# bcg and full run graph-free, so all 28 pairs (56 Dynamo traces of a few seconds) would test nothing more here;
# they run on the GPU (below), where every mode captures its graphs.
CPU_CASES = [("tiny", "full"), ("tiny-qwen3-next", "bcg"), ("tiny-olmo-hybrid", "pcg"), ("tiny-kimi-linear", "eager"),
             ("tiny-bailing-hybrid", "bcg"), ("tiny-minimax", "pcg"), ("tiny-nemotron-h", "bcg"),
             ("tiny-nemotron-h", "full"), ("tiny-granite-4.0-h", "pcg"), ("tiny-bamba", "full"),
             ("tiny-lfm2", "bcg")]


@pytest.mark.parametrize("preset, mode", CPU_CASES)
def test_generate_equals_transformers_generate_for_a_padded_batch(make_case, preset, mode):
    c = make_case(preset)
    model = hattn.compile(fresh(c), mode=mode, inner_compiler="eager", progress=False)
    ids, mask = padded(c.prompts)
    if mode == "full" and not capture_safe(c.lm):
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="not registered capture-safe") as err:
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
        assert isinstance(err.value.inner_exception, NotCaptureSafeError)
        return
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert out.dtype == ids.dtype and torch.equal(out, hf_batch(c))
    # one graph, no graph break: the prefill and the decode steps of the batch (logits rows of the cache's slots)
    assert model.backend.stats.graphs_compiled == 1
    assert model.backend.stats.split_ops == len(c.lm.layer_kinds)
    # the prefill and the first decode step went through Dynamo; every later decode step called its graph directly
    assert model._call.direct_calls == NEW - 2


def test_a_second_family_of_another_attention_scale_compiles_with_inductor_pieces(make_case):
    """Dynamo passes the attention scale (a float attribute whose value changed between two compiles of one frame:
    every adapted model runs HybridLM.forward) as a tensor input; a piece then returns it as the float the split op
    takes, which inductor cannot (it failed with an AssertionError deep in inductor). Found by a review."""
    torch._dynamo.reset()
    for preset in ("tiny", "tiny-bailing-hybrid"):  # scales 0.25 and 1/sqrt(24)
        c = make_case(preset)
        model = hattn.compile(fresh(c), mode="eager", progress=False)  # inductor pieces
        ids, mask = padded(c.prompts)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD), hf_batch(c))


def test_eos_padding_sides_and_inferred_mask_as_transformers(make_case):
    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="bcg", inner_compiler="eager")
    ids, mask = padded(c.prompts)
    # eos, no pad token: finished rows are padded with the first eos token; the batch ends once every row stopped
    eos = [c.ref.tokens[0][3], c.ref.tokens[2][5]]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos)
    with torch.inference_mode():
        want = c.hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, want)
    assert out[0, ids.shape[1] + 3].item() == eos[0] and (out[0, ids.shape[1] + 4:] == eos[0]).all()
    # right padding: transformers continues after the padding (and warns its tokens are wrong); hattn's new tokens
    # are those of the same batch left-padded, after the row as given
    right, right_mask = padded(c.prompts, "right")
    out = model.generate(right, attention_mask=right_mask, max_new_tokens=NEW)
    assert torch.equal(out[:, :right.shape[1]], right)
    assert torch.equal(out[:, right.shape[1]:], hf_batch(c)[:, ids.shape[1]:])
    # no mask: inferred from the generation config's pad token, as transformers does
    model.generation_config.pad_token_id = PAD
    assert torch.equal(model.generate(ids, max_new_tokens=NEW), hf_batch(c))
    # transformers' positional order: the prompt, then the generation config (a review found it read as the mask)
    config = GenerationConfig(max_new_tokens=NEW, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, config), hf_batch(c))
    assert torch.equal(model.generate(input_ids=ids, generation_config=config), hf_batch(c))
    with pytest.raises(TypeError, match="second positional argument is generation_config, as in transformers, got a "
                                        "tensor: pass the mask by keyword"):
        model.generate(ids, mask)


def test_compiled_model_has_transformers_attributes_serves_the_packed_api_and_keeps_its_cache(make_case):
    c = make_case("tiny")
    hf = fresh(c)
    model = hattn.compile(hf, mode="pcg", inner_compiler="eager", capture_sizes=[8, 16])
    assert isinstance(model, CompiledLM) and model.hf is hf and model.config is hf.config
    assert step_token_limit(model) == 16  # generate prefills the 31 prompt tokens in steps of 16
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.generation_config is hf.generation_config
    res = hattn.generate(model, c.prompts, params=hattn.SamplingParams(max_new_tokens=NEW))
    assert res.tokens == [t[:NEW] for t in c.ref.tokens]
    ids, mask = padded(c.prompts)
    model.generate(ids, attention_mask=mask, max_new_tokens=4)
    cache = model._cache
    assert (cache.slots, cache.max_len) == (3, 17 + 4)
    model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=4)
    assert model._cache is cache  # kept across calls (graph modes capture over its addresses)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    # 17 + 16 > 21 positions: grown to twice the length (few caches for growing calls)
    assert (model._cache.slots, model._cache.max_len) == (3, 42) and torch.equal(out, hf_batch(c))


def test_growing_batches_make_few_caches_and_graphs(make_case, caplog):
    """Each slot count is a Dynamo graph of its own (the logits rows): a cache grown to each batch's exact size made
    a graph per batch size, and batches of 1..11 rows hit Dynamo's recompile limit (found by a review)."""
    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager", progress=False)
    gen = torch.Generator().manual_seed(0)
    for rows in range(1, 12):
        model.generate(torch.randint(1, 512, (rows, 5 + rows), generator=gen), max_new_tokens=2)
    assert (model._cache.slots, model._cache.max_len) == (16, 32)  # 1, 2, 4, 8, 16 slots; 8, 16, 32 positions
    assert model.backend.stats.graphs_compiled <= 6 and "recompile_limit" not in caplog.text


def test_compiled_model_shows_the_module_surface_transformers_code_touches(make_case):
    """model.eval(), model.parameters(), model.generation_config = ..., model.to(its own device), generate(inputs=)
    and numpy ints, as on transformers' model and torch.compile's wrapper; what it cannot do is a clear error."""
    import numpy as np
    from transformers import GenerationConfig

    c = make_case("tiny")
    hf = fresh(c)
    model = hattn.compile(hf, mode="eager", inner_compiler="eager")
    assert model.train() is model and hf.training and model.eval() is model and not hf.training
    assert list(model.parameters()) == list(hf.parameters())  # hattn.compile(m).eval().generate(...) works
    assert model.get_input_embeddings() is hf.get_input_embeddings()
    assert model.to("cpu") is model and model.to(torch.float32) is model and model.float() is model
    assert model.to("cpu:0") is model and model.to(torch.device("cpu", 0), torch.float32) is model  # as hf.to
    with pytest.raises(ValueError, match=r"compiled on cpu in torch.float32, .* hattn.compile\(model.to"):
        model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(max_new_tokens=3, pad_token_id=PAD)
    assert hf.generation_config.max_new_tokens == 3
    ids, mask = padded(c.prompts)
    out = model.generate(inputs=ids[:1, -5:].int(), max_new_tokens=np.int64(4))
    assert out.dtype == torch.long and out.shape == (1, 9)  # int64 as transformers returns, for int32 ids too
    assert hattn.SamplingParams(stop_tokens=np.int64(3), top_k=torch.tensor(2)).stop_tokens == (3,)
    with pytest.raises(ValueError, match="generate needs the prompt ids"):
        model.generate(max_new_tokens=2)
    with pytest.raises(TypeError, match=r"the packed model: model\(input_ids \[T\], positions \[T\]\).*model.hf"):
        model(ids[:1])


def test_a_multimodal_model_is_refused_naming_the_text_model():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from hattn.models.presets import tiny

    config = Qwen3_5Config(text_config=tiny().to_dict(), vision_config=dict(depth=1, hidden_size=32, num_heads=2,
                                                                            out_hidden_size=64, intermediate_size=64))
    with pytest.raises(ValueError, match="multimodal model; load its language model with AutoModelForCausalLM"):
        hattn.compile(Qwen3_5ForConditionalGeneration(config).eval(), mode="eager", inner_compiler="eager")


def test_the_packed_call_passes_views_as_tensors_of_their_own(make_case):
    model = hattn.compile(fresh(make_case("tiny")), mode="eager", inner_compiler="eager")
    seen = []
    model._call = lambda *args: seen.append(args)
    ids, pos = torch.arange(10), torch.arange(10)
    model(ids[4:], pos[4:])  # views at storage offset 4: Dynamo would trace the offset as a second dynamic size
    got_ids, got_pos, rows = seen[0]
    assert got_ids.storage_offset() == got_pos.storage_offset() == 0 and rows is None
    assert torch.equal(got_ids, ids[4:]) and torch.equal(got_pos, pos[4:])
    model(ids, pos)
    assert seen[1][0] is ids and seen[1][1] is pos  # a tensor of its own already: passed as it is


def test_compiling_again_in_another_mode_reuses_the_adapted_model(make_case):
    c = make_case("tiny")
    hf = fresh(c)
    first = hattn.compile(hf, mode="eager", inner_compiler="eager")
    assert hattn.compile(first, mode="pcg").lm is first.lm and hattn.compile(first.lm).lm is first.lm
    again = hattn.compile(hf, mode="bcg", inner_compiler="eager")  # the adapted transformers model, adapted again
    assert again.lm is not first.lm and again.hf is hf and len(hf.model._forward_pre_hooks) == 1  # guarded once
    ids, mask = padded(c.prompts)
    out = again.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert again.backend.config.mode == "bcg" and torch.equal(out, hf_batch(c))


def test_sampling_is_seeded_and_top_p_of_one_token_is_greedy(make_case):
    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager")
    ids, mask = padded(c.prompts)
    sample = dict(attention_mask=mask, max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, seed=3)
    a = model.generate(ids, **sample)
    assert torch.equal(a, model.generate(ids, **sample))
    assert not torch.equal(a, model.generate(ids, **{**sample, "seed": 4}))
    nucleus_of_one = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus_of_one, hf_batch(c)[:, :ids.shape[1] + 8])


class NotTransformers(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("model, error, match", [
    (NotTransformers(), TypeError, r"takes a transformers causal LM .*got NotTransformers; for your own nn.Module "
                                   r"use torch.compile\(module, backend='hattn'\)"),
    ("Qwen/Qwen3.5-0.8B", TypeError, r"takes a transformers causal LM \(AutoModelForCausalLM.from_pretrained"),
])
def test_compile_refuses_what_is_not_a_transformers_causal_lm(model, error, match):
    with pytest.raises(error, match=match):
        hattn.compile(model)


def test_compile_refuses_a_base_model_without_lm_head(make_case):
    base = fresh(make_case("tiny")).model
    with pytest.raises(TypeError, match="needs a causal LM with its LM head, got Qwen3_5TextModel: load it with "
                                        "AutoModelForCausalLM"):
        hattn.compile(base)


def test_compile_checks_options_before_touching_the_model(make_case):
    hf = fresh(make_case("tiny"))
    with pytest.raises(ValueError, match="unknown hattn mode 'fast'; valid modes: eager, pcg, bcg, full"):
        hattn.compile(hf, mode="fast")
    with pytest.raises(ValueError, match=r"unknown hattn option\(s\) \['capture_size'\]"):
        hattn.compile(hf, capture_size=[1])
    assert hf.config._attn_implementation != "hattn" and "generate" not in vars(hf)  # not adapted


def test_compile_with_cache_dir_keeps_tritons_cache_there_before_adapting(make_case, tmp_path, monkeypatch):
    import hattn.frontdoor as frontdoor

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    seen, adapted = [], frontdoor._adapted
    monkeypatch.setattr(frontdoor, "_adapted", lambda m: (seen.append(os.environ.get("TRITON_CACHE_DIR")),
                                                          adapted(m))[1])
    hattn.compile(fresh(make_case("tiny")), mode="eager", cache_dir=str(tmp_path))
    assert seen == [str(tmp_path / "triton")]  # adapt's probe may compile kernels: they land there


# -- on the GPU: every family in every mode, CUDA graphs captured ----------------------------------------------------
GPU_FAMILIES = list(TINY_FAMILIES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["eager", "pcg", "bcg", "full"])
@pytest.mark.parametrize("preset", GPU_FAMILIES)
def test_generate_on_the_gpu_equals_transformers_in_every_mode(preset, mode):
    """bf16 on CUDA, as tests/models/test_gpu_models.py: each row's new tokens equal transformers' generate of its
    prompt alone (a divergence only at a near-tie of transformers' own logits), after the row as given; a second
    call replays the graphs and gives the same tokens; graph modes capture CUDA graphs."""
    torch._dynamo.reset()
    hf = random_model(preset_config(preset), torch.bfloat16, "cuda", seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, hf.config.get_text_config().vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
    ref = hf_greedy(hf, prompts, NEW)
    model = hattn.compile(hf, mode=mode, inner_compiler="eager", capture_sizes=[1, 2, 4, 8, 16, 32, 64],
                          progress=False)
    ids, mask = (t.cuda() for t in padded(prompts))
    if mode == "full" and not capture_safe(model.lm):
        with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="not registered capture-safe"):
            model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        return
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    again = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert out.device == ids.device and torch.equal(out[:, :ids.shape[1]], ids) and torch.equal(out, again)
    ok, note = check_tokens(ref, out[:, ids.shape[1]:].tolist(), tie=0.1)
    assert ok, note
    assert (model.stats.cuda_graphs > 0) == (mode != "eager")
    assert model.stats.graphs_compiled == 1  # the batch fills the cache: prefill and decode are one Dynamo graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["pcg", "bcg", "full"])
def test_prompts_past_the_largest_capture_size_prefill_in_graph_steps_on_the_gpu(mode):
    """31 prompt tokens with capture sizes up to 8: four prefill steps, each a graph's (in full, one graph replayed
    for every step: the logits of a prompt that ends in an early step must survive the later replays), then decode;
    tokens equal transformers' generate (near-ties of its own logits allowed), and again on a second call."""
    torch._dynamo.reset()
    hf = random_model(preset_config("tiny"), torch.bfloat16, "cuda", seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, hf.config.get_text_config().vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
    ref = hf_greedy(hf, prompts, NEW)
    model = hattn.compile(hf, mode=mode, inner_compiler="eager", capture_sizes=[1, 2, 4, 8], progress=False)
    assert step_token_limit(model) == 8
    got = hattn.generate(model, prompts, params=hattn.SamplingParams(max_new_tokens=NEW)).tokens
    assert got == hattn.generate(model, prompts, params=hattn.SamplingParams(max_new_tokens=NEW)).tokens
    ok, note = check_tokens(ref, got, tie=0.1)
    assert ok, note
    assert model.stats.cuda_graphs > 0


class RecordingStreamer:
    """transformers' streamer protocol, recording what it was given."""

    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


def test_a_streamer_gets_what_transformers_streams(make_case):
    c = make_case("tiny")
    ids, mask = padded(c.prompts)
    stop = c.ref.tokens[0][3]  # row 0 stops at its fourth token: its later steps stream the pad token
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=stop)
    want, got = RecordingStreamer(), RecordingStreamer()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = c.hf.generate(ids, streamer=want, **kwargs)
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager")
    assert torch.equal(model.generate(ids, streamer=got, **kwargs), out)
    assert (got.ends, want.ends) == (1, 1) and len(got.puts) == len(want.puts)
    assert all(torch.equal(a, b) for a, b in zip(got.puts, want.puts))
    first = c.ref.tokens[0].index(stop)  # puts: the input rows, then one [B] tensor per step
    assert want.puts[1 + first][0] == stop and want.puts[2 + first][0] == PAD  # a stopped row streams padding
    with pytest.raises(TypeError, match="streamer must have put"):
        model.generate(ids, streamer=object(), **kwargs)


def test_scores_and_logits_of_return_dict_in_generate_are_transformers(make_case):
    c = make_case("tiny")
    ids, mask = padded(c.prompts)
    stop = c.ref.tokens[0][3]
    kwargs = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, eos_token_id=stop, repetition_penalty=1.4,
                  return_dict_in_generate=True, output_scores=True, output_logits=True)
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = c.hf.generate(ids, do_sample=False, **kwargs)
        sampled = c.hf.generate(ids, do_sample=True, top_k=7, **{**kwargs, "max_new_tokens": 1})
    got = model.generate(ids, do_sample=False, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert len(got.scores) == len(want.scores) == len(got.logits) == want.sequences.shape[1] - ids.shape[1]
    new = want.sequences[:, ids.shape[1]:].tolist()
    for step in range(len(want.scores)):
        live = [i for i, row in enumerate(new) if stop not in row[:step]]  # rows still generating at this step
        torch.testing.assert_close(got.logits[step][live], want.logits[step][live], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.scores[step][live], want.scores[step][live], atol=1e-4, rtol=1e-4)
    assert not torch.equal(got.scores[1], got.logits[1])  # the penalty is in the scores, not in the logits
    first = model.generate(ids, do_sample=True, top_k=7, **{**kwargs, "max_new_tokens": 1}).scores[0]
    assert torch.equal(first.isinf(), sampled.scores[0].isinf()) and (first.isfinite().sum(-1) == 7).all()
    torch.testing.assert_close(first[first.isfinite()], sampled.scores[0][first.isfinite()], atol=1e-4, rtol=1e-4)
    assert isinstance(model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=PAD), torch.Tensor)


def test_a_cache_grown_past_the_memory_falls_back_to_the_exact_size(make_case, monkeypatch):
    from hattn.models import cache as cache_module

    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager", progress=False)
    assert (model._cache_for(3, 21).slots, model._cache.max_len) == (3, 21)  # the first call's size
    exact = model.make_cache(4, 21)._planned_bytes()

    def fits_only_the_exact_size(nbytes, cache):
        if nbytes > exact:
            raise ValueError("more than the device has")

    monkeypatch.setattr(cache_module, "_check_fits", fits_only_the_exact_size)
    assert (model._cache_for(4, 21).slots, model._cache.max_len) == (4, 21)  # not the doubled 6 slots


def test_train_and_eval_switch_the_mode_the_dispatcher_serves(make_case):
    """CompiledLM.train() switched the transformers model only; the dispatcher reads the adapted wrapper's mode and
    kept serving the eval-mode graphs (found by a review: MiniMax's router jitter, read in training mode, never
    ran)."""
    from hattn.compiler.dispatch import dispatch_for

    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="eager", inner_compiler="eager", progress=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.generate(ids, max_new_tokens=2)
    assert model.train() is model and model.lm.training and model.hf.training
    model.generate(ids, max_new_tokens=2)
    assert dispatch_for(model.model).training is True  # learned again in training mode
    assert model.eval() is model and not model.lm.training and not model.hf.training


def test_a_model_cast_behind_the_compiled_wrapper_is_a_clear_error(make_case):
    """hf.half() after compile: before, a dtype mismatch deep in a compiled piece, or FusedWeightsMoved suggesting
    fuse_linears=False (which led to that mismatch); and model.to(float16) said all was well."""
    c = make_case("tiny")
    hf = fresh(c)
    model = hattn.compile(hf, mode="eager", inner_compiler="eager", progress=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    model.generate(ids, max_new_tokens=2)
    hf.half()
    with pytest.raises(ValueError, match=r"the transformers model is now on cpu in torch.float16, but this model "
                                         r"was compiled on cpu in torch.float32"):
        model.generate(ids, max_new_tokens=2)
    for dtype in (torch.float16, torch.float32):  # neither is what the model is and was compiled for
        with pytest.raises(ValueError, match=r"compiled on cpu in torch.float32"):
            model.to(dtype)
    with pytest.raises(TypeError, match=r"cannot be copied.*hattn.compile\(copy.deepcopy\(model.hf\)\)"):
        copy.deepcopy(model)
    half_built = CompiledLM.__new__(CompiledLM)  # as pickle and copy make one: no recursion through hf
    assert not hasattr(half_built, "device") and not hasattr(half_built, "foo")


def test_generate_from_two_threads_takes_turns_on_the_one_cache(make_case):
    """Before, the second thread's call found no free slot of the shared cache ("build the cache with slots >= 1",
    a cache the user never built)."""
    import threading

    c = make_case("tiny")
    model = hattn.compile(fresh(c), mode="bcg", inner_compiler="eager", progress=False)
    ids = torch.tensor([[5, 17, 42, 7]])
    want = model.generate(ids, max_new_tokens=12)
    got, errors = [], []

    def run():
        try:
            got.append(model.generate(ids, max_new_tokens=12))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == 3 and all(torch.equal(g, want) for g in got)

    class CallsAgain:  # a streamer whose put generates again: the cache is in use
        def put(self, tokens):
            model.generate(ids, max_new_tokens=2)

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="generate was called again from inside a generate of the same model"):
        model.generate(ids, max_new_tokens=2, streamer=CallsAgain())
    assert torch.equal(model.generate(ids, max_new_tokens=12), want)  # and the model still serves


def _eager(c) -> CompiledLM:
    return hattn.compile(fresh(c), mode="eager", inner_compiler="eager", progress=False)


def test_generate_refuses_a_prompt_given_both_positionally_and_as_input_ids(make_case):
    """generate(a, input_ids=b): transformers refuses two prompts; taking either one silently would be a guess."""
    model = _eager(make_case("tiny"))
    a, b = torch.tensor([[5, 17, 42, 7]]), torch.tensor([[3, 9, 11, 2]])
    with pytest.raises(ValueError, match=r"pass the prompt once: input_ids or inputs"):
        model.generate(a, input_ids=b, max_new_tokens=2)


def test_the_default_length_is_capped_at_the_models_max_position_embeddings_as_transformers(make_case):
    """With no length set, transformers' default of 20 new tokens stops at the model's positions."""
    model = _eager(make_case("tiny"))
    model.config.max_position_embeddings = 8
    model.generation_config.max_length = None
    model.generation_config.max_new_tokens = None
    assert model.generate(torch.tensor([[5, 17, 42, 7, 9]])).shape == (1, 8)


def test_the_packed_call_refuses_a_batch_of_rows_with_positions(make_case):
    """Positions name the packed call (ids [T], positions [T]): [B, T] ids with them are a TypeError naming both
    forms, not rows fed to the packed graph."""
    model = _eager(make_case("tiny"))
    with pytest.raises(TypeError, match=r"the packed model: model\(input_ids \[T\], positions \[T\]\)"):
        model(torch.tensor([[5, 17, 42, 7]]), torch.arange(4)[None])


def test_requires_grad_reaches_the_transformers_parameters(make_case):
    model = _eager(make_case("tiny"))
    assert model.requires_grad_(False) is model and not any(p.requires_grad for p in model.hf.parameters())
    assert model.requires_grad_() is model and all(p.requires_grad for p in model.hf.parameters())


@pytest.mark.parametrize("dtype, same, others", [(torch.float16, "half", ("bfloat16", "float")),
                                                 (torch.bfloat16, "bfloat16", ("half", "float"))])
def test_the_dtype_shortcuts_return_the_model_in_its_own_dtype_and_refuse_others(make_case, dtype, same, others):
    model = hattn.compile(fresh(make_case("tiny")).to(dtype), mode="eager", inner_compiler="eager", progress=False)
    assert getattr(model, same)() is model
    for name in others:
        with pytest.raises(ValueError, match=f"compiled on cpu in {dtype}"):
            getattr(model, name)()


def test_a_passed_generation_config_overrides_the_models_own_settings(make_case):
    """As transformers: the GenerationConfig passed wins over the model's; the model's fills what it leaves."""
    model = _eager(make_case("tiny"))
    model.generation_config.max_new_tokens = 3
    ids = torch.tensor([[5, 17, 42, 7]])
    assert model.generate(ids, GenerationConfig(max_new_tokens=5, pad_token_id=PAD)).shape == (1, 4 + 5)
    assert model.generate(ids, generation_config=GenerationConfig(pad_token_id=PAD)).shape == (1, 4 + 3)


def test_compile_takes_a_torch_compiled_transformers_model(make_case):
    """hattn.compile(torch.compile(model)) compiles the model inside torch.compile's wrapper."""
    c = make_case("tiny")
    hf = fresh(c)
    model = hattn.compile(torch.compile(hf), mode="eager", inner_compiler="eager", progress=False)
    assert model.hf is hf
    ids = torch.tensor([c.prompts[0]])
    assert model.generate(ids, max_new_tokens=4)[0, ids.shape[1]:].tolist() == c.ref.tokens[0][:4]
