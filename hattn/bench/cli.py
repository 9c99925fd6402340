"""`hattn bench`: argument parsing and the run (model, bandwidth floor, targets, report).

    hattn bench --preset qwen3.5-1b                      # every mode and peer, every workload, < 8 min on an H100
    hattn bench --preset tiny --quick --out /tmp/b       # smoke run (CPU too)
    hattn bench --modes pcg,full,hf-static --workloads decode,e2e
    python3 -m hattn.bench ...                           # the same without the hattn command
"""
from __future__ import annotations

import argparse
import math
import sys
import time

DEFAULT_TARGETS = ("eager", "full", "pcg", "bcg", "hf-static", "hf-eager-fla", "hf-eager",
                   "tc-default", "tc-ro")  # run order = priority: what the goals need first, slow compiles last
HATTN_MODES = ("eager", "pcg", "bcg", "full")
DESCRIPTION = """Every hattn mode (eager, inductor, pcg, bcg, full) and the peers a user would pick instead (HF eager
with and without fla kernels, HF generate with a static cache, torch.compile default and reduce-overhead) on one model,
in one process: prefill, decode and generate latency, compile and capture time, graph pool and peak memory, ratios
against eager and against the decode bandwidth floor, and issue 7's goals. Writes bench.json, bench.png, bench.txt.

    hattn bench --preset qwen3.5-1b                      # everything, < 8 min on an H100 (budget 420 s)
    hattn bench --preset tiny --quick --out /tmp/b       # smoke run (CPU too)
    hattn bench --modes pcg,full,hf-static --workloads decode,e2e

Reading the report: docs/benchmarks.md."""
GROUPS = {"all": DEFAULT_TARGETS, "hattn": HATTN_MODES,
          "peers": ("hf-static", "hf-eager-fla", "hf-eager", "tc-default", "tc-ro")}
SIZES16 = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048]
QUICK_SIZES = [1, 2, 4, 8, 16, 32, 64]


def _names(text: str) -> list[str]:
    out: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        for n in GROUPS.get(name, (name,)):
            if n not in DEFAULT_TARGETS:
                raise argparse.ArgumentTypeError(
                    f"unknown target {n!r}; targets: {', '.join(DEFAULT_TARGETS)} (groups: {', '.join(GROUPS)})")
            if n not in out:
                out.append(n)
    return out


def _workloads(text: str) -> list[str]:
    from hattn.bench.workloads import WORKLOADS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown workloads {bad or text!r}; valid: {', '.join(WORKLOADS)}")
    return names


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (default: qwen3.5-1b on a GPU, tiny on a CPU)")
    src.add_argument("--config", help="a config.json (or its directory): random weights")
    p.add_argument("--modes", type=_names, default=list(DEFAULT_TARGETS),
                   help=f"comma-separated targets, run in this order (default: {','.join(DEFAULT_TARGETS)}; "
                        f"groups: {', '.join(GROUPS)})")
    p.add_argument("--workloads", type=_workloads, default=["decode", "prefill", "e2e"],
                   help="comma-separated: decode, prefill, e2e (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions: a smoke run")
    p.add_argument("--out", default="out/bench", help="directory for bench.json, bench.png, bench.txt")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 420; quick 120)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per point (default 10; quick 3)")
    p.add_argument("--max-s", type=float, default=None, help="seconds of timed calls per point (default 1)")
    p.add_argument("--slow-s", type=float, default=None,
                   help="skip larger sizes of a series projected past this many seconds per call (default 3)")
    p.add_argument("--tokens", type=_ints, help="prefill token counts (default 16,64,256,1024,4096,8192)")
    p.add_argument("--seqs", type=int, help="sequences of the multi-sequence prefill (default 4)")
    p.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,4,16,64)")
    p.add_argument("--context", type=int, help="decode context length (default 1024)")
    p.add_argument("--prompt", type=int, help="prompt tokens of the generate workload (default 128)")
    p.add_argument("--new-tokens", type=int, help="tokens the generate workload makes (default 128)")
    p.add_argument("--capture-sizes", type=_ints, help="graph capture sizes (default: 16 sizes 1..2048)")
    p.add_argument("--inner-compiler", default="inductor", choices=["inductor", "eager"],
                   help="what compiles hattn's pieces (eager: fast CPU smoke runs)")
    p.add_argument("--peer-backend", default="inductor", choices=["inductor", "eager", "aot_eager"],
                   help="torch.compile backend of the tc-* peers (non-inductor: smoke runs; mode is then ignored)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.profiler summary of hattn modes (default: on for a GPU run that is not --quick)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks (hattn modes only): one process per GPU, started with torchrun; every "
                        "rank runs every point the same number of times (no time boxes), rank 0 reports")
    p.add_argument("--tbo", action="store_true", help="hattn modes run each step as two micro-batches (two-batch "
                                                      "overlap: one's all-reduces overlap the other's compute)")


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `bench` to the `hattn` subcommand parsers (hattn.cli)."""
    p = sub.add_parser("bench", help="every hattn mode and the peers side by side: table, JSON, PNG",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_cli)
    return p


def _plan(args):
    import dataclasses

    from hattn.bench.workloads import Plan

    keys = ("tokens", "seqs", "batches", "context", "prompt", "new_tokens")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    return dataclasses.replace(Plan.quick() if args.quick else Plan(), **overrides)


def _options(args, cuda: bool):
    from hattn.bench.runner import Options

    q = args.quick
    opts = Options(reps=args.reps or (3 if q else 10), max_s=args.max_s or (0.2 if q else 1.0),
                   slow_s=args.slow_s or (1.0 if q else 3.0), progress=not args.no_progress,
                   profile=args.profile if args.profile is not None else (cuda and not q))
    if args.tp > 1:  # ranks run collectives together: no decision may depend on one rank's clock
        opts.max_s = opts.slow_s = math.inf
    return opts


def _model(args, device, dtype):
    """(unmodified HF model, its name) from --preset or --config."""
    from hattn.models.presets import preset_config, random_model

    if args.config:
        from transformers import AutoConfig

        return random_model(AutoConfig.from_pretrained(args.config), dtype, device, args.seed), args.config
    preset = args.preset or ("qwen3.5-1b" if device.type == "cuda" else "tiny")
    return random_model(preset_config(preset), dtype, device, args.seed), preset


def _targets(names: list[str], setup):
    from hattn.bench.modes import HattnMode
    from hattn.bench.peers import make_peer

    return [(lambda n=n: HattnMode(setup, n) if n in HATTN_MODES else make_peer(n, setup)) for n in names]


def _setup(args, device, opts, tp):
    """(Setup with the HF model and its adapted copy, model name) for the run."""
    import torch

    from hattn.bench.target import Setup

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    hf, model_name = _model(args, device, dtype)
    sizes = args.capture_sizes or (QUICK_SIZES if args.quick else SIZES16)
    setup = Setup.build(hf, tp=tp, plan=_plan(args), capture_sizes=sizes, inner_compiler=args.inner_compiler,
                        peer_backend=args.peer_backend, progress=opts.progress, seed=args.seed, tbo=args.tbo)
    if any(n in HATTN_MODES for n in args.modes):  # allocated before any target: not in a target's peak
        setup.cache("prefill"), setup.cache("decode")
    return setup, model_name


def _meta(args, setup, model_name: str, opts, budget) -> dict:
    """Everything but the figures: device, versions, model, weight bytes, bandwidth floor, plan, options."""
    from hattn.bench.harness import copy_bandwidth, environment
    from hattn.bench.workloads import e2e_ids, per_token_id

    weight_bytes = sum(p.numel() * p.element_size() for p in setup.lm.parameters())
    bandwidth = copy_bandwidth(setup.device)
    return {"model": model_name, "dtype": str(next(setup.lm.parameters()).dtype).removeprefix("torch."),
            "env": environment(setup.device), "args": {k: v for k, v in vars(args).items() if k != "func"},
            "params": sum(p.numel() for p in setup.lm.parameters()), "weight_bytes": weight_bytes,
            "copy_bandwidth": bandwidth, "floor_ms": weight_bytes / bandwidth * 1e3, "plan": setup.plan.as_dict(),
            "capture_sizes": list(setup.capture_sizes), "targets": args.modes, "workloads": args.workloads,
            "options": vars(opts).copy(), "budget_s": budget.total_s, "setup_s": budget.elapsed(),
            "per_token_id": per_token_id(setup.plan), "e2e_ids": list(e2e_ids(setup.plan)),
            "inner_compiler": args.inner_compiler, "peer_backend": args.peer_backend}


def run(args: argparse.Namespace) -> dict:
    """Run the bench described by parsed arguments; write the report; return the result dict."""
    import torch

    from hattn.bench import report
    from hattn.bench.harness import Budget, Clock
    from hattn.bench.runner import run_all
    from hattn.parallel import launch

    tp, where = launch.init(args.tp, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = Budget(math.inf if tp.size > 1 else args.budget or (120.0 if args.quick else 420.0))
    device = torch.device(where)
    opts = _options(args, device.type == "cuda")
    setup, model_name = _setup(args, device, opts, tp)
    if tp.size > 1 or args.tbo:
        model_name += f" (tp={tp.size}{', two-batch overlap' if args.tbo else ''})"
    meta = _meta(args, setup, model_name, opts, budget)
    points = setup.plan.points(args.workloads)
    partial = (lambda done: _partial(args.out, meta, done)) if tp.rank == 0 else None
    entries = run_all(_targets(args.modes, setup), args.modes, points, Clock(device), opts, budget, on_entry=partial)
    meta["total_s"] = budget.elapsed()
    result = report.build(meta, points, entries)
    if tp.rank == 0:  # every rank measured the same points; rank 0 reports
        report.write(result, args.out)
    launch.finish()
    return result


def _check_tp(args) -> None:
    """--tp and --tbo apply to hattn modes: the default targets narrow to them, named peers are an error."""
    if args.tp == 1 and not args.tbo:
        return
    if args.modes == list(DEFAULT_TARGETS):
        args.modes = [n for n in args.modes if n in HATTN_MODES]
    peers = [n for n in args.modes if n not in HATTN_MODES]
    if peers:
        raise ValueError(f"--tp and --tbo apply to hattn modes only; {peers} run one unsharded model: drop them "
                         f"(--modes hattn)")


def _partial(out: str, meta: dict, entries: dict) -> None:
    """bench.partial.json after each target: what a run that is killed later still leaves behind."""
    import os

    from hattn.bench.report import write_json

    os.makedirs(out, exist_ok=True)
    write_json({"partial": True, "meta": {**meta, "total_s": None}, "entries": entries},
               os.path.join(out, "bench.partial.json"))


def run_cli(args: argparse.Namespace) -> int:
    """0 when at least one target measured something, 1 when none did."""
    from hattn.parallel import launch

    _check_tp(args)
    if args.tp > 1 and not launch.under_torchrun():
        return launch.relaunch(args.tp, args.argv)
    result = run(args)
    return 0 if any(e["status"] == "ok" for e in result["entries"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    """`python3 -m hattn.bench [args]` (the same arguments as `hattn bench`)."""
    p = argparse.ArgumentParser(prog="hattn bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = ["bench", *(sys.argv[1:] if argv is None else argv)]  # --tp relaunches `hattn bench` under torchrun
    start = time.perf_counter()
    try:
        rc = run_cli(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: what and how to fix, no traceback
        print(f"hattn bench: error: {e}", file=sys.stderr)
        return 2
    print(f"hattn bench: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rc
