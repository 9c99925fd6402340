"""hattn.generate's input checks: each bad input is a TypeError / ValueError naming the argument and the fix, raised
before anything runs (it used to be `max() arg is an empty sequence`, an IndexError, "Boolean value of Tensor" or
`AttributeError: make_cache`)."""
import copy

import pytest
import torch

from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import adapt
from hattn.models.presets import preset_config, random_model

TWO = SamplingParams(max_new_tokens=2)


@pytest.mark.parametrize("prompts, error, match", [
    ([], ValueError, r"prompts is empty: pass at least one prompt, e.g. \[\[1, 2, 3\]\]"),
    ([[1, 2], []], ValueError, "prompt 1 is empty: every prompt needs at least one token"),
    ([[1, 512]], ValueError, r"prompt 0 has token id 512, outside the vocabulary \[0, 512\): check the tokenizer"),
    ([[3], [-1, 2]], ValueError, r"prompt 1 has token id -1, outside the vocabulary \[0, 512\)"),
    (torch.tensor([[1, 2, 3]]), TypeError, r"prompts must be a list of token-id lists, got a Tensor: pass "
                                           r"input_ids.tolist\(\) .* hattn.compile\(model\).generate"),
    ([torch.tensor([1, 2])], TypeError, r"prompt 0 is a Tensor, not a list of token ids: pass .tolist\(\)"),
    ([1, 2, 3], TypeError, r"prompt 0 is a int, not a list of token ids: pass \[\[1, 2, 3\]\], not \[1, 2, 3\]"),
    ([[1.0, 2.0]], TypeError, r"prompt 0 holds non-int token ids \[1.0, 2.0\]: token ids are Python ints"),
    ("1,2,3", TypeError, r"prompts must be a list of token-id lists, got str: pass \[\[1, 2, 3\]\]"),
])
def test_bad_prompts_are_named(make_case, prompts, error, match):
    c = make_case("tiny")
    with pytest.raises(error, match=match):
        generate(c.lm, prompts, params=TWO)


def test_bad_params_are_named(make_case):
    c = make_case("tiny")
    params = SamplingParams(max_new_tokens=2)
    params.max_new_tokens = 0  # changed after construction: generate checks again
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0: ask for at least one"):
        generate(c.lm, c.prompts, params=params)
    for name, value, match in (("temperature", -1.0, "temperature must be"), ("top_p", 5.0, "top_p must be"),
                               ("repetition_penalty", 0.0, "repetition_penalty must be"),
                               ("top_k", -3, "top_k must be"), ("stop_tokens", "2", "stop_tokens must be")):
        params = SamplingParams(max_new_tokens=2)
        setattr(params, name, value)
        with pytest.raises(ValueError, match=match):
            generate(c.lm, c.prompts, params=params)
    with pytest.raises(TypeError, match=r"params must be a hattn.SamplingParams, got dict: params=hattn.Sampling"):
        generate(c.lm, c.prompts, params={"max_new_tokens": 2})


def test_a_model_hattn_has_not_adapted_is_named_with_the_fix(make_case):
    c = make_case("tiny")
    with pytest.raises(TypeError, match=r"generate got a transformers model \(Qwen3_5ForCausalLM\); it needs the model "
                                        r"hattn.adapt returns .*hattn.generate\(hattn.adapt\(model\), prompts\)"):
        generate(c.hf, c.prompts, params=TWO)
    with pytest.raises(TypeError, match=r"got a transformers model \(Qwen3_5ForCausalLM\)"):
        generate(torch.compile(c.lm.hf), c.prompts, params=TWO)  # the adapted one, torch.compile'd, too
    with pytest.raises(TypeError, match="model must be a callable .* got str"):
        generate("Qwen/Qwen3.5-0.8B", c.prompts, c.lm.make_cache(3, 40), TWO)
    with pytest.raises(TypeError, match="function has no make_cache, so generate cannot build a cache: pass cache="):
        generate(lambda ids, pos: ids, c.prompts, params=TWO)


def test_a_cache_too_small_or_of_another_model_is_named(make_case):
    c = make_case("tiny")
    with pytest.raises(ValueError, match=r"prompt 1 has 17 tokens and max_new_tokens=2: it needs 18 cache positions "
                                         r"but the cache holds max_len=10; build the cache with max_len >= 18"):
        generate(c.lm, c.prompts, c.lm.make_cache(3, 10), TWO)
    other = adapt(random_model(preset_config("tiny-nemotron-h")))
    with pytest.raises(ValueError, match=r"the cache was built for another model .*model.make_cache\(slots, max_len\)"):
        generate(c.lm, c.prompts, other.make_cache(3, 40), TWO)
    with pytest.raises(TypeError, match=r"cache must be a HybridCache \(model.make_cache\(slots, max_len\)\) or None, "
                                        r"got SamplingParams; pass sampling settings by keyword: params="):
        generate(c.lm, c.prompts, TWO)  # params passed where the cache goes


def test_good_inputs_pass_the_checks_unchanged(make_case):
    c = make_case("tiny")
    prompts = copy.deepcopy(c.prompts)
    assert generate(c.lm, tuple(prompts), params=TWO).tokens == [t[:2] for t in c.ref.tokens]
    assert prompts == c.prompts


def test_a_cache_too_large_for_the_machine_names_max_new_tokens(make_case):
    c = make_case("tiny")
    with pytest.raises(ValueError, match=r"max_len=1099511627779 .* GiB, more than .*longest prompt \+ max_new_tokens"):
        generate(c.lm, [[1, 2, 3]], params=SamplingParams(max_new_tokens=2**40))
