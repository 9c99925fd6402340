"""`hattn bench`: argument parsing and the run (suite, floors, targets, report).

    hattn bench --preset qwen3.5-1b                      # the model suite: every mode and peer, < 9 min on an H200
    hattn bench --suite kernels                          # each kernel alone: ours, fla, torch, copy
    hattn bench --suite runtime                          # the modes only, eager pieces: what the runtimes cost
    hattn bench --preset tiny --quick --out /tmp/b       # smoke run (CPU too)
    python3 -m hattn.bench ...                           # the same without the hattn command
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

HATTN_FIRST = ("eager", "full", "pcg", "bcg")  # run order = priority: what the goals need first, slow compiles last
PEERS = ("tc-ro", "hf-static", "hf-eager-fla", "tc-default", "hf-eager")
# the model suite's default: what the goals of issues 17 and 18 compare (the other peers cost ~70 s of compile
# for rows no goal reads; `--modes all` adds them)
# eager last: the first target pays the cold compile of fla's and inductor's kernels (eager spent its whole time box
# on it in the ninth session's run), and the goals compare full, pcg and bcg with the floors and tc-ro / hf-static
# first; eager (inductor pieces, graph-free) is the base of the speedup column and of one prefill goal
GOALS = ("full", "pcg", "bcg", "tc-ro", "hf-static", "eager")
SIZES16 = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048]
QUICK_SIZES = [1, 2, 4, 8, 16, 32, 64]
SUITES = {  # defaults of each suite, before the command line's
    "model": {"modes": "goals", "workloads": "decode,prefill,e2e"},
    "runtime": {"modes": "hattn", "workloads": "decode,prefill", "inner_compiler": "eager"},
    "kernels": {"modes": "all", "workloads": "gdn-decode,gdn-prefill,attn-decode,gemm"},
}
BUDGET_S = {"model": 540.0, "runtime": 240.0, "kernels": 240.0}  # GPU; --quick: 120 s
DESCRIPTION = """Suites: model (default: every hattn mode and the peers a user would pick instead: HF eager with
and without fla kernels, HF generate with a static cache, torch.compile default and reduce-overhead, on one model,
in one process: decode, prefill and generate latency, time to first token, startup, capture, graph pool and peak
memory, ratios against eager and against each row's floor, the goals of issues 17 and 18 on a GPU); runtime (the
hattn modes with eager pieces: what each runtime costs); kernels (each kernel alone at the model shapes, against
fla, the torch reference and a copy of its bytes). Writes bench.json, bench.png, bench.txt; ends within --budget,
and on SIGTERM or Ctrl-C writes them from what was measured (partial: true).

    hattn bench --preset qwen3.5-1b                      # the model suite, < 10 min on an H200 (budget 540 s)
    hattn bench --suite kernels --workloads attn-decode  # one kernel workload
    hattn bench --preset tiny --quick --out /tmp/b       # smoke run (CPU too)

Reading the report: docs/benchmarks.md."""


def _targets_of(suite: str, modes_text: str) -> list[str]:
    if suite == "kernels":
        from hattn.bench.kernels import impl_names, WORKLOADS

        known = impl_names(list(WORKLOADS))
        groups = {"all": known}
    else:
        from hattn.registry import modes

        hattn_modes = [*HATTN_FIRST, *(m for m in modes() if m not in HATTN_FIRST)]
        known = [*hattn_modes, *PEERS]
        groups = {"all": known, "goals": list(GOALS), "hattn": hattn_modes, "peers": PEERS}
    out: list[str] = []
    names = [t.strip() for t in modes_text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--modes {modes_text!r} names no target; targets: {', '.join(known)} (groups: "
                         f"{', '.join(groups)})")
    for name in names:
        for n in groups.get(name, (name,)):
            if n not in known:
                raise ValueError(f"unknown target {n!r} for --suite {suite}; targets: {', '.join(known)} "
                                 f"(groups: {', '.join(groups)})")
            if n not in out:
                out.append(n)
    return out


def _workloads_of(suite: str, text: str) -> list[str]:
    from hattn.bench.kernels import WORKLOADS as KERNELS
    from hattn.bench.workloads import WORKLOADS

    valid = list(KERNELS) if suite == "kernels" else list(WORKLOADS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise ValueError(f"unknown workloads {bad or text!r} for --suite {suite}; valid: {', '.join(valid)}")
    return names


def _ints(text: str) -> list[int]:
    """Comma-separated positive integers (sizes: batches, token counts), each once, in ascending order."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return sorted(set(values))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str, lowest: float = 0.0, allow_lowest: bool = False) -> float:
    """A finite number of seconds above `lowest` (or equal to it, where allowed)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < lowest or (value == lowest and not allow_lowest):
        bound = f">= {lowest:g}" if allow_lowest else f"> {lowest:g}"
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds {bound}, got {text!r}")
    return value


def _warmup_seconds(text: str) -> float:
    return _seconds(text, allow_lowest=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=list(SUITES), default="model", help="what to measure (default: model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model preset (default: qwen3.5-1b on a GPU, tiny on a CPU)")
    src.add_argument("--config", help="a config.json (or its directory): random weights")
    p.add_argument("--modes", help="comma-separated targets, run in this order (default: model: goals = "
                                   "eager,full,pcg,bcg,tc-ro,hf-static; groups: all, hattn, peers; kernels: all of "
                                   "ours, fla, torch, copy)")
    p.add_argument("--workloads", help="comma-separated (model: decode, prefill, e2e; kernels: gdn-decode, "
                                       "gdn-prefill, attn-decode, gemm); default: all of the suite")
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions: a smoke run")
    p.add_argument("--out", default="out/bench", help="directory for bench.json, bench.png, bench.txt")
    p.add_argument("--budget", type=_seconds, default=None,
                   help="seconds for the whole run, report included (default: model 540, others 240; quick 120)")
    p.add_argument("--reps", type=_positive_int, default=None, help="timed calls per point (default 10; quick 3)")
    p.add_argument("--max-s", type=_seconds, default=None, help="seconds of timed calls per point (default 1)")
    p.add_argument("--warmup-s", type=_warmup_seconds, default=None,
                   help="seconds of warm-up calls per point after the first, at least (default on a GPU 0.2, "
                        "quick 0.05; on a CPU 0)")
    p.add_argument("--slow-s", type=_seconds, default=None,
                   help="skip larger sizes of a series projected past this many seconds per call (default 3)")
    p.add_argument("--tokens", type=_ints, help="prefill token counts of one prompt (default 16,256,1024,4096,8192)")
    p.add_argument("--packed-tokens", dest="packed", type=_ints,
                   help="token counts of the packed prefill rows, --seqs prompts each (default seqs x 1024)")
    p.add_argument("--seqs", type=_positive_int, help="sequences of the packed prefill (default 4)")
    p.add_argument("--batches", type=_ints, help="decode batch sizes (default 1,16,64)")
    p.add_argument("--context", type=_positive_int, help="decode context length (default 1024)")
    p.add_argument("--prompt", type=_positive_int, help="prompt tokens of the generate rows (default 128)")
    p.add_argument("--new-tokens", type=_positive_int, help="tokens the generate rows make (default 128)")
    p.add_argument("--gen-batches", type=_ints, help="batches of the generate rows (default 1,16)")
    p.add_argument("--capture-sizes", type=_ints, help="graph capture sizes (default: 16 sizes 1..2048)")
    p.add_argument("--inner-compiler", default=None, choices=["inductor", "eager"],
                   help="what compiles hattn's pieces (default inductor; runtime suite: eager)")
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
    p = sub.add_parser("bench", help="hattn modes, peers and kernels side by side: table, JSON, PNG",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_cli)
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the suite's defaults and check targets and workloads (ValueError names the valid ones); once."""
    if getattr(args, "resolved", False):
        return args
    args.resolved = True
    defaults = SUITES[args.suite]
    args.inner_compiler = args.inner_compiler or defaults.get("inner_compiler", "inductor")
    args.modes = _targets_of(args.suite, args.modes if args.modes is not None else defaults["modes"])
    args.workloads = _workloads_of(args.suite, args.workloads or defaults["workloads"])
    from hattn.cli import check_device

    check_device(args.device)
    if args.config is not None and not os.path.exists(args.config):
        raise FileNotFoundError(f"--config {args.config!r} does not exist (give a config.json or a directory "
                                f"holding one)")
    if args.suite == "kernels":  # its workloads have their shapes (hattn.bench.kernels): a model's options do nothing
        given = [_flag(k) for k in _MODEL_ONLY if getattr(args, k, None) is not None]
        if given or args.tp > 1 or args.tbo:
            raise ValueError(f"{', '.join(given) or '--tp/--tbo'} apply to the model and runtime suites, not to "
                             f"--suite kernels (its workloads have their own shapes: --workloads, --quick)")
    _check_out(args.out)  # last: it makes the directory
    return args


def _check_out(out: str) -> None:
    """--out is a directory the report can be written into: checked before anything is measured."""
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".hattn-bench-write-check-")  # one per process (--tp ranks)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--out {out!r}: the report cannot be written there ({e.strerror or e}); give a directory "
                         f"you can write to") from e


_PLAN_KEYS = ("tokens", "seqs", "batches", "context", "prompt", "new_tokens", "gen_batches", "packed")  # Plan's
_MODEL_ONLY = ("preset", "config", *_PLAN_KEYS, "capture_sizes", "dtype")


def _flag(dest: str) -> str:
    return "--packed-tokens" if dest == "packed" else f"--{dest.replace('_', '-')}"


def _options(args, cuda: bool):
    from hattn.bench.runner import Options

    q = args.quick
    opts = Options(reps=args.reps or (3 if q else 10), max_s=args.max_s or (0.2 if q else 1.0),
                   slow_s=args.slow_s or (1.0 if q else 3.0), progress=not args.no_progress,
                   profile=args.profile if args.profile is not None else (cuda and not q),
                   min_measure_s=30.0 if cuda else 3.0,
                   warmup_s=args.warmup_s if args.warmup_s is not None else ((0.05 if q else 0.2) if cuda else 0.0))
    if args.tp > 1:  # ranks run collectives together: no decision may depend on one rank's clock
        opts.max_s = opts.slow_s = math.inf
        opts.warmup_s = 0.0
    return opts


def _plan(args):
    import dataclasses

    from hattn.bench.workloads import Plan

    overrides = {k: getattr(args, k) for k in _PLAN_KEYS if getattr(args, k) is not None}
    if "packed" not in overrides and ("tokens" in overrides or "seqs" in overrides):
        overrides["packed"] = None  # derived again from the new tokens / seqs
    return dataclasses.replace(Plan.quick() if args.quick else Plan(), **overrides)


def _model(args, device, dtype):
    """(unmodified HF model, its name) from --preset or --config."""
    from hattn.models.presets import preset_config, random_model

    if args.config:
        from hattn.models.presets import _read_config

        return random_model(_read_config(args.config), dtype, device, args.seed), args.config
    preset = args.preset or ("qwen3.5-1b" if device.type == "cuda" else "tiny")
    return random_model(preset_config(preset), dtype, device, args.seed), preset


def _model_suite(args, device, opts, meta: dict, tp):
    """(points, target factories) of the model and runtime suites; fills the model's part of `meta`."""
    import torch

    from hattn.bench.floor import decode_weight_bytes, with_floor
    from hattn.bench.modes import HattnMode
    from hattn.bench.peers import make_peer
    from hattn.bench.target import Setup

    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    hf, model_name = _model(args, device, dtype)
    plan = _plan(args)
    setup = Setup.build(hf, tp=tp, plan=plan, capture_sizes=args.capture_sizes or (QUICK_SIZES if args.quick else
                                                                                    SIZES16),
                        inner_compiler=args.inner_compiler, peer_backend=args.peer_backend, progress=opts.progress,
                        seed=args.seed, tbo=args.tbo)
    if tp.size > 1 or args.tbo:
        model_name += f" (tp={tp.size}{', two-batch overlap' if args.tbo else ''})"
    if any(n not in PEERS for n in args.modes):  # allocated before any target: not in a target's peak
        setup.cache(), setup.cache(plan.max_prefill)
    params = list(setup.lm.parameters())
    meta.update(model=model_name, dtype=str(dtype).removeprefix("torch."), params=sum(p.numel() for p in params),
                weight_bytes=sum(p.numel() * p.element_size() for p in params),
                decode_weight_bytes=decode_weight_bytes(setup.lm.hf), plan=plan.as_dict(),
                capture_sizes=list(setup.capture_sizes), inner_compiler=args.inner_compiler,
                peer_backend=args.peer_backend)
    meta["all_weights_floor_ms"] = meta["weight_bytes"] / meta["copy_bandwidth"] * 1e3  # issue 17's old floor
    meta["all_weights_floor_note"] = ("the old decode floor: every parameter byte (the embedding table a step never "
                                      "reads too) / copy bandwidth, no KV or state traffic; rows use their own floor")
    derived = plan.derived() if "e2e" in args.workloads else []
    points = with_floor(plan.points(args.workloads) + derived, setup.lm)
    peers = set(PEERS)
    return points, [(lambda n=n: make_peer(n, setup) if n in peers else HattnMode(setup, n)) for n in args.modes]


def _kernel_suite(args, device, opts, meta: dict, tp=None):
    """(points, target factories) of the kernels suite."""
    from types import SimpleNamespace

    from hattn.bench.kernels import WORKLOADS, KernelImpl

    setup = SimpleNamespace(device=device, seed=args.seed)
    points = [p for w in args.workloads for p in WORKLOADS[w].points(args.quick, device)]
    return points, [(lambda n=n: KernelImpl(setup, n)) for n in args.modes]


def run(args: argparse.Namespace, start: float | None = None) -> dict:
    """Run the bench described by parsed arguments; write the report; return the result dict.

    The budget counts from `start` (time.perf_counter seconds; default now). The report is written whatever
    happens: when the budget's hard deadline passes or on SIGTERM/SIGINT, from what was measured (`partial: true`
    and the reasons); bench.json is also rewritten after each target."""
    import torch

    from hattn.bench.harness import Budget, Clock, Deadlines, Stop, copy_bandwidth, environment, matmul_peak
    from hattn.bench.runner import run_all
    from hattn.parallel import launch

    _resolve(args)
    tp, where = launch.init(args.tp, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # ranks run collectives together: no rank may stop on its own clock (a day, not forever: the timer needs a number)
    total = 86400.0 if tp.size > 1 else args.budget or (120.0 if args.quick else BUDGET_S[args.suite])
    budget = Budget(total, start or time.perf_counter())
    device = torch.device(where)
    opts = _options(args, device.type == "cuda")
    meta = {"suite": args.suite, "env": environment(device), "targets": args.modes, "workloads": args.workloads,
            "args": {k: v for k, v in vars(args).items() if k != "func"}, "options": vars(opts).copy(),
            "budget_s": budget.total_s, "base": "ours" if args.suite == "kernels" else "eager"}
    points, entries, partial = [], {}, []
    with Deadlines(budget) as deadlines:
        try:
            meta.update(copy_bandwidth=copy_bandwidth(device), matmul_flops=matmul_peak(device))
            suite = _kernel_suite if args.suite == "kernels" else _model_suite
            points, targets = suite(args, device, opts, meta, tp)
            meta["setup_s"] = budget.elapsed()
            measured = [p for p in points if p.kind != "per_token"]
            on_entry = (lambda done: _write_json(meta, points, done, args.out, budget)) if tp.rank == 0 else None
            entries, partial = run_all(targets, args.modes, measured, Clock(device), opts, budget, deadlines,
                                       on_entry=on_entry)
        except Stop as stop:  # during setup: a report of what there is
            partial = [f"{stop} during setup"]
        except (ValueError, FileNotFoundError):
            raise  # bad input: `main` names it and the fix
        except Exception as e:  # noqa: BLE001  (out of memory building the model, a broken CUDA context): reported
            from hattn.bench.runner import reason

            partial = [f"setup failed: {reason(e)}"]
    meta["total_s"] = budget.elapsed()
    if deadlines.signal is not None:
        meta["stopped_by_signal"] = deadlines.signal
    launch.finish()
    if tp.rank != 0:  # every rank measured the same points; rank 0 reports
        from hattn.bench.data import build

        return build(meta, points, entries, partial)
    return write_report(meta, points, entries, partial, args.out)


def _write_json(meta: dict, points, entries: dict, out: str, budget) -> None:
    """bench.json after each target: what a run killed later (SIGKILL) still leaves behind."""
    from hattn.bench.data import build, write_json

    os.makedirs(out, exist_ok=True)
    done = f"run in progress: {len(entries)} of {len(meta['targets'])} targets done"
    write_json(build({**meta, "total_s": budget.elapsed()}, points, dict(entries), [done]),
               os.path.join(out, "bench.json"))


def write_report(meta: dict, points, entries: dict, partial: list[str], out: str) -> dict:
    """bench.json, bench.png, bench.txt under `out` (the tables printed too); returns the result."""
    from hattn.bench.data import build, write_json
    from hattn.bench.plot import write_png
    from hattn.bench.tables import print_report

    os.makedirs(out, exist_ok=True)
    result = build(meta, points, entries, partial)
    write_png(result, os.path.join(out, "bench.png"))
    write_json(result, os.path.join(out, "bench.json"))
    print_report(result, os.path.join(out, "bench.txt"))
    return result


def _check_tp(args) -> None:
    """--tp and --tbo apply to hattn modes: the default targets narrow to them, named peers are an error."""
    if args.tp == 1 and not args.tbo:
        return
    named = args.modes is not None
    _resolve(args)
    if not named:
        args.modes = [n for n in args.modes if n not in PEERS]
    peers = [n for n in args.modes if n in PEERS]
    if peers:
        raise ValueError(f"--tp and --tbo apply to hattn modes only; {peers} run one unsharded model: drop them "
                         f"(--modes hattn)")


def run_cli(args: argparse.Namespace, start: float | None = None) -> int:
    """0 when at least one target measured something, 1 when none did, 128 + the signal's number when SIGINT (130)
    or SIGTERM (143) stopped the run (its partial report written)."""
    from hattn.parallel import launch

    _check_tp(args)
    if args.tp > 1 and not launch.under_torchrun():
        return launch.relaunch(args.tp, args.argv)
    result = run(args, start)
    stopped = result.get("meta", {}).get("stopped_by_signal")
    if stopped is not None:  # the shell's code for a process a signal ended: a script tells it from a finished run
        return 128 + stopped
    return 0 if any(e["status"] == "ok" for e in result["entries"].values()) else 1


def main(argv: list[str] | None = None, start: float | None = None) -> int:
    """`python3 -m hattn.bench [args]` (the same arguments as `hattn bench`). The budget counts from `start`
    (time.perf_counter seconds; `python3 -m hattn.bench` passes the process's start), else from now."""
    start = start or time.perf_counter()
    p = argparse.ArgumentParser(prog="hattn bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = ["bench", *(sys.argv[1:] if argv is None else argv)]  # --tp relaunches `hattn bench` under torchrun
    try:
        rc = run_cli(args, start)
    except (ValueError, FileNotFoundError) as e:  # bad input: what and how to fix, no traceback
        print(f"hattn bench: error: {e}", file=sys.stderr)
        return 2
    print(f"hattn bench: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return rc
