"""transformers' generate arguments -> packed prompts and SamplingParams, and the output layout (no model needed)."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from hattn.models.hf_generate import infer_mask, merged_config, repad, request, unpad

GC = GenerationConfig()


def _batch(prompts, side, pad=0):
    width = max(map(len, prompts))
    ids, mask = torch.full((len(prompts), width), pad), torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, cols], mask[i, cols] = torch.tensor(p), 1
    return ids, mask


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=9), min_size=1, max_size=5),
       st.sampled_from(["left", "right"]))
def test_unpad_gives_back_the_prompts_of_either_padding_side(prompts, side):
    ids, mask = _batch(prompts, side)
    assert unpad(ids, mask) == prompts


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 99), min_size=0, max_size=6), min_size=1, max_size=4), st.integers(0, 9))
def test_repad_is_the_input_then_new_tokens_then_pad(new_tokens, width):
    if not any(new_tokens):
        new_tokens[0].append(7)
    ids = torch.arange(len(new_tokens) * width).reshape(len(new_tokens), width)
    out = repad(ids, new_tokens, pad_token_id=0)
    longest = max(map(len, new_tokens))
    assert out.shape == (len(new_tokens), width + longest) and torch.equal(out[:, :width], ids)
    for row, tokens in zip(out[:, width:].tolist(), new_tokens):
        assert row == tokens + [0] * (longest - len(tokens))


def test_arguments_resolve_as_transformers():
    ids, mask = _batch([[5, 6, 7], [8]], "left")
    req = request(ids, mask, GC)
    assert req.prompts == [[5, 6, 7], [8]] and req.pad_token_id is None
    assert (req.params.max_new_tokens, req.params.temperature, req.params.stop_tokens) == (20, 0.0, ())
    model_config = GenerationConfig(max_new_tokens=7, eos_token_id=[3, 4], do_sample=True, temperature=0.5)
    req = request(ids, mask, model_config)
    assert req.params.max_new_tokens == 7 and req.params.stop_tokens == (3, 4) and req.pad_token_id == 3
    assert (req.params.temperature, req.params.top_p) == (0.5, 1.0)
    req = request(ids, mask, model_config, do_sample=False, eos_token_id=None, max_length=10, pad_token_id=9)
    assert (req.params.temperature, req.params.stop_tokens, req.pad_token_id) == (0.0, (), 9)
    assert req.params.max_new_tokens == 7  # the config's max_new_tokens wins over a max_length keyword, as in HF
    req = request(ids, mask, GC, max_length=10, eos_token_id=torch.tensor(2), top_p=0.5, seed=1)
    assert (req.params.max_new_tokens, req.params.stop_tokens, req.params.seed) == (7, (2,), 1)


def test_a_passed_generation_config_is_filled_from_the_models():
    ids, mask = _batch([[5, 6, 7]], "left")
    model = GenerationConfig(do_sample=True, top_k=20, repetition_penalty=1.05, eos_token_id=2, max_new_tokens=9)
    p = request(ids, mask, merged_config(GenerationConfig(temperature=0.7, top_k=5), model)).params
    assert (p.temperature, p.top_k, p.repetition_penalty, p.stop_tokens, p.max_new_tokens) == (0.7, 5, 1.05, (2,), 9)
    assert merged_config(None, model) is model and merged_config(GC, None) is GC


def test_mask_is_inferred_from_the_pad_token_unless_it_is_an_eos_token():
    ids = torch.tensor([[0, 0, 5], [4, 5, 6]])
    assert infer_mask(ids, 0, ()).tolist() == [[0, 0, 1], [1, 1, 1]]
    assert infer_mask(ids, 0, (0,)).tolist() == [[1, 1, 1]] * 2
    assert infer_mask(ids, None, ()).tolist() == [[1, 1, 1]] * 2
    assert request(ids, None, GC, pad_token_id=0).prompts == [[5], [4, 5, 6]]


def test_a_pad_token_inside_a_prompt_without_a_mask_names_the_pad_token_and_the_fix():
    with pytest.raises(ValueError, match=r"no attention_mask was given, and pad_token_id=0 occurs inside a prompt.*"
                                         r"pass attention_mask="):
        request(torch.tensor([[5, 0, 7, 8]]), None, GC, pad_token_id=0)


def test_the_default_length_stops_at_the_models_positions_as_in_transformers():
    ids, mask = _batch([list(range(1, 18))], "left")  # 17 tokens
    assert request(ids, mask, GC).params.max_new_tokens == 20
    assert request(ids, mask, GC, max_positions=24).params.max_new_tokens == 7
    assert request(ids, mask, GC, max_positions=24, max_new_tokens=30).params.max_new_tokens == 30  # asked for
    with pytest.raises(ValueError, match="fills the model's max_position_embeddings=17: pass max_new_tokens"):
        request(ids, mask, GC, max_positions=17)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_beams": 4}, ValueError, r"num_beams=4 \(from the arguments or the model's generation_config\) is not "
                                   r"supported by hattn's generate \(it would change the tokens\): pass num_beams=1"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences=2 with greedy decoding .* pass do_sample=True"),
    ({"num_return_sequences": 0, "do_sample": True}, ValueError, "num_return_sequences must be an int >= 1, got 0"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty must be a finite number > 0"),
    ({"output_attentions": True, "return_dict_in_generate": True}, ValueError,
     r"output_attentions=True .* \(its output would lack them\): pass output_attentions=False"),
    ({"assistant_model": object()}, ValueError, "assistant_model=<object .* is not supported .* pass "
                                                "assistant_model=None"),
    ({"logits_processor": [lambda ids, scores: scores]}, ValueError, "logits_processor=.* is not supported"),
    ({"my_argument": 1}, TypeError,
     r"unsupported argument\(s\) \['my_argument'\]; hattn's generate takes input_ids, attention_mask, "
     r"generation_config and max_new_tokens"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an int >= 1, got 0: ask for at least one new"),
    ({"max_new_tokens": 2.5}, ValueError, "max_new_tokens must be an int >= 1, got 2.5"),
    ({"max_length": 3}, ValueError, r"max_length=3 leaves no room for new tokens after the 3-token input: pass "
                                    r"max_new_tokens"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "do_sample=True needs temperature > 0, got 0.0"),
    ({"do_sample": True, "top_k": -1}, ValueError, r"top_k must be an int >= 0 \(0: off\), got -1"),
    ({"eos_token_id": [2, -1]}, ValueError, r"eos_token_id must be a token id or a list of them, got \[2, -1\]"),
])
def test_unsupported_or_bad_arguments_are_named(kwargs, error, match):
    ids, mask = _batch([[5, 6, 7], [8]], "left")
    with pytest.raises(error, match=match):
        request(ids, mask, GC, **kwargs)


def test_output_flags_without_return_dict_change_nothing_and_are_accepted():
    """transformers returns hidden states and attentions only in its output object; a model config with
    output_hidden_states=True (it reaches the generation config) made every generate fail, naming the tokens."""
    ids, mask = _batch([[5, 6, 7]], "left")
    request(ids, mask, GenerationConfig(output_hidden_states=True, output_attentions=True))
    with pytest.raises(ValueError, match=r"output_hidden_states=True .*its output would lack them"):
        request(ids, mask, GenerationConfig(output_hidden_states=True), return_dict_in_generate=True)


def test_neutral_values_of_unsupported_settings_and_greedy_top_k_are_accepted():
    ids, mask = _batch([[5, 6, 7]], "left")
    req = request(ids, mask, GenerationConfig(top_k=50), num_beams=1, typical_p=1.0, use_cache=False)
    assert req.params.temperature == 0.0  # greedy: top_k does not matter


def test_values_transformers_treats_as_off_are_accepted():
    """A hub generation_config.json with "guidance_scale": 1.0 or "suppress_tokens": [] (a review found every call
    refused), and generate's own arguments at their no-op values, as transformers takes them."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    ids, mask = _batch([[5, 6, 7]], "left")
    config = GenerationConfig(guidance_scale=1.0, token_healing=False, suppress_tokens=[], begin_suppress_tokens=[],
                              sequence_bias={})
    req = request(ids, mask, config, logits_processor=LogitsProcessorList(), stopping_criteria=StoppingCriteriaList(),
                  synced_gpus=False, assistant_model=None, prefix_allowed_tokens_fn=None)
    assert req.params.max_new_tokens == 20
    for name, value in (("suppress_tokens", [3]), ("token_healing", True), ("sequence_bias", {(3,): 1.0})):
        with pytest.raises(ValueError, match=f"{name}=.* is not supported"):
            request(ids, mask, GenerationConfig(**{name: value}))


def test_sampling_settings_resolve_as_transformers():
    ids, mask = _batch([[5, 6, 7], [8]], "left")
    p = request(ids, mask, GC, do_sample=True).params
    assert (p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.min_new_tokens) == (50, 1.0, 0.0, 1.0, 0)
    qwen = GenerationConfig(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.05)
    p = request(ids, mask, qwen).params  # a Qwen checkpoint's generation_config.json
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.6, 20, 0.95, 1.05)
    p = request(ids, mask, qwen, top_k=0, min_p=0.1, do_sample=False, min_new_tokens=2).params
    assert (p.temperature, p.repetition_penalty, p.min_new_tokens) == (0.0, 1.05, 2)  # greedy keeps the penalty
    assert request(ids, mask, qwen, top_k=0, min_p=0.1).params.top_k == 0
    p = request(ids, mask, GC, do_sample=True, min_p=0.2, no_repeat_ngram_size=2).params
    assert (p.min_p, p.no_repeat_ngram_size) == (0.2, 2)
    p = request(ids, mask, GenerationConfig(do_sample=True, min_p=0.3, no_repeat_ngram_size=3)).params
    assert (p.min_p, p.no_repeat_ngram_size) == (0.3, 3)
    assert request(ids, mask, GC, min_length=5).params.min_new_tokens == 2  # min_length counts the padded input
    assert request(ids, mask, GC, min_length=9, min_new_tokens=1).params.min_new_tokens == 1  # it wins when set
    assert request(ids, mask, qwen, top_k=None).params.top_k == 0  # a keyword None: transformers adds no top-k
    req = request(ids, mask, GC, do_sample=True, num_return_sequences=2)
    assert req.prompts == [[5, 6, 7], [5, 6, 7], [8], [8]] and torch.equal(req.rows, ids[[0, 0, 1, 1]])


def test_a_model_generation_config_setting_that_changes_tokens_is_refused():
    ids, mask = _batch([[5, 6, 7]], "left")
    # the last four passed silently through a GenerationConfig (a review found them): transformers applies the
    # encoder_* pair to a decoder-only model's prompt, max_time cuts the output, renormalize_logits the scores
    for name, value in (("guidance_scale", 1.5), ("stop_strings", ["\n"]), ("penalty_alpha", 0.6),
                        ("encoder_repetition_penalty", 3.0), ("encoder_no_repeat_ngram_size", 2), ("max_time", 0.0),
                        ("renormalize_logits", True), ("assistant_ensemble_weight", 0.5)):
        with pytest.raises(ValueError, match=f"{name}=.* is not supported"):
            request(ids, mask, GenerationConfig(**{name: value}))
    assert request(ids, mask, GC, cache_implementation="static", use_cache=True).params.max_new_tokens == 20
    with pytest.raises(ValueError, match="typical_p=0.5 .* pass typical_p=1.0"):
        request(ids, mask, GenerationConfig(typical_p=0.5))


def test_a_generation_config_setting_hattn_does_not_know_is_warned_about():
    ids, mask = _batch([[5, 6, 7]], "left")
    with pytest.warns(UserWarning, match=r"ignores generation_config setting\(s\) \['my_setting'\]"):
        request(ids, mask, GenerationConfig(my_setting=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # settings without effect here (beam-only, assistants, ids) pass quietly
        request(ids, mask, GenerationConfig(bos_token_id=1, early_stopping=True, length_penalty=2.0, use_mtp=True,
                                            renormalize_logits=False, encoder_repetition_penalty=1.0))


@pytest.mark.parametrize("input_ids, mask, error, match", [
    ([[1, 2, 3]], None, TypeError, r"input_ids must be a \[B, T\] tensor of token ids .* got list; for lists of "
                                   r"ids use hattn.generate\(model, prompts\)"),
    (torch.tensor([1, 2, 3]), None, ValueError, r"non-empty \[B, T\] integer tensor, got shape \(3,\) torch.int64; "
                                                r"a single prompt is input_ids\[None\]"),
    (torch.zeros(1, 0, dtype=torch.long), None, ValueError, r"got shape \(1, 0\)"),
    (torch.ones(1, 3), None, ValueError, r"integer tensor, got shape \(1, 3\) torch.float32"),
    (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1]]), ValueError,
     r"attention_mask must be a tensor of input_ids' shape \(1, 3\), got \(1, 2\)"),
    (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 0, 1]]), ValueError,
     r"attention_mask row 0 is \[1, 0, 1\]: each row must be 1s for its tokens and 0s for padding on the left or "
     r"the right"),
    (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 1, 1], [0, 0, 0]]), ValueError,
     "attention_mask row 1 is all zeros: every row needs at least one token"),
    (torch.tensor([[1, 2]]), torch.tensor([[2, 1]]), ValueError, r"attention_mask row 0 is \[2, 1\]"),
])
def test_bad_input_ids_or_mask_are_named(input_ids, mask, error, match):
    with pytest.raises(error, match=match):
        request(input_ids, mask, GC)
