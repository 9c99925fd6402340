"""Sharding on one process: the primitives, the local config, and a tiny model sharded as rank 0 and as rank 1 of a
2-rank group (no collective runs: sharding is local), whose shares put back together are the full weights."""
import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hattn.models.hf import family_of
from hattn.models.presets import load, preset_config
from hattn.parallel import TPGroup, replica, shard
from hattn.parallel.layers import RowParallelLinear, ShardedRMSNorm, VocabParallelHead, shard_tensor
from hattn.parallel.plans import plan_of
from hattn.parallel.tp import local_config


def fake_group(rank: int, size: int = 2) -> TPGroup:
    """A TPGroup for sharding only (its collectives are never called here)."""
    return TPGroup(rank, size, group=object())


@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.sampled_from([1, 2, 4]), st.integers(0, 1))
def test_shard_tensor_ranks_put_back_together_are_every_part(blocks, size, dim):
    parts = [b * size for b in blocks]
    t = torch.randn(sum(parts), 3).movedim(0, dim)
    shares = [shard_tensor(t, dim, fake_group(r, size), parts) for r in range(size)]
    for i, part in enumerate(t.split(parts, dim)):
        rebuilt = torch.cat([s.split(blocks, dim)[i] for s in shares], dim)
        assert torch.equal(rebuilt, part)


def test_shard_tensor_refuses_a_part_that_does_not_divide():
    with pytest.raises(ValueError, match=r"size 6 along dim 0 does not split over tp=4 ranks; use a --tp that"):
        shard_tensor(torch.zeros(10, 2), 0, fake_group(0, 4), [4, 6], "in_proj")


def test_local_config_divides_head_counts_and_pins_head_dim():
    config = preset_config("tiny-olmo-hybrid")  # no head_dim: families derive hidden_size // num_attention_heads
    local = local_config(config, plan_of("olmo_hybrid").heads, 2)
    assert (local.num_attention_heads, local.num_key_value_heads, local.linear_num_key_heads,
            local.linear_num_value_heads, local.head_dim) == (2, 1, 1, 2, 16)
    assert config.num_attention_heads == 4 and getattr(config, "head_dim", None) is None  # the original is kept
    specs = family_of(config).cache_specs(local)
    assert specs[3].kv == (1, 16, 16) and specs[0].states[1][0] == (2, 16, 32)


def test_local_config_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match=r"qwen3_5_text: num_attention_heads=4, num_key_value_heads=2, "
                                         r"linear_num_key_heads=2, linear_num_value_heads=4 do not divide over tp=3"):
        local_config(preset_config("tiny"), plan_of("qwen3_5").heads, 3)


def test_a_family_without_a_plan_is_named():
    with pytest.raises(ValueError, match=r"family 'jamba' is not yet sharded for tensor parallelism"):
        plan_of("jamba")


@pytest.fixture(scope="module")
def tiny_pair():
    """The tiny Qwen3.5 model, and its shares as rank 0 and rank 1 of two."""
    full = load("tiny")
    return full, [shard(copy.deepcopy(full), fake_group(r), check_weights=False) for r in range(2)]


def _rebuilt(shares, get, dim=0, parts=None):
    tensors = [get(s) for s in shares]
    if parts is None:
        return torch.cat(tensors, dim)
    halves = [t.split([p // 2 for p in parts], dim) for t in tensors]
    return torch.cat([h for i in range(len(parts)) for h in (halves[0][i], halves[1][i])], dim)


def test_linear_attention_is_split_by_heads(tiny_pair):
    full, shares = tiny_pair
    gdn = full.hf.model.layers[0].linear_attn
    qkv = [gdn.key_dim, gdn.key_dim, gdn.value_dim]  # 32 | 32 | 64
    local = [s.hf.model.layers[0].linear_attn for s in shares]
    heads = [(m.num_k_heads, m.num_v_heads, m.key_dim, m.value_dim, m.conv_dim) for m in local]
    assert heads == [(1, 2, 16, 32, 64)] * 2
    assert torch.equal(_rebuilt(local, lambda m: m.in_proj_qkv.weight, 0, qkv), gdn.in_proj_qkv.weight)
    assert torch.equal(_rebuilt(local, lambda m: m.conv1d.weight, 0, qkv), gdn.conv1d.weight)
    for name in ("A_log", "dt_bias"):
        assert torch.equal(_rebuilt(local, lambda m: getattr(m, name)), getattr(gdn, name))
    assert torch.equal(_rebuilt(local, lambda m: m.in_proj_z.weight), gdn.in_proj_z.weight)
    assert torch.equal(_rebuilt(local, lambda m: m.out_proj.weight, 1), gdn.out_proj.weight)
    assert all(type(m.out_proj) is RowParallelLinear for m in local)


def test_attention_mlp_and_head_are_split(tiny_pair):
    full, shares = tiny_pair
    layer = full.hf.model.layers[3]
    local = [s.hf.model.layers[3] for s in shares]
    assert torch.equal(_rebuilt(local, lambda m: m.self_attn.q_proj.weight), layer.self_attn.q_proj.weight)
    assert torch.equal(_rebuilt(local, lambda m: m.self_attn.k_proj.weight), layer.self_attn.k_proj.weight)
    assert torch.equal(_rebuilt(local, lambda m: m.mlp.down_proj.weight, 1), layer.mlp.down_proj.weight)
    assert [type(m.self_attn.o_proj) for m in local] == [RowParallelLinear] * 2
    assert torch.equal(_rebuilt(shares, lambda s: s.hf.lm_head.weight), full.hf.lm_head.weight)
    assert [type(s.hf.lm_head) for s in shares] == [VocabParallelHead] * 2
    assert torch.equal(shares[1].hf.model.embed_tokens.weight, full.hf.model.embed_tokens.weight)  # stays whole


def test_sharded_cache_holds_local_heads(tiny_pair):
    full, shares = tiny_pair
    local = shares[0].make_cache(slots=2, max_len=8)
    assert local.state(3)[0].shape == (3, 8, 1, 16)  # 2 KV heads -> 1
    assert [t.shape for t in local.state(0)] == [(3, 64, 3), (3, 2, 16, 16)]  # conv channels, value heads halved
    assert local.nbytes() * 2 == full.make_cache(slots=2, max_len=8).nbytes()


def test_norms_over_every_head_are_sharded_norms():
    lm = shard(load("tiny-olmo-hybrid"), fake_group(1), check_weights=False)
    attn = lm.hf.model.layers[3].self_attn
    assert type(attn.q_norm) is ShardedRMSNorm and (attn.q_norm.full_size, attn.q_norm.weight.shape[0]) == (64, 32)


def test_replica_shares_weights_and_collectives_use_its_group(tiny_pair):
    _, shares = tiny_pair
    other = fake_group(0)
    twin = replica(shares[0], other)
    assert all(p is q for p, q in zip(twin.parameters(), shares[0].parameters()))
    assert twin.tp is other and twin.hf.model.layers[3].self_attn.o_proj.tp is other
    assert shares[0].hf.model.layers[3].self_attn.o_proj.tp is shares[0].tp


def test_sharding_twice_is_an_error(tiny_pair):
    with pytest.raises(ValueError, match="already sharded"):
        shard(tiny_pair[1][0], fake_group(0))


def test_a_group_of_one_leaves_the_model_as_it_is():
    lm = load("tiny")
    before = {n: p.shape for n, p in lm.named_parameters()}
    assert shard(lm, TPGroup.single()) is lm and {n: p.shape for n, p in lm.named_parameters()} == before


def test_cache_specs_must_keep_layers_and_kinds(tiny_pair):
    full, _ = tiny_pair
    specs = full.cache_specs()
    with pytest.raises(ValueError, match="new cache specs must keep every layer and its kind"):
        full.set_cache_specs({i: specs[3] for i in specs})


def test_a_group_needs_a_valid_rank_and_a_process_group():
    with pytest.raises(ValueError, match="0 <= rank < size"):
        TPGroup(2, 2, group=object())
    with pytest.raises(ValueError, match="a TPGroup of size 2 needs a process group"):
        TPGroup(0, 2)


def _adapted(preset: str, **changes):
    from hattn.models.hf import adapt
    from hattn.models.presets import random_model

    config = preset_config(preset)
    for name, value in changes.items():
        setattr(config, name, value)
    return adapt(random_model(config))


@pytest.mark.parametrize("preset, changes, match", [
    ("tiny", {"intermediate_size": 129}, r"layer 0's .*: intermediate size 129 \(intermediate_size\) does not divide "
                                         r"over tp=2"),
    ("tiny-qwen3-next", {"moe_intermediate_size": 36}, r"experts: intermediate size 36 \(moe_intermediate_size\) over "
                                                       r"tp=2 leaves 18 columns per rank, 72 bytes in torch.float32; "
                                                       r"the experts' grouped GEMM needs a multiple of 16 bytes"),
    ("tiny-qwen3-next", {"shared_expert_intermediate_size": 33}, r"shared_expert: intermediate size 33"),
])
def test_an_mlp_that_does_not_shard_is_refused_before_any_layer_changes(preset, changes, match):
    """Found by a review: the unaligned MoE failed at the first forward in torch's grouped_mm; an intermediate size
    that does not divide was named by its tensor only, after earlier layers were already sharded."""
    lm = _adapted(preset, **changes)
    before = {n: p.shape for n, p in lm.named_parameters()}
    with pytest.raises(ValueError, match=match):
        shard(lm, fake_group(0), check_weights=False)
    assert {n: p.shape for n, p in lm.named_parameters()} == before


def test_lfm2_moe_with_dense_layers_shards_its_dense_mlps():
    """LFM2-MoE's dense MLPs (its first num_dense_layers) have w1/w3/w2 and an intermediate_size attribute: the plan
    set that from an up_proj they do not have, after other layers were already sharded."""
    from transformers import Lfm2MoeConfig

    from hattn.models.hf import adapt
    from hattn.models.presets import random_model

    config = Lfm2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                           num_experts_per_tok=2, num_dense_layers=1, layer_types=["conv", "full_attention", "conv",
                                                                                   "conv"],
                           block_auto_adjust_ff_dim=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    lm = shard(adapt(random_model(config, seed=0)), fake_group(0), check_weights=False)
    dense = lm.hf.model.layers[0].feed_forward
    assert (dense.w1.out_features, dense.w3.out_features, dense.w2.in_features) == (64, 64, 64)


def test_a_granite_shared_mlp_that_does_not_shard_is_refused_before_any_layer_changes():
    """Every MLP block of a layer is checked (Granite: its MoE block and its shared MLP), before anything changes."""
    from hattn.models.hf import adapt
    from hattn.models.presets import random_model

    config = preset_config("tiny-granite-4.0-h")
    config.shared_intermediate_size = 31
    lm = adapt(random_model(config, seed=0))
    before = {n: p.shape for n, p in lm.named_parameters()}
    with pytest.raises(ValueError, match=r"GraniteMoeHybridMLP: intermediate size 31 \(shared_intermediate_size\) "
                                         r"does not divide over tp=2"):
        shard(lm, fake_group(0), check_weights=False)
    assert {n: p.shape for n, p in lm.named_parameters()} == before
