"""The `hattn` command: demo's table and exit code, generate's output, errors without tracebacks."""
import logging
import re

import pytest
import torch

from hattn import cli


pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_prints_a_row_per_mode_and_exits_0(capsys):
    argv = ["demo", "--modes", "eager,pcg", "--max-new-tokens", "6", "--device", "cpu", "--inner-compiler", "eager"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "hattn demo: preset tiny on cpu" in out
    for mode in ("eager", "pcg"):
        assert mode in out
    assert "equal to HF eager" in out and "ERROR" not in out
    # a line per mode before and after its compile, on stderr (among transformers' and hattn's log lines)
    progress = [line for line in captured.err.splitlines() if re.match(r"\[\d/\d\] |tiny on cpu", line)]
    assert progress[0] == "tiny on cpu: transformers' own generate, the reference ..."
    assert progress[1] == "[1/2] eager: compiling, capturing graphs and generating twice ..."
    assert progress[2].startswith("[1/2] eager: ok (first run, compile and capture included: ")
    assert progress[3] == "[2/2] pcg: compiling, capturing graphs and generating twice ..."


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
    assert "mode none on cpu: first call (compile + capture + generate) " in captured.err
    assert "s; timed call: prefill" in captured.err and "tok/s" in captured.err


def test_generate_without_warmup_says_its_times_include_compiling(capsys):
    assert cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2", "--max-new-tokens",
                     "2", "--device", "cpu", "--warmup", "0"]) == 0
    assert "no warm-up (--warmup 0): these times include compiling and capturing: prefill" in capsys.readouterr().err


def test_generate_timing_prints_where_the_start_went_and_hattns_log_of_it(capsys, caplog):
    logger = logging.getLogger("hattn")
    try:
        assert cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2", "--max-new-tokens",
                         "2", "--device", "cpu", "--timing"]) == 0
    finally:
        logger.setLevel(logging.NOTSET)  # --timing turned it to INFO for the process
    err = capsys.readouterr().err
    assert "process start to first token" in err and "model built and adapted" in err
    assert re.search(r"hattn: model: cpu ready [\d.]+ s, config [\d.]+ s .*built [\d.]+ s, adapted", caplog.text)


def test_generate_errors_are_one_line(capsys):
    rc = cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2,3", "--max-len", "4",
                   "--device", "cpu"])
    assert rc == 2
    assert "error: prompt 0 has 3 tokens" in capsys.readouterr().err
    assert cli.main(["generate", "--preset", "tiny", "--prompt-ids", "99999", "--device", "cpu"]) == 2
    assert "hattn generate: error: token ids [99999] are outside the vocabulary" in capsys.readouterr().err
    assert cli.main(["generate", "--preset", "tiny", "--prompt", "hi", "--device", "cpu"]) == 2
    assert "error: --prompt needs --model PATH with a tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["generate", "--preset", "tiny", "--prompt-ids", "1,,3"],
     "argument --prompt-ids: expected comma-separated integers such as 1,2,3, got '1,,3'"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1,x"], "expected comma-separated integers such as 1,2,3"),
    (["generate", "--preset", "tiny-llama", "--prompt-ids", "1"], "argument --preset: invalid choice: 'tiny-llama'"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1", "--max-len", "0"],
     "argument --max-len: expected an integer >= 1, got '0'"),
    (["generate", "--preset", "tiny", "--prompt-ids", "1", "--warmup", "-1"],
     "argument --warmup: expected an integer >= 0, got '-1'"),
    (["demo", "--modes", "pcg,bogus"], "argument --modes: unknown mode(s) 'bogus'; valid modes: eager, pcg, bcg, full"),
    (["demo", "--modes", ","], "argument --modes: unknown mode(s) ','"),
    (["demo", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, got '0'"),
])
def test_malformed_arguments_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--stop-ids", "-5"], "stop_tokens must be a token id or a list of them"),
                                            (["--temperature", "nan"], "temperature must be a finite number"),
                                            (["--max-new-tokens", "0"], "max_new_tokens must be an int >= 1")])
def test_sampling_settings_out_of_range_are_one_line_errors(flags, message, capsys):
    assert cli.main(["generate", "--preset", "tiny", "--mode", "none", "--prompt-ids", "1,2", "--device", "cpu",
                     *flags]) == 2  # bad input's exit code, as argparse's (it was 1)
    assert f"hattn generate: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--preset", "tiny", "--prompt-ids", "1"], ["demo"]])
def test_a_device_that_is_not_cpu_or_cuda_is_a_one_line_error(capsys, command):
    """Before, a traceback from deep in torch ("Expected one of cpu, cuda, ... device type")."""
    assert cli.main(command + ["--device", "gpu"]) == 2
    assert f"hattn {command[0]}: error: --device 'gpu': expected cpu or cuda" in capsys.readouterr().err


def test_a_cuda_index_past_the_devices_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cli.check_device("cuda:0")
    with pytest.raises(ValueError, match=r"--device cuda:7: this machine has 1 CUDA device\(s\), cuda:0 to cuda:0"):
        cli.check_device("cuda:7")


@pytest.mark.parametrize("files, message", [
    ({"config.json": '{"model_type": "llama"}'}, "hattn has no adapter for model_type 'llama'"),  # before: a 7B built
    ({"config.json": "{not json"}, "cannot be read as a transformers config"),
])
def test_a_config_hattn_cannot_serve_is_named_before_the_model_is_built(tmp_path, capsys, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert cli.main(["generate", "--config", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_a_model_folder_without_weights_or_too_big_for_the_device_is_named(tmp_path, capsys, monkeypatch):
    from hattn.models import cache
    from hattn.models.presets import preset_config

    preset_config("tiny").save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "cannot be loaded as a transformers model" in capsys.readouterr().err
    monkeypatch.setattr(cache, "memory_room", lambda device: (2**10, "in all"))  # 1 KiB: less than tiny's weights
    assert cli.main(["generate", "--config", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "GiB of weights (torch.float32), more than the 0.0 GiB cpu has in all" in capsys.readouterr().err


def test_a_model_folder_is_checked_before_its_weights_are_read(tmp_path, capsys, monkeypatch):
    """A saved model of a family hattn cannot adapt, or too big for the device, is refused from its config.json;
    before, every weight was read (onto the host first) and only then refused."""
    import transformers

    from hattn.models import cache
    from hattn.models.presets import preset_config, random_model

    random_model(preset_config("tiny")).save_pretrained(tmp_path)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the weights were read"))
    monkeypatch.setattr(cache, "memory_room", lambda device: (2**10, "in all"))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "more than the 0.0 GiB cpu has in all" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt-ids", "1", "--device", "cpu"]) == 2
    assert "hattn has no adapter for model_type 'llama'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [(["--prompt-ids", "99999"], "token ids [99999] are outside"),
                                            (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be"),
                                            (["--prompt-ids", "1", "--device", "gpu"], "--device 'gpu'")])
def test_tensor_parallel_input_errors_are_named_before_starting_the_ranks(flags, message, capsys, monkeypatch):
    from hattn.parallel import launch

    monkeypatch.setattr(launch, "relaunch", lambda *a: pytest.fail("the ranks were started"))
    assert cli.main(["generate", "--preset", "tiny", "--tp", "2", *flags]) == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_hattn_runs_the_cli():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "hattn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("hattn ")


def test_a_model_folder_without_a_tokenizer_is_named(tmp_path, capsys):
    """transformers 5 builds an empty tokenizer from the config alone: "hi" became no tokens, and the error said the
    prompt was empty."""
    from hattn.models.presets import preset_config, random_model

    random_model(preset_config("tiny")).save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--mode", "none", "--device", "cpu"]) == 2
    assert "has no usable tokenizer" in capsys.readouterr().err


def test_generate_stops_at_the_generation_configs_eos_as_transformers_does(tmp_path, capsys):
    """A saved model whose end-of-turn id is only in its generation config (a chat model's): hattn generate stops
    there, as transformers' generate does."""
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"))
    argv = ["generate", "--model", str(tmp_path), "--mode", "none", "--prompt-ids", "1,2,3", "--max-new-tokens", "8",
            "--device", "cpu", "--warmup", "0"]
    hf.save_pretrained(tmp_path)
    assert cli.main(argv) == 0
    free = eval(capsys.readouterr().out.split("->")[1])  # noqa: S307  (the printed token list)
    hf.generation_config.eos_token_id = free[1]
    hf.config.eos_token_id = None
    hf.save_pretrained(tmp_path)
    assert cli.main(argv) == 0
    assert eval(capsys.readouterr().out.split("->")[1]) == free[:2]  # noqa: S307


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("command", [["generate", "--preset", "tiny", "--prompt-ids", "1"], ["demo"]])
def test_device_cuda_without_cuda_is_a_one_line_error(capsys, command):
    assert cli.main(command + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"hattn {command[0]}: error: --device cuda: this torch {torch.__version__} " in err
    assert "use --device cpu" in err and "Traceback" not in err


def test_version_and_help_list_modes_and_presets(capsys):
    import hattn

    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == f"hattn {hattn.__version__} (torch {torch.__version__})\n"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "modes:   eager, pcg, bcg, full" in out and "tiny-nemotron-h" in out and "hattn.compile" in out
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "one of: tiny, qwen3.5-1b, qwen3.5-27b, tiny-qwen3-next" in " ".join(capsys.readouterr().out.split())


def test_subcommands_are_a_dict():
    assert {"demo", "generate"} <= set(cli.SUBCOMMANDS)
    with pytest.raises(SystemExit):
        cli.main([])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_on_the_gpu_every_mode(capsys):
    code = cli.main(["demo"])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err  # a failing mode's traceback is on stderr
    out = captured.out
    assert "on cuda (bfloat16)" in out and "MISMATCH" not in out and "ERROR" not in out
