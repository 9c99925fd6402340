"""The fla autotuning results hattn ships (hattn/kernels/gated_delta/fla_configs): their format, when fla reads them."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch

from hattn.kernels.gated_delta import chunk
from hattn.kernels.gated_delta.chunk import SHIPPED_CONFIGS, config_dir_for, use_shipped_configs

FILES = sorted(SHIPPED_CONFIGS.glob("*/*.json"))


def _key_hash(key) -> str:
    """fla 0.6.0's AutotuneKey.key_hash: md5 of the key as compact, sorted JSON."""
    return hashlib.md5(json.dumps(key, separators=(",", ":"), sort_keys=True).encode()).hexdigest()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A configs directory of its own holding one GPU's: the tests do not depend on which GPUs hattn ships."""
    (tmp_path / "NVIDIA_H200").mkdir()
    monkeypatch.setattr(chunk, "SHIPPED_CONFIGS", tmp_path)
    return tmp_path


def test_a_gpus_directory_is_found_by_its_name(shipped):
    assert config_dir_for("NVIDIA H200") == shipped / "NVIDIA_H200"


@pytest.mark.parametrize("file", FILES, ids=lambda f: f"{f.parent.name}/{f.stem}")
def test_each_file_is_in_fla_format_and_keyed_as_fla_hashes(file):
    body = json.loads(file.read_text())
    assert body["kernel_name"] == file.stem  # fla looks a kernel's file up by its function's name
    assert body["autotune_entries"]
    for digest, entry in body["autotune_entries"].items():
        assert digest == _key_hash(entry["autotune_key"])
        # the model's offsets and chunk indices are int64 (PackedBatch): a key of int32 ones matches no call of it
        assert "torch.int32" not in entry["autotune_key"]
        config = entry["config"]
        assert isinstance(config["kwargs"], dict)
        assert config["num_warps"] in (1, 2, 4, 8, 16, 32) and config["num_stages"] >= 1 and config["num_ctas"] == 1


def test_unknown_or_absent_gpus_have_no_directory(shipped):
    assert config_dir_for(None) is None
    assert config_dir_for("NVIDIA Z9000") is None


@pytest.fixture
def clean_env(monkeypatch):
    """Neither variable set, and whatever the test sets undone after it (setenv first: monkeypatch restores only
    what it changed, and deleting an unset variable changes nothing)."""
    for var in ("FLA_CONFIG_DIR", "FLA_CACHE_MODE"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return monkeypatch


def test_fla_is_pointed_at_the_gpus_directory_in_strict_mode(clean_env, shipped):
    import os

    assert use_shipped_configs("NVIDIA H200") == shipped / "NVIDIA_H200"
    assert os.environ["FLA_CONFIG_DIR"] == str(shipped / "NVIDIA_H200")
    assert os.environ["FLA_CACHE_MODE"] == "strict"


@pytest.mark.parametrize("var, value", [("FLA_CONFIG_DIR", "/mine"), ("FLA_CACHE_MODE", "disabled")])
def test_a_users_own_fla_settings_win(clean_env, shipped, var, value):
    import os

    clean_env.setenv(var, value)
    assert use_shipped_configs("NVIDIA H200") is None
    assert os.environ[var] == value
    assert ("FLA_CACHE_MODE" if var == "FLA_CONFIG_DIR" else "FLA_CONFIG_DIR") not in os.environ


def test_an_unknown_gpu_leaves_fla_as_it_was(clean_env, shipped):
    import os

    assert use_shipped_configs("NVIDIA Z9000") is None
    assert "FLA_CONFIG_DIR" not in os.environ and "FLA_CACHE_MODE" not in os.environ


def test_an_already_imported_fla_is_switched_to_strict(clean_env, shipped):
    """transformers imports fla for its own layers before hattn's first prefill: fla read FLA_CACHE_MODE then."""
    import enum
    import types

    class Mode(enum.Enum):
        DISABLED = "disabled"
        STRICT = "strict"

    fake = types.SimpleNamespace(FlaCacheMode=Mode, FLA_CACHE_MODE=Mode.DISABLED)
    clean_env.setitem(sys.modules, "fla.ops.utils.cache", fake)
    use_shipped_configs("NVIDIA H200")
    assert fake.FLA_CACHE_MODE is Mode.STRICT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fla_reads_the_shipped_config_of_the_1b_shape():
    """On a GPU with a shipped directory, fla's own lookup returns the shipped config for the 1B preset's key."""
    pytest.importorskip("fla")
    if chunk.fla_chunk() is None or config_dir_for(torch.cuda.get_device_name(0)) is None:
        pytest.skip("no shipped configs for this GPU")
    from fla.ops.utils.cache import AutotuneKey, load_cached_config

    file = config_dir_for(torch.cuda.get_device_name(0)) / "chunk_fwd_kernel_o.json"
    entry = next(iter(json.loads(file.read_text())["autotune_entries"].values()))
    got = load_cached_config("chunk_fwd_kernel_o", AutotuneKey(tuple(entry["autotune_key"])))
    assert got == entry["config"]


def test_configs_are_read_from_the_models_own_autotuning_logs():
    """scripts/fla_configs.py --from-logs: the key and config Triton printed (TRITON_PRINT_AUTOTUNING=1) for each
    of the model's calls, the most common choice per key over runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "scripts" / "fla_configs.py"
    spec = importlib.util.spec_from_file_location("fla_configs_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(warps: int, bk: int) -> str:
        return ("Autotuning kernel k with config BK: 32, num_warps: 1\nTriton autotuning for function k,\n"
                "with key as (16, 128, False, 'torch.bfloat16', 'torch.int64'),\nfinished after 2.35s,\n"
                f"best config selected: BK: {bk}, num_warps: {warps}, num_ctas: 1, num_stages: 3, maxnreg: None;\n"
                "Triton autotuning for function c,\nwith key as (1, 'torch.float32'),\nfinished after 0.9s,\n"
                "best config selected: num_warps: 8, num_ctas: 1, num_stages: 3, maxnreg: None;\n")

    odd = ("Triton autotuning for function f,\nwith key as (8, 'torch.int64'),\nfinished after 1.0s,\n"
           "best config selected: USE_X: True, SCALE: 0.5, num_warps: 4, num_ctas: 1, num_stages: 2, maxnreg: 128;\n")
    choices, split = script.choices_from_logs([run(4, 64), run(2, 32), run(4, 64), odd])
    assert choices["f"][(8, "torch.int64")] == {"kwargs": {"USE_X": True, "SCALE": 0.5}, "num_warps": 4,
                                                "num_ctas": 1, "num_stages": 2, "maxnreg": 128}
    key = (16, 128, False, "torch.bfloat16", "torch.int64")
    assert choices["k"] == {key: {"kwargs": {"BK": 64}, "num_warps": 4, "num_ctas": 1, "num_stages": 3,
                                  "maxnreg": None}}
    assert choices["c"][(1, "torch.float32")]["kwargs"] == {} and len(split) == 1 and split[0].startswith("k ")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_shipped_configs_serve_the_models_own_calls(monkeypatch):
    """Every fla kernel hattn's chunked rule launches (new and continued sequences, int64 offsets, the 1B preset's
    16 heads of 128) finds its config in the GPU's shipped files: none autotunes. The H200's files of the
    thirteenth session, written from a call with int32 offsets, matched none of these keys."""
    import gc
    import os

    pytest.importorskip("fla")
    if chunk.fla_chunk() is None or config_dir_for(torch.cuda.get_device_name(0)) is None:
        pytest.skip("no shipped configs for this GPU")
    if os.environ.get("FLA_CONFIG_DIR") != str(config_dir_for(torch.cuda.get_device_name(0))):
        pytest.skip("fla reads the user's own configs")
    from fla.ops.utils import cache as fla_cache

    from hattn.kernels.gated_delta.chunk import chunk_gated_delta_rule_slots
    from hattn.kernels.packing import PackedBatch

    for tuner in [o for o in gc.get_objects() if isinstance(o, fla_cache.CachedAutotuner)]:
        monkeypatch.setattr(tuner, "cache", {})  # earlier calls' choices: every key is looked up again
    looked, lookup = [], fla_cache.load_cached_config
    monkeypatch.setattr(fla_cache, "load_cached_config",
                        lambda name, key=None: looked.append((name, key, lookup(name, key))) or looked[-1][2])
    torch.manual_seed(0)
    t, heads, dim, lens = 200, 16, 128, [136, 64]
    q = torch.nn.functional.normalize(torch.randn(t, heads, dim, device="cuda"), dim=-1).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(t, heads, dim, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(t, heads, dim, device="cuda", dtype=torch.bfloat16)
    g, beta = -torch.rand(t, heads, device="cuda"), torch.rand(t, heads, device="cuda", dtype=torch.bfloat16)
    states = torch.zeros(len(lens), heads, dim, dim, device="cuda")
    for context in ([0, 0], [1, 1]):  # new prompts (no initial states), then continued ones
        batch = PackedBatch.build(lens, "cuda", slots=[0, 1], context_lens=context)
        chunk_gated_delta_rule_slots(q, k, v, g, beta, batch, states)
    torch.cuda.synchronize()
    assert looked, "no fla kernel looked its config up (FLA_CACHE_MODE not strict?)"
    missing = [(name, key.autotune_key) for name, key, found in looked if found is None]
    assert not missing, f"keys the shipped files lack (fla autotuned them): {missing}"
