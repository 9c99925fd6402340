"""Tensor parallelism on two gloo ranks (one spawn for the module): every tiny family sharded over 2 ranks gives
the TP=1 logits (fp32) and greedy tokens, in eager and pcg (graph-free on CPU), with and without two-batch overlap;
its cache holds half the heads; each row-parallel output costs one all-reduce, in the graph's pieces too."""
import pytest

from hattn.models.hf import FAMILIES, family_of
from hattn.models.presets import preset_config
from spawn_ranks import run_ranks
from tp_cases import ALL_REDUCES, TINY_PRESETS, all_families

VARIANTS = ("eager", "eager+tbo", "pcg", "pcg+tbo")  # pcg runs graph-free on CPU
TOL = 2e-5  # fp32 logits: only the order of the row-parallel sums differs from TP=1


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(all_families)


@pytest.fixture(scope="module")
def results(ranks):
    return ranks[0]


def test_every_family_has_a_tiny_preset():
    assert {family_of(preset_config(p)).name for p in TINY_PRESETS} == {f.name for f in FAMILIES.values()}
    assert set(ALL_REDUCES) == set(TINY_PRESETS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tp2_logits_equal_tp1(results, preset, variant):
    got = results[preset][variant]
    assert got["prefill_diff"] < TOL and got["decode_diff"] < TOL, got


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tp2_greedy_tokens_equal_tp1(ranks, preset, variant):
    assert ranks[0][preset][variant]["tokens"] == ranks[0][preset]["ref_tokens"]
    assert ranks[1][preset][variant]["tokens"] == ranks[0][preset]["ref_tokens"]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_cache_holds_local_heads_only(results, preset):
    assert results[preset]["cache_ratio"] == 0.5


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_one_all_reduce_per_row_parallel_output(results, preset):
    assert results[preset]["collectives"] == {"all_reduce": ALL_REDUCES[preset], "all_gather_into_tensor": 1}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_pcg_graph_holds_the_collectives_in_its_pieces(results, preset):
    (stats,) = results[preset]["graph_stats"]  # one compiled model: the overlap shares it on CPU
    config = preset_config(preset)
    mixers = len(family_of(config).layer_kinds(config))  # layers with a split op (4 in most tiny presets)
    # two graphs, no graph break at a collective: generate's prefill (logits of each prompt's last row), the rest
    assert (stats["graphs_compiled"], stats["split_ops"]) == (2, 2 * mixers)
    assert stats["collectives"] == 2 * (ALL_REDUCES[preset] + 1)  # + the LM head's all-gather, in each graph
