"""`hattn bench --quick` end to end on the tiny preset (CPU), arguments, and the GPU smoke run (pytest -m gpu)."""
import argparse
import json
import os
import time

import pytest
import torch

from hattn.bench import main
from hattn.bench.cli import _names
from hattn.bench.harness import Clock
from hattn.bench.peers import TorchCompile
from hattn.bench.runner import Options, run_target
from hattn.bench.target import Setup
from hattn.bench.workloads import Plan, Point

CPU_MODES = "eager,pcg,full,hf-eager,hf-static"


def _load(out) -> dict:
    return json.loads(open(os.path.join(out, "bench.json")).read())


def test_quick_run_on_cpu_writes_every_field(tmp_path):
    out = str(tmp_path / "bench")
    rc = main(["--preset", "tiny", "--quick", "--out", out, "--modes", CPU_MODES, "--inner-compiler", "eager",
               "--no-progress", "--budget", "300", "--device", "cpu"])
    assert rc == 0
    r = _load(out)
    assert list(r["entries"]) == CPU_MODES.split(",")
    meta = r["meta"]
    assert meta["env"]["torch"] == torch.__version__ and meta["floor_ms"] > 0 and meta["weight_bytes"] > 0
    ids = [p["id"] for p in r["points"]]
    assert ids[0] == "decode/B1/C64" and ids[-1] == "e2e/B1/P16/per_token"
    for name, e in r["entries"].items():
        assert e["status"] == "ok", (name, e["reason"])
        for pid in ids:
            res = e["results"].get(pid)
            assert res is not None and ("ms" in res or res.get("skipped") or res.get("error")), (name, pid, res)
        for key in ("first_call_s", "compile_s", "peak_bytes", "dynamo_graphs", "graph_breaks", "box_s"):
            assert key in e, (name, key)
    assert "ms" in r["entries"]["eager"]["results"]["decode/B1/C64"]
    assert "capture_s" in r["entries"]["pcg"] and "kernels" in r["entries"]["hf-eager"]
    assert r["entries"]["full"]["results"]["prefill/T16/x1"]["skipped"].startswith("full captures decode")
    assert r["ratios"]["vs_eager"]["eager"]["decode/B1/C64"] == pytest.approx(1.0)
    assert len(r["goals"]) == 11 and {g["status"] for g in r["goals"]} <= {"met", "missed", "unknown"}
    assert os.path.exists(os.path.join(out, "bench.txt")) and os.path.exists(os.path.join(out, "bench.partial.json"))
    if r["plot"].get("path"):
        assert os.path.getsize(r["plot"]["path"]) > 0


def test_torch_compile_peer_on_cpu():
    from hattn.models.presets import preset_config, random_model

    hf = random_model(preset_config("tiny"), torch.float32, "cpu")
    plan = Plan.quick()
    setup = Setup.build(hf, plan=plan, capture_sizes=[1], peer_backend="eager", progress=False)
    target = TorchCompile(setup, "reduce-overhead")
    points = [Point("decode", batch=1, context=plan.context), Point("prefill", tokens=16, seqs=2),
              Point("e2e", prompt=plan.prompt, new_tokens=2)]
    e = run_target(target, points, Clock("cpu"), Options(reps=2, max_s=0.05, progress=False), time.perf_counter() + 60)
    target.close()
    assert e["status"] == "ok", e["reason"]
    assert "ms" in e["results"]["decode/B1/C64"] and "ms" in e["results"]["prefill/T16/x2"]
    assert "hf-static" in e["results"]["e2e/B1/P16/N2"]["skipped"]
    assert any("backend='eager'" in n for n in e["notes"])


def test_target_names_and_groups():
    assert _names("pcg,hattn") == ["pcg", "eager", "bcg", "full"]
    assert _names("peers")[0] == "hf-static"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown target 'fast'"):
        _names("pcg,fast")


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit):
        main(["--modes", "nope"])
    with pytest.raises(SystemExit):
        main(["--workloads", "train"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_run_on_gpu_captures_graphs(tmp_path):
    """The CUDA paths (events, copy bandwidth, graph stats, peak memory, device-time profile), kept cheap: eager
    pieces (no inductor compile), decode and generate only."""
    out = str(tmp_path / "bench")
    rc = main(["--preset", "tiny", "--quick", "--out", out, "--modes", "pcg,full,hf-eager", "--no-progress",
               "--workloads", "decode,e2e", "--inner-compiler", "eager", "--profile"])
    assert rc == 0
    r = _load(out)
    assert r["meta"]["env"]["device_name"] and r["meta"]["copy_bandwidth"] > 1e11
    for mode in ("pcg", "full"):
        e = r["entries"][mode]
        assert e["status"] == "ok", e["reason"]
        assert e["cuda_graphs"] > 0 and e["capture_s"] > 0 and e["pool_bytes"] >= 0 and e["peak_bytes"] > 0
        assert "ms" in e["results"]["decode/B1/C64"], e["results"]["decode/B1/C64"]
        prof = e["profile"]["decode/B1/C64"]
        assert prof["time"] == "device" and prof["top"], prof
    assert r["entries"]["hf-eager"]["results"]["e2e/B1/P16/per_token"].get("ms") is not None


def test_add_parser_builds_the_hattn_subcommand():
    import argparse

    from hattn.bench import add_parser
    from hattn.bench.cli import run_cli

    parser = argparse.ArgumentParser(prog="hattn")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "--quick", "--modes", "pcg,full", "--workloads", "decode"])
    assert args.func is run_cli and args.modes == ["pcg", "full"] and args.workloads == ["decode"] and args.quick
