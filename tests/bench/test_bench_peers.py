"""The fla switch of the HF peers: which kernels transformers resolved, and swapping them for its torch code."""
import sys
import types

import pytest
import torch

from hattn.bench.peers import hub_kernels, make_peer, modeling_module, torch_kernels


@pytest.fixture
def fake_modeling(monkeypatch):
    """A modeling module whose `fast_op` transformers resolved to a fake package, and whose `slow_op` fell back."""
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    pkg = types.ModuleType("hattn_fake_fla")

    def kernel(x):
        return x + 100

    kernel.__module__, kernel.__name__ = "hattn_fake_fla", "fast_op"
    pkg.fast_op = kernel
    monkeypatch.setitem(sys.modules, "hattn_fake_fla", pkg)

    mod = types.ModuleType("hattn_fake_modeling")

    def fast_op(x):
        return x + 1

    def slow_op(x):
        return x + 2

    mod.fast_op = use_kernel_func_from_hub_with_fallback("fast_op", "hattn_fake_fla")(fast_op)
    mod.slow_op = use_kernel_func_from_hub_with_fallback("slow_op", "hattn_package_that_is_absent")(slow_op)
    mod.plain = lambda x: x
    return mod


def test_hub_kernels_reports_what_each_function_resolved_to(fake_modeling):
    assert hub_kernels(fake_modeling) == {"fast_op": "hattn_fake_fla.fast_op", "slow_op": "torch"}
    assert fake_modeling.fast_op(0) == 100


def test_torch_kernels_switches_fast_kernels_off_and_back(fake_modeling):
    fast = fake_modeling.fast_op
    with torch_kernels(fake_modeling) as switched:
        assert switched == ["fast_op"]
        assert fake_modeling.fast_op(0) == 1  # transformers' torch code
        assert fake_modeling.slow_op(0) == 2
    assert fake_modeling.fast_op is fast and fake_modeling.fast_op(0) == 100


def test_real_qwen3_5_module_lists_its_linear_attention_kernels(tiny_hf):
    kernels = hub_kernels(modeling_module(tiny_hf))
    assert {"causal_conv1d_fn", "causal_conv1d_update", "torch_chunk_gated_delta_rule",
            "torch_recurrent_gated_delta_rule"} <= set(kernels)


def test_unknown_peer_names_the_valid_ones():
    with pytest.raises(ValueError, match="hf-static"):
        make_peer("hf-fast", None)


@pytest.fixture(scope="module")
def tiny_hf():
    from hattn.models.presets import preset_config, random_model

    return random_model(preset_config("tiny"), torch.float32, "cpu")


def test_tc_peers_count_a_compile_for_each_graph_until_a_point_of_it_was_measured():
    """The first measured prefill pays torch.compile a graph, later prefill points (other token counts: dynamic)
    none; each decode batch is a static graph of its own. The estimate covers the goals' decode batches; the prefill
    graph runs only where the time box holds it."""
    from hattn.bench.workloads import Point

    peer = make_peer("tc-ro", None)
    p16, p64 = Point("prefill", tokens=16, seqs=1), Point("prefill", tokens=64, seqs=1)
    b1, b16 = Point("decode", batch=1, context=8), Point("decode", batch=16, context=8)
    assert peer.first_call_s(p16, cuda=True) == 400.0 and peer.first_call_s(b1, cuda=True) == 35.0
    assert peer.estimate(True) == 2 * 35.0
    peer.compiled(p16)
    assert peer.first_call_s(p64, cuda=True) == 0.0
    assert peer.first_call_s(Point("prefill", tokens=64, seqs=2), cuda=True) == 400.0  # another batch of prompts
    peer.compiled(b1)
    assert peer.first_call_s(b16, cuda=True) == 35.0 and peer.first_call_s(b1, cuda=True) == 0.0
