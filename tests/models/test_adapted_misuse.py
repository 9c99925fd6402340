"""After hattn.adapt(model), every way of calling the transformers model gives transformers' tokens or raises an
error naming what to call instead (its own generate once went on with wrong tokens after the first)."""
import copy

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerationMixin

from hattn.models.hf import AdaptedModelError, adapt

INSTEAD = r"hattn.compile\(model\).generate\(input_ids, attention_mask=..., max_new_tokens=...\)"


@pytest.fixture
def adapted(make_case):
    c = make_case("tiny")
    return c, c.lm.hf


def test_its_own_generate_refuses(adapted):
    c, hf = adapted
    ids = torch.tensor([c.prompts[0]])
    with pytest.raises(AdaptedModelError, match=f"transformers' own generate .* would give wrong tokens.*{INSTEAD}"):
        hf.generate(ids, max_new_tokens=4)
    with pytest.raises(AdaptedModelError, match=f"use_cache=True / a transformers cache.*{INSTEAD}"):
        GenerationMixin.generate(hf, ids, max_new_tokens=4, do_sample=False)  # around the instance attribute


@pytest.mark.parametrize("kwargs, match", [
    ({"use_cache": True}, "use_cache=True / a transformers cache: this model was adapted by hattn"),
    ({"past_key_values": "cache"}, "use_cache=True / a transformers cache"),
    ({"cache": "cache"}, "use_cache=True / a transformers cache"),
    ({"attention_mask": torch.tensor([[0, 1, 1, 1, 1]])}, r"attention_mask has padding \(zeros\): hattn's attention "
                                                          r"ignores the mask"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, r"one packed sequence \[1, T\], got a batch of 2"),
    ({"inputs_embeds": torch.zeros(3, 5, 64)}, r"one packed sequence \[1, T\], got a batch of 3"),
    ({"output_attentions": True}, r"output_attentions=True: .* never form the attention weights"),
])
def test_forwards_it_cannot_serve_refuse(adapted, kwargs, match):
    c, hf = adapted
    kwargs = {"input_ids": torch.tensor([c.prompts[0]]), **kwargs}
    if kwargs.get("inputs_embeds") is not None:
        del kwargs["input_ids"]
    for key in ("past_key_values", "cache"):
        if key in kwargs:
            kwargs[key] = DynamicCache(config=hf.config)
    with torch.no_grad(), pytest.raises(AdaptedModelError, match=match):
        hf(**kwargs)
    with torch.no_grad(), pytest.raises(AdaptedModelError, match=match):
        hf.model(**kwargs)  # the base model too


def test_positional_arguments_are_checked_too(adapted):
    c, hf = adapted
    with torch.no_grad(), pytest.raises(AdaptedModelError, match="attention_mask has padding"):
        hf(torch.tensor([c.prompts[0][:3]]), torch.tensor([[0, 1, 1]]))


def test_one_sequence_forward_gives_transformers_logits(adapted):
    """Without a forward context and with use_cache unset (transformers' default would be True), a [1, T] forward
    is one sequence with no cache: transformers' logits, and no transformers cache comes back."""
    c, hf = adapted
    ids = torch.tensor([c.prompts[1]])
    with torch.no_grad():
        got = hf(ids, attention_mask=torch.ones_like(ids))
        want = c.hf(ids).logits
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
    assert got.past_key_values is None


def test_a_copy_of_an_adapted_model_refuses_too(adapted):
    _, hf = adapted
    clone = copy.deepcopy(hf)
    with pytest.raises(AdaptedModelError, match="transformers' own generate"):
        clone.generate(torch.tensor([[1, 2]]))
    with torch.no_grad(), pytest.raises(AdaptedModelError, match="use_cache=True"):
        clone(torch.tensor([[1, 2]]), use_cache=True)


def test_adapting_again_guards_once(adapted):
    c, hf = adapted
    lm = adapt(hf)
    assert lm.hf is hf and len(hf.model._forward_pre_hooks) == 1
    assert lm.layer_kinds == c.lm.layer_kinds


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_an_attention_implementation_set_after_adapt_is_refused(implementation):
    """Set after adapt, transformers' own attention would run without hattn's cache (wrong tokens, no error): the
    adapted model refuses, called directly or compiled."""
    import hattn
    from hattn.models.presets import load

    lm = load("tiny")  # its own: the shared cases must keep hattn's implementation
    lm.hf.config._attn_implementation = implementation
    ids, positions = torch.tensor([1, 2, 3]), torch.arange(3)
    with pytest.raises(AdaptedModelError, match=f"attention implementation is '{implementation}', not hattn's"):
        lm(ids, positions)
    with pytest.raises(Exception, match=f"attention implementation is '{implementation}'"):
        hattn.generate(hattn.compile(lm, mode="eager", inner_compiler="eager"), [[1, 2, 3]],
                       params=hattn.SamplingParams(max_new_tokens=2))


def test_a_model_sharing_its_config_with_an_adapted_one_is_refused():
    """Two models from one config object share it: adapting one set the other's attention implementation to
    hattn's too, and its own generate then ran hattn's attention without hattn's cache (other tokens, silently)."""
    from transformers import AutoModelForCausalLM

    from hattn.models.presets import tiny

    config = tiny()
    torch.manual_seed(0)
    first, twin = (AutoModelForCausalLM.from_config(config).eval() for _ in range(2))
    adapt(first)
    with torch.no_grad(), pytest.raises(AdaptedModelError, match="belongs to a model hattn did not adapt: it shares "
                                                                 "its config object"):
        twin(torch.tensor([[1, 2, 3]]))


def test_positions_of_another_shape_are_refused(adapted):
    c, _ = adapted
    ids = torch.tensor(c.prompts[0])
    with torch.no_grad(), pytest.raises(ValueError, match=r"positions has shape \(3,\) but input_ids \(\d+,\)"):
        c.lm(ids, torch.arange(3))
