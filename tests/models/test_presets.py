"""Presets: the benchmark shape, every tiny family, and loading a saved model / a config from disk."""
import pytest
import torch

from hattn.models.generate import SamplingParams, generate
from hattn.models.presets import PRESETS, load, preset_config, random_model


def test_qwen3_5_1b_shape():
    c = preset_config("qwen3.5-1b")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size) == (1024, 24, 3584, 248320)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 2, 256)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim) == (16, 16, 128)
    assert c.layer_types == ["linear_attention"] * 3 + ["full_attention"] + c.layer_types[4:]
    assert c.layer_types.count("full_attention") == 6
    model = random_model(c, device="meta")  # no memory, just the parameter count
    assert 0.95e9 < sum(p.numel() for p in model.parameters()) < 1.1e9


def test_presets_are_deterministic_per_seed():
    a, b, other = (load("tiny", seed=s) for s in (0, 0, 1))
    wa, wb, wo = (m.hf.lm_head.weight for m in (a, b, other))
    assert torch.equal(wa, wb) and not torch.equal(wa, wo)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown preset 'nope'; presets: tiny, qwen3.5-1b"):
        preset_config("nope")
    assert all(name in ("qwen3.5-1b", "qwen3.5-27b") or name.startswith("tiny") for name in PRESETS)


def test_qwen3_5_27b_shape():
    c = preset_config("qwen3.5-27b")
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.head_dim) == (5120, 64, 17408, 256)
    assert (c.num_attention_heads, c.num_key_value_heads, c.linear_num_key_heads, c.linear_num_value_heads) == \
        (24, 4, 16, 48)
    assert c.layer_types.count("full_attention") == 16
    model = random_model(c, device="meta")
    assert 26.5e9 < sum(p.numel() for p in model.parameters()) < 27.5e9


def test_saved_model_and_config_load(tmp_path, make_case):
    c = make_case("tiny")
    c.hf.save_pretrained(tmp_path / "model")
    lm = load(model=str(tmp_path / "model"))
    assert generate(lm, c.prompts, params=SamplingParams(max_new_tokens=32)).tokens == c.ref.tokens
    c.hf.config.save_pretrained(tmp_path / "config")
    lm = load(config=str(tmp_path / "config" / "config.json"))  # same config, fixed-seed random weights
    assert lm.family == "qwen3_5" and lm.layer_kinds == c.lm.layer_kinds


def test_load_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValueError, match="exactly one of"):
        load("tiny", config="x")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load(model=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(config=str(tmp_path / "missing.json"))


def test_a_saved_model_loads_in_its_own_dtype_with_auto(tmp_path, monkeypatch):
    """dtype="auto" (transformers': the checkpoint's dtype) passes the size check, which counts the config's dtype;
    a quantized checkpoint's weights are not numel x dtype bytes, so its size is left to the loader."""
    import transformers

    from hattn.models import presets

    random_model(preset_config("tiny"), dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert next(load(model=str(tmp_path), dtype="auto").parameters()).dtype == torch.bfloat16
    counted = []
    monkeypatch.setattr(presets, "_check_weights_fit", lambda config, dtype, device: counted.append(dtype))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: 1 / 0)  # checked
    with pytest.raises(ZeroDivisionError):
        load(model=str(tmp_path), dtype="auto")
    config = preset_config("tiny")
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    monkeypatch.setattr(presets, "_read_config", lambda path: config)
    with pytest.raises(ZeroDivisionError):
        load(model=str(tmp_path))
    assert counted == [torch.bfloat16]
