"""Routing is by layer id and registered kind only (shared/seeds/001, 003): a linear layer dressed as a
full-attention class still runs as linear, and any disagreement between config and model is an error."""
import copy

import pytest
import torch

from hattn import registry
from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import AdaptedModelError, adapt
from hattn.models.presets import tiny_bailing_hybrid, random_model
from hattn.models.reference import hf_greedy
from hattn.registry import RegistryError

BailingHybridAttention = pytest.importorskip(
    "transformers.models.bailing_hybrid.modeling_bailing_hybrid", reason="this transformers has no bailing_hybrid"
).BailingHybridAttention


def _record_routes(monkeypatch) -> list[tuple[str, int]]:
    calls, check = [], registry.check_route

    def recording(kind, layer_id, layer_kinds):
        calls.append((kind, layer_id))
        return check(kind, layer_id, layer_kinds)

    monkeypatch.setattr(registry, "check_route", recording)
    return calls


def test_linear_layers_wrapped_in_a_full_attention_class_route_by_layer_id(monkeypatch):
    """Ring/Ling (bailing) linear layers that look like full attention by class and by flag (sglang seed 001)."""
    hf = random_model(tiny_bailing_hybrid(), seed=0)
    reference = copy.deepcopy(hf)
    linear_ids = [i for i, t in enumerate(hf.config.layer_types) if t == "linear_attention"]
    for i in linear_ids:
        mixer = hf.model.layers[i].self_attn
        mixer.__class__ = type("LinearLookingLikeFull", (type(mixer), BailingHybridAttention), {})
        mixer._is_linear_attention = False  # the class flag sglang's hotfix read: lying here
        assert isinstance(mixer, BailingHybridAttention)
    lm = adapt(hf)
    calls = _record_routes(monkeypatch)
    prompts = [[5, 9, 2], [7, 7, 1, 3, 8, 4, 2]]
    got = generate(lm, prompts, params=SamplingParams(max_new_tokens=8)).tokens
    assert got == hf_greedy(reference, prompts, 8).tokens
    routed: dict[int, set[str]] = {}
    for kind, layer_id in calls:
        routed.setdefault(layer_id, set()).add(kind)
    assert routed == {i: {"kda" if i in linear_ids else "full"} for i in range(len(hf.model.layers))}


def test_layer_types_disagreeing_with_the_model_are_rejected_at_adapt():
    hf = random_model(tiny_bailing_hybrid(), seed=0)
    types = list(hf.config.layer_types)
    types[0] = "full_attention"  # layer 0 is a KDA module: it would run transformers' own code, off our cache
    hf.config.layer_types = types
    with pytest.raises(ValueError, match=r"layer 0: config 'full', called no split op"):
        adapt(hf)


def test_swapped_layer_types_are_rejected_at_adapt():
    from hattn.models.presets import tiny

    hf = random_model(tiny(), seed=0)
    types = list(hf.config.layer_types)
    types[0], types[3] = types[3], types[0]
    hf.config.layer_types = types
    with pytest.raises(ValueError, match="config says layer 0 is a 'full' layer but the layer has no 'full' mixer"):
        adapt(hf)


def test_a_layer_table_disagreeing_with_the_ops_called_is_rejected_at_run_time(make_case):
    c = make_case("tiny")
    kinds = dict(c.lm.layer_kinds)
    kinds[0] = "full"  # layer 0 calls hattn::linear_attention
    with pytest.raises(RegistryError, match="layer 0 is a 'full' layer in the model config but called a 'linear'"):
        generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=2), layer_kinds=kinds)
    del kinds[3]
    kinds[0] = "linear"
    with pytest.raises(RegistryError, match="has no layer 3"):
        generate(c.lm, c.prompts, params=SamplingParams(max_new_tokens=2), layer_kinds=kinds)


def test_hf_batch_dimension_is_rejected(make_case):
    c = make_case("tiny")
    with torch.no_grad(), pytest.raises(AdaptedModelError, match=r"one packed sequence \[1, T\], got a batch of 2"):
        c.lm.hf(input_ids=torch.zeros(2, 4, dtype=torch.long), use_cache=False)


def test_unknown_family_names_the_supported_ones():
    from transformers import LlamaConfig

    hf = random_model(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no adapter for model_type 'llama'.*qwen3_5"):
        adapt(hf)


def _spy_probe_runs(monkeypatch) -> list[bool]:
    """Whether each probe run of adapt is fake (True) or real (False)."""
    from hattn.models import hf as hf_module

    runs, real = [], hf_module._probe_calls
    monkeypatch.setattr(hf_module, "_probe_calls", lambda lm, fake: runs.append(fake) or real(lm, fake))
    return runs


def test_the_probe_runs_on_fake_tensors_and_still_finds_a_layer_that_calls_no_split_op(monkeypatch):
    from hattn.models.hf import probe
    from hattn.models.presets import tiny

    runs = _spy_probe_runs(monkeypatch)
    lm = adapt(random_model(tiny(), seed=0))
    assert runs == [True]  # a dense model: the fake run is enough, no kernel ran
    lm.hf.model.layers[0].linear_attn.forward = lambda hidden_states, **kwargs: hidden_states  # the model's own code
    with pytest.raises(ValueError, match=r"layer 0: config 'linear', called no split op"):
        probe(lm)
    assert runs == [True, True]


def test_the_probe_runs_for_real_where_a_fake_run_cannot(monkeypatch):
    runs = _spy_probe_runs(monkeypatch)
    adapt(random_model(tiny_bailing_hybrid(), seed=0))  # fp32 MoE: grouped_mm has no fp32 fake kernel
    assert runs == [True, False]
