"""The `hattn` command: demo's table and exit code, generate's output, errors without tracebacks."""
import pytest
import torch

from hattn import cli


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_prints_a_row_per_mode_and_exits_0(capsys):
    argv = ["demo", "--modes", "eager,pcg", "--max-new-tokens", "6", "--device", "cpu", "--inner-compiler", "eager"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "hattn demo: preset tiny on cpu" in out
    for mode in ("eager", "pcg"):
        assert mode in out
    assert "equal to HF eager" in out and "ERROR" not in out


def test_demo_reports_a_failing_mode_in_its_row_and_exits_nonzero(capsys, monkeypatch):
    real = cli.compile_mode

    def broken(lm, mode, *args):
        if mode == "bcg":
            raise RuntimeError("capture went wrong")
        return real(lm, mode, *args)

    monkeypatch.setattr(cli, "compile_mode", broken)
    assert cli.main(["demo", "--modes", "eager,bcg", "--max-new-tokens", "4", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "capture went wrong" in out


def test_generate_prints_new_tokens_per_prompt(capsys):
    rc = cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2,3", "--prompt-ids",
                   "4,5", "--max-new-tokens", "5", "--device", "cpu"])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith("[0] [1, 2, 3] -> [") and lines[1].startswith("[1] [4, 5] -> [")
    assert len(lines[0].split("->")[1].split(",")) == 5
    assert "prefill" in captured.err and "tok/s" in captured.err


def test_generate_errors_are_one_line(capsys):
    rc = cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2,3", "--max-len", "4",
                   "--device", "cpu"])
    assert rc == 2
    assert "error: prompt 0 has 3 tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        cli.main(["generate", "--preset", "tiny", "--prompt-ids", "99999", "--device", "cpu"])


def test_subcommands_are_a_dict():
    assert {"demo", "generate"} <= set(cli.SUBCOMMANDS)
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_on_the_gpu_every_mode(capsys):
    assert cli.main(["demo"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "on cuda (bfloat16)" in out and "MISMATCH" not in out and "ERROR" not in out
