"""Ranks of a sharded model stay in step or fail at once (two gloo ranks, one spawn): a TPGroup must match its
process group, unseeded sampling draws the same tokens on every rank, and ranks given other prompts are refused.
Each step all-reduces the ranks' hidden states, so ranks feeding different tokens mixed two sequences with no error
(found by a review)."""
import pytest

from spawn_ranks import run_ranks
from tp_cases import agreement


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(agreement)


def test_a_group_that_misstates_its_rank_or_size_is_refused(ranks):
    for rank, got in enumerate(ranks):
        assert f"does not match its process group, where this process is rank {rank} of 2" in got["errors"]["rank"]
        assert "TPGroup(rank=" in got["errors"]["size"] and "size=3" in got["errors"]["size"]


def test_unseeded_sampling_draws_the_same_tokens_on_every_rank(ranks):
    assert ranks[0]["tokens"] == ranks[1]["tokens"]


def test_ranks_given_other_prompts_are_refused_on_every_rank(ranks):
    for got in ranks:
        assert "rank(s) [1] of the tensor-parallel group were given other prompts" in got["errors"]["prompts"]


def test_a_prompt_one_rank_would_refuse_fails_every_rank_at_the_agreement(ranks):
    for got in ranks:  # rank 1 alone would have raised its vocabulary error and left rank 0 waiting
        assert "rank(s) [1] of the tensor-parallel group were given other prompts" in got["errors"]["bad prompt"]


def test_greedy_calls_leave_the_global_generator_alike_on_every_rank(ranks):
    assert ranks[0]["greedy"] == ranks[1]["greedy"] and len(ranks[0]["greedy"]) == 2


def test_equal_settings_of_other_python_types_are_one_request(ranks):
    assert ranks[0]["typed"] == ranks[1]["typed"]
