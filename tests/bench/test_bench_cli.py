"""`hattn bench --quick` end to end on the tiny preset (CPU), the kernels suite, arguments, and the GPU runs
(pytest -m gpu)."""
import argparse
import dataclasses
import json
import os
import signal
import threading
import time

import pytest
import torch

from hattn.bench import main
from hattn.bench.harness import Clock
from hattn.bench.peers import TorchCompile
from hattn.bench.runner import Options, run_target
from hattn.bench.target import Setup
from hattn.bench.workloads import Plan, Point
from hattn.counters import Stats

CPU_MODES = "eager,full,hf-eager,hf-static"
CPU_ARGS = ["--preset", "tiny", "--quick", "--inner-compiler", "eager", "--no-progress", "--device", "cpu",
            "--tokens", "16", "--batches", "1", "--slow-s", "1000"]  # a loaded CI host must not skip sizes


def _load(out) -> dict:
    return json.loads(open(os.path.join(out, "bench.json")).read())


def test_quick_model_run_on_cpu_measures_every_row(tmp_path):
    out = str(tmp_path / "bench")
    assert main(CPU_ARGS + ["--out", out, "--modes", CPU_MODES, "--budget", "900"]) == 0
    r = _load(out)
    assert r["partial"] is False and r["partial_reasons"] == []
    assert list(r["entries"]) == CPU_MODES.split(",") and r["goals"] is None
    ids = [p["id"] for p in r["points"]]
    assert ids == ["decode/B1/C64", "decode/B1/C20", "prefill/T16/x1", "prefill/T16/x2", "e2e/B1/P16/N8",
                   "e2e/B1/P16/N1", "per_token/B1/P16/N8"]  # C20: the generate steps' mean context
    skips = {("hf-static", pid): "hf-static is measured end to end (generate); its per-token figure is in the "
             "per-token row" for pid in ids[:4]}
    skips.update({("hf-eager", pid): "hf-eager generates a token per eager decode step (see the decode rows): not "
                  "run, to keep the run's budget" for pid in ids[4:6]})
    skips[("hf-eager", ids[6])] = "needs both generate rows: " + skips[("hf-eager", ids[4])]
    for name, e in r["entries"].items():
        assert e["status"] == "ok", (name, e["reason"])
        for pid in ids:
            got = e["results"][pid]
            if pid.startswith("per_token") and "error" in got:  # a loaded CI host: two timings, differenced
                assert got["error"].startswith("not measurable: e2e/B1/P16/N8"), (name, got)
                continue
            assert got == {"skipped": skips[name, pid]} if (name, pid) in skips else got["ms"] > 0, (name, pid, got)
    rows = {p["id"]: p for p in r["points"]}
    assert rows["decode/B1/C64"]["floor_bound"] == "memory" and rows["prefill/T16/x1"]["flops"] > 0
    assert r["meta"]["decode_weight_bytes"] < r["meta"]["weight_bytes"]
    assert set(r["entries"]["full"]["startup"]) == {"first_call_s", *Stats().startup(), "other_s"}
    assert r["ratios"]["vs_base"]["eager"]["decode/B1/C64"] == 1.0
    text = open(os.path.join(out, "bench.txt")).read()
    assert "goals: not evaluated, they mean nothing on a CPU" in text and "goals (issues" not in text


def test_quick_kernels_run_on_cpu(tmp_path):
    out = str(tmp_path / "kernels")
    assert main(["--suite", "kernels", "--quick", "--no-progress", "--device", "cpu", "--out", out, "--modes",
                 "ours,torch,copy", "--workloads", "gdn-decode,attn-decode", "--budget", "300",
                 "--slow-s", "1000"]) == 0
    r = _load(out)
    assert list(r["entries"]) == ["ours", "torch", "copy"] and r["meta"]["base"] == "ours"
    assert [p["id"] for p in r["points"]] == ["gdn-decode/1B/B1", "gdn-decode/1B/B4", "attn-decode/B1/C64",
                                              "attn-decode/B4/C64"]
    ours, torch_, copy = (r["entries"][n]["results"] for n in ("ours", "torch", "copy"))
    assert all(v == {"skipped": "our Triton kernels need a CUDA device with triton installed"} for v in ours.values())
    assert all(v["ms"] > 0 and v["calls"] == 1 for v in torch_.values())
    assert copy["attn-decode/B1/C64"] == {"skipped": "attn-decode has no 'copy' implementation"}
    assert r["ratios"]["vs_floor"]["copy"]["gdn-decode/1B/B4"] > 0


def test_gemm_workload_times_cublas_at_decode_rows_and_counts_the_weight_bytes(tmp_path):
    out = str(tmp_path / "gemm")
    assert main(["--suite", "kernels", "--quick", "--no-progress", "--device", "cpu", "--out", out, "--modes",
                 "ours,torch", "--workloads", "gemm", "--budget", "300", "--slow-s", "1000"]) == 0
    r = _load(out)
    weight, row = 1024 * 3584 * 2, (3584 + 1024) * 2  # bf16: the weight once, each of M rows' x and y
    assert [(p["id"], p["bytes"]) for p in r["points"]] == [("gemm/mlp-down/B1", weight + row),
                                                             ("gemm/mlp-down/B4", weight + 4 * row)]
    ours, torch_ = (r["entries"][n]["results"] for n in ("ours", "torch"))
    assert all(v == {"skipped": "our Triton kernels need a CUDA device with triton installed"} for v in ours.values())
    assert all(v["ms"] > 0 and v["calls"] == 1 for v in torch_.values())


def test_torch_compile_peer_runs_the_goal_rows_only():
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"), torch.float32, "cpu")
    setup = Setup.build(hf, plan=Plan.quick(), capture_sizes=[1], peer_backend="eager", progress=False)
    target = TorchCompile(setup, "reduce-overhead")
    points = [Point("decode", batch=1, context=64), Point("decode", batch=4, context=64),
              Point("decode", batch=1, context=20), Point("prefill", tokens=4096, seqs=1),
              Point("e2e", batch=1, prompt=16, new_tokens=2)]
    e = run_target(target, points, Clock("cpu"), Options(reps=2, max_s=0.05, progress=False), 60.0)
    target.close()
    assert e["status"] == "ok", e["reason"]
    assert e["results"]["decode/B1/C64"]["ms"] > 0
    assert e["results"]["decode/B4/C64"] == {"skipped": "tc-ro runs decode at the goals' batches (1, 16) only (a new "
                                                        "batch recompiles)"}
    assert e["results"]["decode/B1/C20"] == {"skipped": "tc-ro runs decode at the goals' context 64 only (another "
                                                        "static cache recompiles)"}
    assert e["results"]["prefill/T4096/x1"] == {"skipped": "tc-ro runs prefill up to the goals' 2048 tokens only"}
    assert e["results"]["e2e/B1/P16/N2"] == {"skipped": "generate with torch.compile is the hf-static peer "
                                                        "(transformers compiles the decode step)"}
    assert e["notes"] == ["compiled with backend='eager' (mode 'reduce-overhead' not applied)"]


def test_a_modes_prefill_decode_and_generate_rows_share_one_cache_and_its_graphs(monkeypatch):
    """One cache for every hattn row a graph can serve: full mode's graphs bind to their cache and prefill's logits
    rows are one per slot, so another cache (or slot count) would recapture or recompile (~15 s a mode on the H200).
    A prompt past the largest capture size goes in steps of that size over the same cache when the cache can hold
    it for every slot within an eighth of the device's memory; else over a cache of its own."""
    from torch._dynamo.utils import counters

    from hattn.bench.modes import HattnMode
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"), torch.float32, "cpu")
    plan = dataclasses.replace(Plan.quick(), tokens=[16, 64, 128])  # 128: past the largest capture size
    setup = Setup.build(hf, plan=plan, capture_sizes=[1, 2, 4, 8, 16, 32, 64], inner_compiler="eager",
                        progress=False)
    target = HattnMode(setup, "pcg")
    assert "prompts past 64 tokens prefill in steps of that many" in target.about  # the report says so
    target.prepare()
    caches = []
    for point in [Point("decode", batch=1, context=plan.context), Point("decode", batch=4, context=plan.context),
                  Point("prefill", tokens=16, seqs=2)]:
        target.step(point)()
        caches.append(setup.cache())
    graphs = counters["stats"]["unique_graphs"]
    for batch in (1, 4):  # generate: a prefill of 1 or 4 packed prompts, then decode steps
        target.step(Point("e2e", batch=batch, prompt=plan.prompt, new_tokens=4))()
    target.step(Point("prefill", tokens=128, seqs=1))()  # past the largest capture size (64): two steps of 64
    assert counters["stats"]["unique_graphs"] == graphs  # generate's steps and the long prompt's reused the graphs
    assert all(c is caches[0] for c in caches) and caches[0].slots >= max(plan.seqs, plan.max_batch)
    assert caches[0].max_len >= max(plan.context + 1, plan.prompt + plan.new_tokens, 128)
    assert setup.cache(128) is caches[0]
    assert _steps(monkeypatch, target, Point("prefill", tokens=128, seqs=1)) == [([64], caches[0], caches[0].slots)] * 2
    target.close()

    torch._dynamo.reset()
    monkeypatch.undo()
    monkeypatch.setattr(Setup, "_memory", lambda self: 0)  # no room for every slot at 128 tokens
    small = Setup.build(hf, plan=plan, capture_sizes=[1, 2, 4, 8, 16, 32, 64], inner_compiler="eager",
                        progress=False)
    target = HattnMode(small, "pcg")
    target.prepare()
    target.step(Point("prefill", tokens=16, seqs=2))()
    graphs = counters["stats"]["unique_graphs"]
    target.step(Point("prefill", tokens=128, seqs=1))()  # one graph-free step on a cache of its own, same graph
    assert counters["stats"]["unique_graphs"] == graphs
    shared, long = small.cache(), small.cache(128)
    assert shared.max_len < 128 and long is not shared and long.max_len >= 128 and long.slots == max(1, plan.seqs)
    assert _steps(monkeypatch, target, Point("prefill", tokens=128, seqs=1)) == [([128], long, shared.slots)]
    target.close()


def _steps(monkeypatch, target, point):
    """(seq_lens, cache, logits rows) of each step a point's call runs."""
    from hattn.bench.modes import HattnMode

    steps = []
    monkeypatch.setattr(HattnMode, "_step", lambda self, ctx, ids, pos, rows: steps.append(
        (ctx().seq_lens, ctx().cache, len(rows))) or (lambda: None))
    target.step(point)
    return steps


def test_a_modes_rows_build_a_forward_context_per_step_as_generate_does(monkeypatch):
    import importlib

    from hattn.bench.modes import HattnMode
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"), torch.float32, "cpu")
    setup = Setup.build(hf, plan=Plan.quick(), capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False)
    target = HattnMode(setup, "eager")
    target.prepare()
    gen = importlib.import_module("hattn.models.generate")  # the package exports a function of the same name
    seen, run_step = [], gen.run_step
    monkeypatch.setattr(gen, "run_step", lambda model, ctx, *a: (seen.append(ctx), run_step(model, ctx, *a))[1])
    for point in (Point("decode", batch=2, context=8), Point("prefill", tokens=8, seqs=2)):
        step = target.step(point)
        step(), step()
    target.close()
    assert len(seen) == 4 and len({id(c) for c in seen}) == 4  # memoized metadata is never carried to a next step


def test_a_points_counts_say_how_its_calls_were_served():
    from hattn.bench.modes import HattnMode
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"), torch.float32, "cpu")
    setup = Setup.build(hf, plan=Plan.quick(), capture_sizes=[1, 2, 4], inner_compiler="eager", progress=False)
    opts = Options(reps=3, progress=False)
    target = HattnMode(setup, "pcg")
    entry = run_target(target, [Point("decode", batch=2, context=8)], Clock("cpu"), opts, 60.0)
    counts = entry["results"]["decode/B2/C8"]["counts"]
    assert counts["point_calls"] >= 1 + 3  # the first call and the timed ones (and the warm-up)
    assert counts["step_calls"] == counts["point_calls"]  # a decode point: one model call a call
    assert counts["direct_calls"] == counts["step_calls"] - 1  # Dynamo served the first call only
    assert counts["eager_runs"] == counts["step_calls"] and counts["stitched_steps"] == 0  # on a CPU: graph-free
    target.close()  # what the runner does after a target: nothing of it stays alive for the next one
    assert target.model is None and target.backends == [] and target.step_counts() == {}


def test_bad_arguments_name_the_valid_ones(capsys):
    assert main(["--modes", "pcg,fast"]) == 2
    assert "unknown target 'fast' for --suite model" in capsys.readouterr().err
    assert main(["--suite", "kernels", "--workloads", "gemv"]) == 2
    assert ("unknown workloads ['gemv'] for --suite kernels; valid: gdn-decode, gdn-prefill, attn-decode, gemm"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["--suite", "train"])
    assert main(["--modes", ","]) == 2
    assert "--modes ',' names no target" in capsys.readouterr().err
    assert main(["--device", "foo"]) == 2
    assert "--device 'foo': expected cpu or cuda" in capsys.readouterr().err
    assert main(["--config", "/nonexistent/config.json"]) == 2  # before: measured, then "setup failed"
    assert "--config '/nonexistent/config.json' does not exist" in capsys.readouterr().err
    assert main(["--suite", "kernels", "--preset", "qwen3.5-27b", "--batches", "7", "--device", "cpu"]) == 2
    assert "--preset, --batches apply to the model and runtime suites, not to --suite kernels" in \
        capsys.readouterr().err
    assert main(["--suite", "kernels", "--packed-tokens", "64", "--device", "cpu"]) == 2
    assert "error: --packed-tokens apply to the model and runtime suites" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batches", "0"], "expected comma-separated positive integers, got '0'"),
    (["--tokens", "16,-1"], "expected comma-separated positive integers"),
    (["--reps", "-1"], "expected a positive integer, got '-1'"),
    (["--seqs", "0"], "expected a positive integer, got '0'"),
    (["--budget", "0"], "expected a finite number of seconds > 0, got '0'"),
    (["--budget", "inf"], "expected a finite number of seconds > 0, got 'inf'"),
    (["--max-s", "-1"], "expected a finite number of seconds > 0"),
    (["--warmup-s", "nan"], "expected a finite number of seconds >= 0"),
])
def test_bad_sizes_and_seconds_are_argument_errors(argv, message, capsys):
    """Zero, negative or infinite sizes and seconds ran before (zero replaced by a default, a FAIL row per size,
    a traceback for --budget inf): argparse refuses them, naming the argument."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_refused_run_leaves_no_out_directory_and_an_unknown_family_is_refused_before_building(tmp_path, capsys,
                                                                                               monkeypatch):
    from hattn.models import presets

    out = tmp_path / "new"
    assert main(["--config", str(tmp_path / "missing.json"), "--out", str(out), "--device", "cpu"]) == 2
    assert not out.exists()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    monkeypatch.setattr(presets, "random_model", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["--config", str(tmp_path / "llama"), "--out", str(out), "--device", "cpu", "--quick"]) == 2
    assert "hattn has no adapter for model_type 'llama'" in capsys.readouterr().err


def test_an_out_path_the_report_cannot_go_to_is_refused_before_measuring(tmp_path, capsys):
    """Before, the run measured, then died in os.makedirs with a traceback and no report."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for out in (a_file, a_file / "sub"):
        start = time.perf_counter()
        assert main(["--suite", "kernels", "--device", "cpu", "--quick", "--out", str(out)]) == 2
        assert time.perf_counter() - start < 5
        assert f"--out '{out}': the report cannot be written there" in capsys.readouterr().err


def test_sizes_are_deduplicated():
    from hattn.bench.cli import _ints

    assert _ints("16,1,16") == [1, 16]


def test_add_parser_builds_the_hattn_subcommand():
    from hattn.bench import add_parser
    from hattn.bench.cli import run_cli

    parser = argparse.ArgumentParser(prog="hattn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--suite", "runtime", "--modes", "pcg,full"])
    assert args.func is run_cli and args.suite == "runtime" and args.modes == "pcg,full" and args.quick


def test_sigterm_mid_run_still_writes_the_report(tmp_path):
    """SIGTERM (as `timeout` sends it) ends the run at once; the report says where and keeps what was measured."""
    out = str(tmp_path / "stopped")
    timer = threading.Timer(6.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    start = time.perf_counter()
    try:
        rc = main(CPU_ARGS + ["--out", out, "--modes", "hf-eager,eager", "--budget", "300", "--reps", "10000",
                              "--max-s", "300"])
    finally:
        timer.cancel()
    assert time.perf_counter() - start < 30
    assert rc == 128 + signal.SIGTERM  # a script tells a stopped run from a finished one (it was 0)
    r = _load(out)
    assert r["partial"] is True and len(r["partial_reasons"]) == 1
    assert r["partial_reasons"][0].startswith("stopped: SIGTERM during ")
    stopped = "not run: the run was stopped: SIGTERM"
    for e in r["entries"].values():
        for pid, v in e["results"].items():
            assert v == {"skipped": ("needs both generate rows: " if pid.startswith("per_token") else "") + stopped}
    assert "PARTIAL: stopped: SIGTERM during " in open(os.path.join(out, "bench.txt")).read()


@pytest.mark.gpu
def test_quick_run_on_gpu_captures_graphs(tmp_path):
    """The CUDA paths (events, copy bandwidth, matmul peak, graph stats, peak memory, device-time profile, goals),
    kept cheap: eager pieces (no inductor compile), decode and generate only."""
    out = str(tmp_path / "bench")
    rc = main(["--preset", "tiny", "--quick", "--out", out, "--modes", "pcg,full,hf-eager", "--no-progress",
               "--workloads", "decode,e2e", "--inner-compiler", "eager", "--profile",
               "--budget", "300"])  # the quick 120 s: pcg's time box ran out under the GPU suite's 10 workers
    assert rc == 0
    r = _load(out)
    assert r["meta"]["copy_bandwidth"] > 1e11 and r["meta"]["matmul_flops"] > 1e13 and len(r["goals"]) == 23
    for mode in ("pcg", "full"):
        e = r["entries"][mode]
        assert e["status"] == "ok", e["reason"]
        assert e["cuda_graphs"] > 0 and e["capture_s"] > 0 and e["pool_bytes"] > 0 and e["peak_bytes"] > 0
        assert e["results"]["decode/B1/C64"]["ms"] > 0 and e["startup"]["capture_seconds"] > 0
        prof = e["profile"]["decode/B1/C64"]
        assert prof["time"] == "device" and prof["top"], prof
    assert r["entries"]["hf-eager"]["results"]["decode/B1/C64"]["ms"] > 0


@pytest.mark.gpu
def test_quick_kernels_run_on_gpu(tmp_path):
    """Every kernel implementation on the GPU (fla's where installed), decode workloads inside CUDA graphs."""
    out = str(tmp_path / "kernels")
    assert main(["--suite", "kernels", "--quick", "--no-progress", "--out", out, "--budget", "240"]) == 0
    r = _load(out)
    measured = set()
    for pid, res in r["entries"]["ours"]["results"].items():
        if "skipped" in res:  # only the bench's own cut-offs: a slow size skips larger ones, a spent time box the rest
            assert "project to" in res["skipped"] or "time box" in res["skipped"], (pid, res)
            continue
        assert res["ms"] > 0 and r["ratios"]["vs_floor"]["ours"][pid] > 0, (pid, res)
        measured.add(pid.split("/")[0])
    assert measured == {"gdn-decode", "gdn-prefill", "attn-decode", "gemm"}
    assert r["entries"]["copy"]["results"]["gdn-decode/1B/B1"]["calls"] == 64


def test_model_suite_default_targets_are_what_the_goals_compare():
    """The default model run is the goals group (full, pcg, bcg, tc-ro, hf-static, then eager, the speedups' base:
    the other peers' compiles would push tc-ro and hf-static out of the 10-minute run); `all` names every target."""
    import argparse

    from hattn.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = cli._resolve(parser.parse_args(["--preset", "tiny"]))
    assert args.modes == ["full", "pcg", "bcg", "tc-ro", "hf-static", "eager"]
    assert cli.BUDGET_S["model"] <= 540
    assert set(cli._targets_of("model", "all")) >= set(args.modes) | {"hf-eager", "tc-default", "hf-eager-fla"}


def test_a_setup_failure_still_writes_a_report_without_goals(tmp_path, monkeypatch):
    """An error while the model suite sets up (out of memory building the model, say) ends the run with a report
    that says so (partial, no target measured, exit 1); goals of a GPU result without a plan (a stop during setup)
    are 'not evaluated', not a KeyError that loses the report."""
    from hattn.bench import cli
    from hattn.bench.data import build

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(cli, "_model_suite", broken)
    out = str(tmp_path / "b")
    assert main(["--preset", "tiny", "--quick", "--no-progress", "--device", "cpu", "--out", out]) == 1
    result = json.load(open(os.path.join(out, "bench.json")))
    assert result["partial"] and "setup failed" in result["partial_reasons"][0] and "out of memory" in \
        result["partial_reasons"][0]
    meta = {"suite": "model", "env": {"device": "cuda:0"}, "base": "eager"}
    result = build(meta, [], {}, ["stopped during setup"])
    assert result["goals"] is None and "setup" in result["goals_note"]


def test_two_batch_overlap_doubles_a_modes_compile_estimate():
    """With --tbo each micro-batch compiles on its own: the estimate the budget checks is twice the plain one (it
    was a tuple repeated, so estimate() still read the plain GPU figure)."""
    from types import SimpleNamespace

    from hattn.bench.modes import HattnMode

    plain, tbo = (HattnMode(SimpleNamespace(inner_compiler="inductor", tbo=t, capture_sizes=[8]), "full")
                  for t in (False, True))
    for cuda in (True, False):
        assert tbo.estimate(cuda) == 2 * plain.estimate(cuda)
