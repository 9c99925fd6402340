"""--tp N: the processes torchrun starts, the group each joins, and `hattn generate --tp 2` end to end on CPU."""
import argparse
import math
import sys

import pytest

from hattn import cli
from hattn.bench import main as bench_main
from hattn.bench.cli import _check_tp, _options, add_arguments
from hattn.parallel import launch

TORCHRUN_VARS = ("LOCAL_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_without_torchrun_one_rank_is_the_process_itself(no_torchrun):
    tp, device = launch.init(1, "cpu")
    assert (tp.rank, tp.size, tp.group, device) == (0, 1, None, "cpu")


def test_without_torchrun_more_ranks_are_an_error(no_torchrun):
    with pytest.raises(ValueError, match="--tp 2 needs 2 processes: start them with torchrun --nproc-per-node 2"):
        launch.init(2, "cpu")


def test_torchrun_with_another_process_count_is_an_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="--tp 2 but torchrun started 4 processes; use --nproc-per-node 2"):
        launch.init(2, "cpu")


def test_relaunch_runs_the_same_command_under_torchrun(monkeypatch):
    calls = []
    monkeypatch.setattr(launch.subprocess, "call", lambda cmd: calls.append(cmd) or 3)
    assert launch.relaunch(2, ["generate", "--tp", "2"]) == 3
    assert calls == [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                      "-m", "hattn.cli", "generate", "--tp", "2"]]


def _tokens(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[")]


def test_generate_tp2_with_overlap_gives_the_tp1_tokens(capfd, no_torchrun):
    args = ["generate", "--preset", "tiny", "--mode", "none", "--device", "cpu", "--max-new-tokens", "5",
            "--prompt-ids", "1,2,3", "--prompt-ids", "4,5,6,7,8", "--prompt-ids", "9,10"]
    assert cli.main(args) == 0
    want = _tokens(capfd.readouterr().out)
    assert cli.main(args + ["--tp", "2", "--tbo"]) == 0  # two gloo processes under torchrun; rank 0 prints
    captured = capfd.readouterr()
    assert _tokens(captured.out) == want and len(want) == 3
    assert "on cpu and 1 more rank(s)" in captured.err


def _bench_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_bench_with_tp_runs_hattn_modes_only():
    args = _bench_args("--tp", "2")
    _check_tp(args)
    assert args.modes == ["full", "pcg", "bcg", "eager"]  # the default targets, peers left out


def test_bench_with_tp_refuses_peers(capsys):
    assert bench_main(["--tp", "2", "--tbo", "--modes", "pcg,hf-static"]) == 2
    assert "--tp and --tbo apply to hattn modes only; ['hf-static'] run one unsharded model" in capsys.readouterr().err


def test_bench_ranks_take_no_decision_from_their_own_clock():
    opts = _options(_bench_args("--tp", "2", "--quick"), cuda=False)
    assert (opts.max_s, opts.slow_s, opts.reps) == (math.inf, math.inf, 3)
    assert _options(_bench_args("--quick"), cuda=False).max_s == 0.2


def test_heads_that_do_not_divide_over_tp_are_named_before_torchrun_starts(monkeypatch, capsys, no_torchrun):
    """Each of the 4 ranks printed the error and torchrun its traceback, exit 1 (found by a review)."""
    monkeypatch.setattr(launch, "relaunch", lambda *a: pytest.fail("relaunched a command that cannot shard"))
    assert cli.main(["generate", "--preset", "tiny", "--tp", "4", "--prompt-ids", "1,2,3", "--device", "cpu"]) == 2
    assert "num_key_value_heads=2, linear_num_key_heads=2 do not divide over tp=4" in capsys.readouterr().err


def test_a_multimodal_checkpoints_config_is_checked_by_its_text_config(tmp_path):
    """A Qwen3.5 checkpoint's config is the multimodal one (a review found the check refusing it by its
    model_type): the heads checked are its text model's."""
    from transformers import Qwen3_5Config

    from hattn.models.presets import preset_config

    Qwen3_5Config(text_config=preset_config("tiny").to_dict()).save_pretrained(tmp_path)
    args = argparse.Namespace(preset=None, config=str(tmp_path), model=None, tp=2)
    cli._check_tp(args)  # divides: no error
    args.tp = 4
    with pytest.raises(ValueError, match="num_key_value_heads=2, linear_num_key_heads=2 do not divide over tp=4"):
        cli._check_tp(args)
