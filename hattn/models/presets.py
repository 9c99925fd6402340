"""Model presets: transformers configs built in code (no hub download), with fixed-seed random weights.

    lm = load("tiny")                                   # a small Qwen3.5-shaped model for demos and tests
    lm = load("qwen3.5-1b", dtype=torch.bfloat16, device="cuda")
    lm = load(config="path/to/config.json")             # any supported family, random weights
    lm = load(model="path/to/saved_model")              # a local saved model (save_pretrained output)

"tiny-<family>" presets are small random models of every family hattn adapts (the tests use them).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

import torch

from hattn.models.hf import HybridLM, adapt, family_of, text_config

log = logging.getLogger("hattn")

LINEAR, FULL = "linear_attention", "full_attention"


def _pattern(n_layers: int, every: int = 4) -> list[str]:
    """`every-1` linear layers then one full layer, repeated (Qwen3.5's 3:1 for every=4)."""
    return [FULL if (i + 1) % every == 0 else LINEAR for i in range(n_layers)]


_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, initializer_range=0.05, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def tiny():
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(**_TINY, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                             linear_key_head_dim=16, linear_value_head_dim=16, layer_types=_pattern(4))


def qwen3_5_1b():
    """The 1B-class Qwen3.5 shape of the benchmarks (~1.0B parameters, untied embeddings)."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(vocab_size=248320, hidden_size=1024, intermediate_size=3584, num_hidden_layers=24,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                             linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                             layer_types=_pattern(24), tie_word_embeddings=False)


def qwen3_5_27b():
    """The 27B dense Qwen3.5 shape (~26.9B parameters): weights and a 64 x 8k-token cache want two GPUs (issue 20's
    tensor-parallel goals)."""
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
                             num_attention_heads=24, num_key_value_heads=4, head_dim=256, linear_num_key_heads=16,
                             linear_num_value_heads=48, linear_key_head_dim=128, linear_value_head_dim=128,
                             layer_types=_pattern(64), tie_word_embeddings=False)


def tiny_qwen3_next():
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(**_TINY, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                           linear_key_head_dim=16, linear_value_head_dim=16, layer_types=_pattern(4),
                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                           shared_expert_intermediate_size=64)


def tiny_olmo_hybrid():
    from transformers import OlmoHybridConfig

    return OlmoHybridConfig(**_TINY, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                            linear_value_head_dim=32, layer_types=_pattern(4))


_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, linear_num_heads=4,
            linear_head_dim=16, num_experts=4, num_experts_per_token=2, moe_intermediate_size=64,
            num_shared_experts=1)


def tiny_kimi_linear():
    from transformers import KimiLinearConfig

    return KimiLinearConfig(**{**_TINY, "num_key_value_heads": 4}, **_MLA, q_lora_rank=None,
                            layer_types=_pattern(4), mlp_layer_types=["dense", "sparse", "sparse", "sparse"])


def tiny_bailing_hybrid():
    from transformers import BailingHybridConfig

    return BailingHybridConfig(**{**_TINY, "num_key_value_heads": 4}, **_MLA, num_expert_group=1, topk_group=1,
                               first_k_dense_replace=1, num_mtp_layers=0, layer_types=_pattern(4))


def tiny_minimax():
    from transformers import MiniMaxConfig

    return MiniMaxConfig(**_TINY, head_dim=16, layer_types=_pattern(4), block_size=8, num_local_experts=4,
                         num_experts_per_tok=2)


def tiny_nemotron_h():
    from transformers import NemotronHConfig

    types = [LINEAR, "moe", FULL, "mlp", LINEAR, "mlp"]
    return NemotronHConfig(**{**_TINY, "num_hidden_layers": len(types)}, head_dim=16, layer_types=types,
                           mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=16, n_groups=2, chunk_size=8,
                           n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                           moe_shared_expert_intermediate_size=64, num_nextn_predict_layers=0)


_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=32, mamba_chunk_size=8)  # P != N


def tiny_granite_4_h():
    """Granite 4.0-H's layout (no RoPE, MoE beside a shared MLP, Granite's multipliers) at tiny sizes."""
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(**_TINY, **_MAMBA, layer_types=_pattern(4), position_embedding_type=None,
                                  num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
                                  embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                                  logits_scaling=4.0)


def tiny_bamba():
    from transformers import BambaConfig

    return BambaConfig(**_TINY, **_MAMBA, attn_layer_indices=[1, 3])


def tiny_lfm2():
    from transformers import Lfm2Config

    types = ["conv", FULL, "conv", "conv", FULL, "conv"]  # LFM2's mostly-conv layout
    return Lfm2Config(**{**_TINY, "num_hidden_layers": len(types)}, layer_types=types)


PRESETS: dict[str, Callable] = {
    "tiny": tiny,
    "qwen3.5-1b": qwen3_5_1b,
    "qwen3.5-27b": qwen3_5_27b,
    "tiny-qwen3-next": tiny_qwen3_next,
    "tiny-olmo-hybrid": tiny_olmo_hybrid,
    "tiny-kimi-linear": tiny_kimi_linear,
    "tiny-bailing-hybrid": tiny_bailing_hybrid,
    "tiny-minimax": tiny_minimax,
    "tiny-nemotron-h": tiny_nemotron_h,
    "tiny-granite-4.0-h": tiny_granite_4_h,
    "tiny-bamba": tiny_bamba,
    "tiny-lfm2": tiny_lfm2,
}


TINY_FAMILIES = tuple(name for name in PRESETS if name == "tiny" or name.startswith("tiny-"))  # one per family


class PresetUnavailable(ImportError):
    """The installed transformers does not ship the family of a preset."""


def preset_config(name: str):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    try:
        return PRESETS[name]()
    except ImportError as e:  # the family is newer than the installed transformers
        import transformers

        raise PresetUnavailable(f"preset {name!r} needs a transformers release that ships its model family "
                                f"({e}); installed: transformers {transformers.__version__}. Fix: "
                                f"pip install -U 'transformers>=5.23'") from e


def random_model(config, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> torch.nn.Module:
    """An unmodified transformers causal LM of `config` with weights drawn from `seed` (on `device`); weights larger
    than the device's memory are a ValueError before anything is allocated (a default-sized config, 7B parameters,
    could take the machine's memory first)."""
    from transformers import AutoModelForCausalLM

    _check_weights_fit(config, dtype, device)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _check_weights_fit(config, dtype: torch.dtype, device) -> None:
    from transformers import AutoModelForCausalLM

    from hattn.models.cache import memory_room

    room = memory_room(device)
    if room is None:
        return
    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if nbytes > room[0]:
        raise ValueError(f"the {config.model_type} model of this config has {nbytes / 2**30:.1f} GiB of weights "
                         f"({dtype}), more than the {room[0] / 2**30:.1f} GiB {torch.device(device)} has {room[1]}: "
                         f"give a smaller config (its hidden_size, num_hidden_layers, vocab_size, ...) or another "
                         f"device or dtype")


def load(preset: str | None = None, *, config: str | None = None, model: str | None = None,
         dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> HybridLM:
    """An adapted model from exactly one of: a preset name, a config file/dir (random weights), a saved model dir."""
    if sum(x is not None for x in (preset, config, model)) != 1:
        raise ValueError("give exactly one of preset=, config= (config.json), model= (a saved model directory)")
    start = time.perf_counter()
    torch.empty(0, device=device)  # the device's context first (CUDA: a second or more), timed apart
    ready = time.perf_counter()
    if model is not None:
        made, hf = ready, _from_pretrained(model, dtype, device)
    else:
        made_config = preset_config(preset) if config is None else _read_config(config)
        made = time.perf_counter()
        hf = random_model(made_config, dtype, device, seed)
    built = time.perf_counter()
    lm = adapt(hf)
    log.info("hattn: model: %s ready %.2f s, config %.2f s (transformers' imports), built %.2f s, adapted %.2f s",
             device, ready - start, made - ready, built - made, time.perf_counter() - built)
    return lm


def _read_config(path: str):
    """The transformers config at `path`, of a family hattn adapts (checked here, before any model is built: a
    default-sized one of another family could take the machine's memory first)."""
    from transformers import AutoConfig

    if not os.path.exists(path):
        raise FileNotFoundError(f"config {path!r} does not exist (give a config.json or a directory holding one)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except OSError as e:  # not JSON, no config.json in the directory: transformers' own words, without a traceback
        raise ValueError(f"config {path!r} cannot be read as a transformers config: {e}") from e
    family_of(text_config(config))
    return config


def _loaded_dtype(dtype, config) -> torch.dtype:
    """The dtype from_pretrained loads with: `dtype`, or the config's for "auto" (float32 where it names none)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    named = getattr(config, "dtype", None)
    named = getattr(torch, named, None) if isinstance(named, str) else named
    return named if isinstance(named, torch.dtype) else torch.float32


def _from_pretrained(path: str, dtype, device):
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {path!r} is not a directory (save one with model.save_pretrained(path))")
    config = _read_config(path)  # a family hattn adapts, and weights the device holds, before any is read
    if getattr(config, "quantization_config", None) is None:  # quantized weights are not numel x dtype bytes
        _check_weights_fit(config, _loaded_dtype(dtype, config), device)
    try:
        hf = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    except OSError as e:  # no weights or no config in it
        raise ValueError(f"model {path!r} cannot be loaded as a transformers model (a save_pretrained directory "
                         f"with config.json and weights): {e}") from e
    return hf.to(device).eval()
