"""transformers-style generation arguments over hattn's packed generate: a padded [B, T] batch in, HF's layout out.

    req = request(input_ids, attention_mask, hf_model.generation_config, max_new_tokens=32, eos_token_id=2)
    res = generate(model, req.prompts, params=req.params)              # hattn.models.generate: packed prompts
    out = repad(input_ids, res.tokens, req.pad_token_id)               # [B, T + new], as transformers returns

Arguments resolve as in transformers: a keyword given wins (even None: top_k=None is no top-k), then the generation
config passed, then the model's (`merged_config`), then transformers' defaults (20 new tokens, greedy, top_k 50).
`repad` lays tokens out as transformers does: row i is input_ids[i] (padding included) followed by its new tokens,
then the pad token up to the longest row (a row ends early only at an eos token, which it keeps); the pad token
defaults to the first eos token.

Left- and right-padded batches are both read through the mask, and each row's new tokens are the continuation of
its prompt alone (so `no_repeat_ngram_size` looks at the prompt and its output, where transformers also counts the
n-grams of a row's left padding). For a right-padded batch transformers instead continues after the padding (and
warns that its tokens are wrong); hattn's equal transformers' for the same batch left-padded.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from hattn.models.sampling import SamplingParams, token_ids

DEFAULT_MAX_NEW_TOKENS = 20  # transformers' model-agnostic default (max_length=20 on top of the prompt)
ACCEPTED = ("max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
            "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "eos_token_id",
            "pad_token_id", "seed", "streamer", "return_dict_in_generate", "output_scores", "output_logits")
DEFAULT_TOP_K = 50  # transformers samples from the 50 most likely tokens unless top_k is set (0: all of them)
# settings that change which tokens come out and that hattn does not implement, with the value that means "off"
UNSUPPORTED = {"num_beams": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
               "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
               "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
               "output_attentions": False, "output_hidden_states": False, "penalty_alpha": None, "dola_layers": None,
               "guidance_scale": None, "stop_strings": None, "watermarking_config": None, "token_healing": None,
               "exponential_decay_length_penalty": None, "force_words_ids": None, "constraints": None,
               "num_beam_groups": 1, "diversity_penalty": 0.0, "prompt_lookup_num_tokens": None,
               # transformers applies the encoder_* pair to a decoder-only model's prompt; max_time cuts the output;
               # renormalize_logits changes the scores it returns
               "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "max_time": None,
               "renormalize_logits": False, "remove_invalid_values": False,
               # with use_mtp, transformers mixes the draft's probabilities into the sampled distribution by it
               "assistant_ensemble_weight": None,
               # generate's own arguments besides the config's fields
               "logits_processor": None, "stopping_criteria": None, "prefix_allowed_tokens_fn": None,
               "synced_gpus": False, "assistant_model": None, "negative_prompt_ids": None,
               "negative_prompt_attention_mask": None, "custom_generate": None}
# settings of what transformers returns, not of the tokens: they matter only with return_dict_in_generate (a model
# config's output_hidden_states=True reaches its generation config)
ONLY_RETURNED = ("output_attentions", "output_hidden_states")
# other values that mean "off" to transformers: a guidance scale of 1 is no guidance, token healing is a flag (and an
# empty list of tokens, bad words or biases, or of processors, is also off: `_off`)
ALSO_OFF = {"guidance_scale": 1.0, "token_healing": False}
# settings that change how transformers computes, not which tokens come out: accepted and left to hattn's own cache
IGNORED = ("use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile")
# generation-config fields that change nothing here: ids of other models' kinds, beam-search-only settings (beams are
# refused), assistant/speculative settings without an assistant (greedy tokens and the sampled distribution are the
# same), transformers' own bookkeeping. Any other field set is warned about: hattn does not know what it does.
NO_EFFECT = ("bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "early_stopping",
             "length_penalty", "low_memory", "max_cache_len", "prefill_chunk_size", "use_mtp", "is_assistant",
             "assistant_confidence_threshold", "assistant_early_exit", "assistant_lookbehind", "target_lookbehind",
             "num_assistant_tokens", "num_assistant_tokens_schedule", "max_matching_ngram_size", "speculation_type",
             "continuous_batching_config")


@dataclass
class Request:
    """Packed prompts (the unpadded rows, in row order), how to sample, what pads the output, and the input rows of
    the output (input_ids with each row repeated num_return_sequences times, as the prompts are)."""

    prompts: list[list[int]]
    params: SamplingParams
    pad_token_id: int | None
    rows: torch.Tensor
    streamer: object = None  # transformers' streamer protocol: put(tokens on the host), end()
    keep: tuple[str, ...] = ()  # "scores", "logits": what generate keeps of every step
    return_dict: bool = False  # return_dict_in_generate: a GenerateDecoderOnlyOutput, not the tensor


def request(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generation_config,
            max_positions: int | None = None, **kwargs) -> Request:
    """Resolve transformers' generate arguments for `input_ids` [B, T] (see the module docstring);
    `max_positions`: the model config's max_position_embeddings, which caps the default length as in transformers."""
    unknown = sorted(set(kwargs) - set(ACCEPTED) - set(UNSUPPORTED) - set(IGNORED))
    if unknown:
        raise TypeError(f"generate() got unsupported argument(s) {unknown}; hattn's generate takes input_ids, "
                        f"attention_mask, generation_config and {', '.join(ACCEPTED + IGNORED)}")
    check_input_ids(input_ids)
    setting = _settings(generation_config, kwargs)
    _check_unsupported(setting)
    _warn_unknown(generation_config)
    eos = token_ids(setting("eos_token_id"), "eos_token_id")
    pad = setting("pad_token_id")
    pad = eos[0] if pad is None and eos else pad
    repeats = _num_return_sequences(setting)
    prompts = [p for p in _prompts(input_ids, attention_mask, pad, eos) for _ in range(repeats)]  # HF's row order
    width = input_ids.shape[1]
    # min_new_tokens, when set, overrides min_length, which counts the padded input (transformers' rule)
    min_new = setting("min_new_tokens")
    min_new = max(setting("min_length", 0) - width, 0) if min_new is None else min_new
    params = SamplingParams(max_new_tokens=_max_new_tokens(setting, width, max_positions), stop_tokens=eos,
                            seed=setting("seed"),
                            repetition_penalty=float(setting("repetition_penalty", 1.0)), min_new_tokens=min_new,
                            no_repeat_ngram_size=setting("no_repeat_ngram_size", 0), **_sampling(setting))
    streamer = kwargs.get("streamer")
    if streamer is not None and not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise TypeError(f"streamer must have put(tokens) and end(), as transformers' TextStreamer, got "
                        f"{type(streamer).__name__}")
    rows = input_ids.repeat_interleave(repeats, dim=0) if repeats > 1 else input_ids
    return_dict = bool(setting("return_dict_in_generate", False))
    keep = tuple(what for what in ("scores", "logits") if return_dict and setting(f"output_{what}", False))
    return Request(prompts, params, pad, rows, streamer, keep, return_dict)


def output(req: Request, sequences: torch.Tensor, res) -> torch.Tensor:
    """What transformers' generate returns: the sequences, or with return_dict_in_generate its output object, whose
    scores / logits hold a [B, vocab] tensor per new-token column of `sequences` (a row that stopped keeps being
    scored, on its own tokens, where transformers feeds it the pad token: read a row's scores up to its stop)."""
    if not req.return_dict:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    steps = sequences.shape[1] - req.rows.shape[1]
    kept = {what: tuple(getattr(res, what)[:steps]) if what in req.keep else None for what in ("scores", "logits")}
    return GenerateDecoderOnlyOutput(sequences=sequences, **kept)


def stream_to(req: Request) -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """generate's `on_tokens` for the request's streamer, after putting the input rows to it as transformers does:
    each step's tokens, the pad token in rows that had stopped (None without a streamer)."""
    if req.streamer is None:
        return None
    req.streamer.put(req.rows.cpu())
    pad = 0 if req.pad_token_id is None else req.pad_token_id  # None only without eos: no row stops

    def on_tokens(tokens: torch.Tensor, stopped: torch.Tensor) -> None:
        req.streamer.put(tokens.masked_fill(stopped, pad))
    return on_tokens


def _settings(generation_config, kwargs: dict):
    """setting(name, default): the keyword if given (even None), else the generation config's; None -> default.
    `setting.unset_by_keyword(name)`: a keyword of None (transformers then leaves that processor out)."""
    def setting(name: str, default=None):
        value = kwargs[name] if name in kwargs else getattr(generation_config, name, None)
        return default if value is None else value
    setting.unset_by_keyword = lambda name: name in kwargs and kwargs[name] is None
    return setting


def merged_config(passed, model_config):
    """The generation config transformers generates with when `passed` is given to a model whose own is
    `model_config`: passed's settings, the model's where passed leaves one unset (None)."""
    if passed is None or model_config is None:
        return passed if passed is not None else model_config
    merged = copy.deepcopy(passed)
    for name, value in model_config.to_dict().items():
        if value is not None and getattr(merged, name, None) is None:
            setattr(merged, name, value)
    return merged


def _check_unsupported(setting) -> None:
    for name, off in UNSUPPORTED.items():
        value = setting(name)
        if _off(name, value) or (name in ONLY_RETURNED and not setting("return_dict_in_generate", False)):
            continue
        effect = "its output would lack them" if name in ONLY_RETURNED else "it would change the tokens"
        raise ValueError(f"{name}={value!r} (from the arguments or the model's generation_config) is not "
                         f"supported by hattn's generate ({effect}): pass {name}={off!r}, or use transformers' "
                         f"generate on a model hattn has not adapted")


def _off(name: str, value) -> bool:
    """Whether `value` of the unsupported setting `name` leaves transformers' tokens as they are without it."""
    if value is None or value == UNSUPPORTED[name] or (name in ALSO_OFF and value == ALSO_OFF[name]):
        return True
    return isinstance(value, (list, tuple, dict)) and len(value) == 0  # LogitsProcessorList() is a list


def _warn_unknown(generation_config) -> None:
    known = {*ACCEPTED, *UNSUPPORTED, *IGNORED, *NO_EFFECT}
    fields = generation_config.to_dict() if hasattr(generation_config, "to_dict") else {}
    unknown = sorted(name for name, value in fields.items() if value is not None and name not in known)
    if unknown:
        warnings.warn(f"hattn's generate ignores generation_config setting(s) {unknown}: it does not implement them "
                      f"(check that they do not change the tokens you expect)", stacklevel=3)


def _num_return_sequences(setting) -> int:
    n = setting("num_return_sequences", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {n!r}")
    if n > 1 and not setting("do_sample", False):
        raise ValueError(f"num_return_sequences={n} with greedy decoding would return {n} equal rows per input: "
                         f"pass do_sample=True (beam search, the other way transformers returns several, is not "
                         f"implemented)")
    return n


def _prompts(input_ids: torch.Tensor, attention_mask, pad, eos) -> list[list[int]]:
    """Each row's tokens, through the mask given or the one transformers infers from the pad token."""
    if attention_mask is not None:
        return unpad(input_ids, attention_mask)
    try:
        return unpad(input_ids, infer_mask(input_ids, pad, eos))
    except ValueError as e:
        raise ValueError(f"no attention_mask was given, and pad_token_id={pad} occurs inside a prompt, so the mask "
                         f"inferred from it has a hole ({e}); pass attention_mask=... (1 for each token of a row, 0 "
                         f"for its padding)") from None


def _max_new_tokens(setting, width: int, max_positions: int | None = None) -> int:
    n = setting("max_new_tokens")
    if n is None and setting("max_length") is not None:
        n = setting("max_length") - width
        if n < 1:
            raise ValueError(f"max_length={setting('max_length')} leaves no room for new tokens after the "
                             f"{width}-token input: pass max_new_tokens=... instead")
    if n is None:  # transformers' default: 20 new tokens, the total capped at the model's positions
        n = DEFAULT_MAX_NEW_TOKENS if max_positions is None else min(DEFAULT_MAX_NEW_TOKENS, max_positions - width)
        if n < 1:
            raise ValueError(f"the {width}-token input fills the model's max_position_embeddings={max_positions}: "
                             f"pass max_new_tokens=... to generate past it")
    return n  # SamplingParams checks it (an int >= 1)


def _sampling(setting) -> dict:
    """temperature / top_k / top_p / min_p of SamplingParams: greedy (temperature 0) unless do_sample; unset ones
    are transformers' defaults (top_k 50)."""
    if not setting("do_sample", False):
        return {"temperature": 0.0}
    temperature = setting("temperature", 1.0)
    if not temperature > 0:
        raise ValueError(f"do_sample=True needs temperature > 0, got {temperature!r}: for greedy tokens pass "
                         f"do_sample=False")
    top_k = 0 if setting.unset_by_keyword("top_k") else setting("top_k", DEFAULT_TOP_K)
    return {"temperature": float(temperature), "top_k": top_k,
            "top_p": float(setting("top_p", 1.0)), "min_p": float(setting("min_p", 0.0))}


def check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a [B, T] tensor of token ids (as a tokenizer returns with "
                        f"return_tensors='pt'), got {type(input_ids).__name__}; for lists of ids use "
                        f"hattn.generate(model, prompts)")
    if input_ids.dim() != 2 or input_ids.numel() == 0 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be a non-empty [B, T] integer tensor, got shape {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}; a single prompt is input_ids[None]")


def infer_mask(input_ids: torch.Tensor, pad: int | None, eos: tuple[int, ...]) -> torch.Tensor:
    """transformers' mask when none is given: `input_ids != pad` if the pad token occurs and is not an eos token."""
    if pad is None or pad in eos or not bool((input_ids == pad).any()):
        return torch.ones_like(input_ids)
    return (input_ids != pad).long()


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The tokens of each row [B, T] whose mask is 1: one contiguous run per row (left or right padding)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    prompts = []
    for i, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
        kept = [j for j, m in enumerate(mask) if m]
        if not kept:
            raise ValueError(f"attention_mask row {i} is all zeros: every row needs at least one token")
        if any(m not in (0, 1) for m in mask) or len(kept) != kept[-1] - kept[0] + 1:
            raise ValueError(f"attention_mask row {i} is {mask}: each row must be 1s for its tokens and 0s for "
                             f"padding on the left or the right (one contiguous run of 1s)")
        prompts.append(ids[kept[0]:kept[-1] + 1])
    return prompts


def repad(input_ids: torch.Tensor, new_tokens: list[list[int]], pad_token_id: int | None) -> torch.Tensor:
    """[B, T + longest]: input_ids [B, T], then each row's new tokens, then the pad token (transformers' layout)."""
    width = max(len(t) for t in new_tokens)
    fill = 0 if pad_token_id is None else pad_token_id  # None only without eos: every row is then full width
    rows = [t + [fill] * (width - len(t)) for t in new_tokens]
    # int64 as transformers returns, whatever integer type the ids came in
    return torch.cat([input_ids.long(), torch.tensor(rows, dtype=torch.long).to(input_ids.device)], dim=1)
