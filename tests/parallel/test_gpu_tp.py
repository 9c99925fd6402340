"""Tensor parallelism on two GPUs (NCCL, one spawned pair of ranks per graph mode), on the device machine with two
GPUs: `pytest -m gpu tests/parallel`. fp32 tiny families, TP=2 against TP=1: the same greedy tokens uncompiled and
with CUDA graphs (pcg, bcg, full), with and without two-batch overlap (two compiled instances, a sibling NCCL
communicator, two streams); the all-reduces sit inside the captured graphs and are counted there."""
import pytest
import torch

from spawn_ranks import run_ranks
from tp_cases import ALL_REDUCES, TINY_PRESETS, gpu_families

pytestmark = pytest.mark.gpu

GDN_PRESETS = ["tiny", "tiny-qwen3-next", "tiny-olmo-hybrid"]  # full + linear: both capture-safe, so `full` too
MODES = {"pcg": TINY_PRESETS, "bcg": GDN_PRESETS, "full": GDN_PRESETS}
TOL = 1e-3  # fp32; inductor's kernels differ from eager's in summation order


@pytest.fixture(scope="module", params=list(MODES))
def run(request):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (nvidia-h200-x2), this machine has {torch.cuda.device_count()}")
    mode = request.param
    return mode, run_ranks(gpu_families, MODES[mode], mode, backend="nccl")


def _cases(run):
    mode, ranks = run
    for preset, got in ranks[0].items():
        yield mode, preset, got, ranks[1][preset]


def test_tp2_tokens_and_logits_equal_tp1(run):
    for mode, preset, got, other in _cases(run):
        for variant in ("eager", "eager+tbo", mode, f"{mode}+tbo"):
            assert got[variant]["tokens"] == got["ref_tokens"], (mode, preset, variant)
            assert other[variant]["tokens"] == got["ref_tokens"], (mode, preset, variant, "rank 1")
            assert max(got[variant]["prefill_diff"], got[variant]["decode_diff"]) < TOL, (mode, preset, variant)


def test_all_reduces_are_captured_in_the_graphs(run):
    for mode, preset, got, _ in _cases(run):
        stats = got["graph_stats"]  # the plain compiled model, then the overlap's two instances
        assert len(stats) == 3 and all(s["cuda_graphs"] > 0 for s in stats), (mode, preset, stats)
        for s in stats:
            assert s["collectives"] == s["graphs_compiled"] * (ALL_REDUCES[preset] + 1), (mode, preset, s)


def test_cache_holds_local_heads_only(run):
    for _, preset, got, _ in _cases(run):
        assert got["cache_ratio"] == 0.5, preset
