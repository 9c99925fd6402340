"""Model configs the presets do not cover: adapt gives transformers' tokens for them, or refuses them naming what
is not served (each case from a mutation review: a check no preset reached)."""
import copy

import pytest
import torch

from hattn.models.generate import SamplingParams, generate
from hattn.models.hf import adapt
from hattn.models.presets import preset_config, random_model
from hattn.models.reference import hf_greedy


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _adapted_and_reference(config, seed=0):
    hf = random_model(config, seed=seed)
    ref = copy.deepcopy(hf)
    return adapt(hf), ref


# -- gqa_full_spec's head_dim --------------------------------------------------------------------------------
def test_attention_head_dim_other_than_hidden_over_heads_gives_hf_tokens():
    """Every preset has head_dim == hidden_size // num_attention_heads (16 == 64/4),
    so a KV cache sized from hidden_size // heads (not config.head_dim) went unseen; real Qwen3.5-27B has
    head_dim 256 != 5120 // 24."""
    config = preset_config("tiny")
    config.head_dim = 32
    lm, ref = _adapted_and_reference(config)
    assert {s.kv for i, s in lm.cache_specs().items() if s.kind == "full"} == {(2, 32, 32)}
    prompts = [[5, 9, 2, 7], [7, 7, 1, 3, 8, 4, 2, 11, 3]]
    got = generate(lm, prompts, params=SamplingParams(max_new_tokens=8)).tokens
    assert got == hf_greedy(ref, prompts, 8).tokens


# -- register_family refuses a second family for one model_type -------------------------------------------------
def test_a_second_family_for_a_served_model_type_is_refused():
    """Registering another family for qwen3_5_text silently replaced the adapter."""
    from hattn.models.hf import FAMILIES, Family, family_of, register_family

    family_of(preset_config("tiny"))  # registers every family
    before = dict(FAMILIES)
    impostor = Family(name="impostor", model_types=("qwen3_5_text",), layer_kinds=lambda c: {},
                      cache_specs=lambda c: {}, forwards={}, mixer=lambda layer, kind: None)
    try:
        with pytest.raises(ValueError, match="model_type 'qwen3_5_text' is already served by family 'qwen3_5'"):
            register_family(impostor)
    finally:
        FAMILIES.clear()
        FAMILIES.update(before)
    assert FAMILIES["qwen3_5_text"].name == "qwen3_5"


# -- unknown layer types are a clear error ------------------------------------------------------------------
def test_a_layer_type_hattn_does_not_serve_is_named_in_the_error():
    """A sliding-window layer type gave a bare KeyError instead of naming it."""
    from hattn.models.hf import kinds_from_layer_types

    config = preset_config("tiny")
    config.layer_types = ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"layer types \['sliding_attention'\] are not served by hattn"):
        kinds_from_layer_types(config)


# -- the conv activation hattn hard-codes (silu) ---------------------------------------------------
@pytest.mark.parametrize("preset, key", [("tiny", "hidden_act"), ("tiny-qwen3-next", "hidden_act"),
                                         ("tiny-olmo-hybrid", "hidden_act"), ("tiny-kimi-linear", "hidden_act"),
                                         ("tiny-bailing-hybrid", "hidden_act"),
                                         ("tiny-nemotron-h", "mamba_hidden_act"),
                                         ("tiny-granite-4.0-h", "hidden_act"), ("tiny-bamba", "hidden_act")])
def test_a_conv_activation_other_than_silu_is_refused_at_adapt(preset, key):
    """transformers applies config.<key> after the short conv; hattn's conv
    kernels apply silu, so another activation gave other tokens silently. No preset tried another one."""
    config = preset_config(preset)
    setattr(config, key, "gelu")
    with pytest.raises(ValueError, match=f"conv1d applies silu.*{key}.*'gelu'"):
        adapt(random_model(config, seed=0), check=False)


# -- MiniMax sliding window ----------------------------------------------------------------------------------
def test_minimax_sliding_window_attention_is_refused_at_adapt():
    """hattn's full attention attends to the whole context; transformers'
    MiniMax with sliding_window masks beyond it (other tokens past the window)."""
    config = preset_config("tiny-minimax")
    config.sliding_window = 4
    with pytest.raises(ValueError, match=r"minimax: sliding-window attention \(sliding_window=4\) is not served"):
        adapt(random_model(config, seed=0), check=False)


# -- Nemotron-H's multi-token-prediction layers: transformers builds none of them -------------------------------
def test_nemotron_h_with_multi_token_prediction_layers_in_its_config_gives_hf_tokens():
    """transformers' Nemotron-H builds no layer for `num_nextn_predict_layers` (its forward is the main stack's), so
    a checkpoint's config with MTP layers is served as transformers runs it, not refused."""
    config = preset_config("tiny-nemotron-h")
    config.num_nextn_predict_layers = 1
    lm, ref = _adapted_and_reference(config)
    prompts = [[5, 9, 2, 7], [7, 7, 1, 3, 8, 4, 2, 11, 3]]
    assert generate(lm, prompts, params=SamplingParams(max_new_tokens=8)).tokens == hf_greedy(ref, prompts, 8).tokens


# -- Nemotron-H dt clamp (time_step_limit) --------------------------------------------------------------------
def test_nemotron_h_time_step_limit_clamps_dt_as_transformers():
    """The preset's time_step_limit is (0, inf), so dropping the clamp changed no
    logits; a finite limit (set in some checkpoints) clamps dt in transformers."""
    config = preset_config("tiny-nemotron-h")
    config.time_step_limit = (0.0, 0.01)
    lm, ref = _adapted_and_reference(config)
    ids = torch.randint(0, config.vocab_size, (13,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = lm(ids, torch.arange(13))
        want = ref(input_ids=ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- Granite 4.0-H and Bamba: the Mamba2 families beside Nemotron-H -------------------------------------------
def _logits_equal_hf(config, tokens: int = 13):
    lm, ref = _adapted_and_reference(config)
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = lm(ids, torch.arange(tokens))
        want = ref(input_ids=ids[None], use_cache=False).logits[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return got


@pytest.mark.parametrize("preset", ["tiny-granite-4.0-h", "tiny-bamba"])
def test_mamba2_time_step_limit_clamps_dt_as_transformers(preset):
    config = preset_config(preset)
    config.time_step_limit = (0.0, 0.01)
    _logits_equal_hf(config)


def test_no_time_step_limit_is_no_clamp():
    """A config whose time_step_limit is None is served without a clamp: transformers' default (0, inf), which is no
    clamp (softplus is >= 0), gives the reference (transformers' torch path itself cannot run None)."""
    config = preset_config("tiny-bamba")
    config.time_step_limit = None
    lm = adapt(random_model(config, seed=0))
    ref = random_model(preset_config("tiny-bamba"), seed=0)
    ids = torch.arange(1, 14)
    with torch.no_grad():
        torch.testing.assert_close(lm(ids, torch.arange(13)), ref(input_ids=ids[None], use_cache=False).logits[0],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("changes", [
    dict(position_embedding_type="rope"),  # Granite 4.0-H ships without RoPE; other Granite hybrids use it
    dict(num_local_experts=0),  # the dense Granite 4.0-H models (micro): the shared MLP only
    dict(mamba_conv_bias=False, mamba_proj_bias=True),
])
def test_granite_4_h_variants_give_hf_logits(changes):
    config = preset_config("tiny-granite-4.0-h")
    for k, v in changes.items():
        setattr(config, k, v)
    _logits_equal_hf(config)


def test_granite_attention_multiplier_is_the_attention_scale():
    """Granite scales attention by config.attention_multiplier, not head_dim ** -0.5: hattn's attention takes the
    scale transformers passes (a scale of its own gives other logits than transformers', below)."""
    half, quarter = preset_config("tiny-granite-4.0-h"), preset_config("tiny-granite-4.0-h")
    half.attention_multiplier, quarter.attention_multiplier = 0.5, 0.25
    assert not torch.allclose(_logits_equal_hf(half), _logits_equal_hf(quarter), atol=1e-3)


# -- one decode step on a cache against transformers' full forward -------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-lfm2", "tiny-bamba", "tiny-granite-4.0-h", "tiny-minimax",
                                    "tiny-kimi-linear"])
def test_a_decode_step_after_a_prefill_gives_the_logits_of_transformers_full_forward(preset):
    """The batched decode step of each torch mixer kind, checked by its logits (a few greedy tokens may agree by
    chance: a short conv with an activation it does not have still matched 8 tokens)."""
    from hattn.context import ForwardContext, forward_context

    hf = random_model(preset_config(preset), seed=0)
    ref, lm = copy.deepcopy(hf), adapt(hf)
    ids = torch.tensor([5, 9, 2, 7, 11, 3, 8])
    n, cache = len(ids) - 1, lm.make_cache(1, 16)
    with torch.no_grad():
        with forward_context(ForwardContext([n], [0], [0], cache, layer_kinds=lm.layer_kinds)):
            lm(ids[:n], torch.arange(n))
        with forward_context(ForwardContext([1], [n], [0], cache, layer_kinds=lm.layer_kinds)):
            got = lm(ids[n:], torch.tensor([n]))
        want = ref(input_ids=ids[None], use_cache=False).logits[0, -1:]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_swish_is_silu_for_the_conv_activation_check():
    """transformers' "swish" is SiLU: a config naming it is served, with transformers' logits."""
    config = preset_config("tiny-bamba")
    config.hidden_act = "swish"
    _logits_equal_hf(config)


# -- LFM2: gated short convs (kind "short_conv") -----------------------------------------------------------------
def test_lfm2_moe_gives_hf_tokens():
    """LFM2-MoE (lfm2_moe) is the LFM2 family with MoE MLPs past its first num_dense_layers: one family serves both."""
    from transformers import Lfm2MoeConfig

    types = ["conv", "full_attention", "conv", "conv"]
    config = Lfm2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                           num_experts_per_tok=2, num_dense_layers=1, layer_types=types, initializer_range=0.05,
                           pad_token_id=None, bos_token_id=None, eos_token_id=None)
    lm, ref = _adapted_and_reference(config)
    assert lm.layer_kinds == {0: "short_conv", 1: "full", 2: "short_conv", 3: "short_conv"}
    prompts = [[5, 9, 2, 7], [7, 7, 1, 3, 8, 4, 2, 11, 3]]
    assert generate(lm, prompts, params=SamplingParams(max_new_tokens=8)).tokens == hf_greedy(ref, prompts, 8).tokens


def test_lfm2_conv_bias_gives_hf_logits():
    config = preset_config("tiny-lfm2")
    config.conv_bias = True
    _logits_equal_hf(config)


def test_an_lfm2_layer_type_hattn_does_not_serve_is_named_in_the_error():
    from hattn.models.families.lfm2 import layer_kinds

    config = preset_config("tiny-lfm2")
    config.layer_types = ["conv", "sliding_attention"] + config.layer_types[2:]
    with pytest.raises(ValueError, match=r"lfm2: layer types \['sliding_attention'\] are not served by hattn"):
        layer_kinds(config)


# -- the probe's "exactly one split op per layer" ---------------------------------------------------------------
def test_a_layer_that_calls_its_split_op_twice_is_rejected_by_the_probe():
    """probe promises each layer calls exactly one split op; a mixer calling its
    op twice (its state advanced twice per step) was accepted when the check was 'its kind is among the calls'."""
    from hattn.models.hf import probe

    lm = adapt(random_model(preset_config("tiny"), seed=0))
    mixer = lm.hf.model.layers[0].linear_attn
    once = type(mixer).forward

    def twice(self, hidden_states, **kwargs):
        once(self, hidden_states, **kwargs)
        return once(self, hidden_states, **kwargs)

    mixer.forward = twice.__get__(mixer)
    with pytest.raises(ValueError, match=r"layer 0: config 'linear', called \['linear', 'linear'\]"):
        probe(lm)


# -- more layer kinds than layers ---------------------------------------------------------------------------
def test_a_config_with_more_layer_types_than_layers_is_refused_naming_both_counts():
    """The bound check was never reached by a test (>= vs > survived): one type
    too many gave a bare IndexError from the ModuleList instead."""
    hf = random_model(preset_config("tiny"), seed=0)
    hf.config.layer_types = list(hf.config.layer_types) + ["linear_attention"]
    with pytest.raises(ValueError, match="the config gives kinds for 5 layers but the model has 4"):
        adapt(hf)


def test_a_nemotron_h_block_type_hattn_does_not_serve_is_named_in_the_error():
    from hattn.models.families.nemotron_h import layer_kinds

    config = preset_config("tiny-nemotron-h")
    config.layers_block_type = ["mlp", "sliding_attention", "linear_attention"]
    with pytest.raises(ValueError, match=r"nemotron_h: block types \['sliding_attention'\] are not served"):
        layer_kinds(config)
