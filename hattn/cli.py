"""The `hattn` command line.

    hattn demo                                      # tiny Qwen3.5-shaped model, every mode, tokens vs HF eager
    hattn generate --preset tiny --mode pcg --prompt-ids 1,2,3 --prompt-ids 7,8
    hattn generate --model path/to/saved_model --mode bcg --prompt "Hello"
    hattn bench ...                                 # hattn/bench: every mode and the peers side by side
    hattn --version; hattn --help                   # the help lists the modes and presets

Subcommands live in `SUBCOMMANDS` (name -> function adding its parser); a module adds one with `@subcommand`.
"""
from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def _modes() -> list[str]:
    from hattn.registry import modes

    return list(modes())


def subcommand(name: str):
    """Register `fn(subparsers)` as the parser builder of `hattn <name>` (it must set `func=` on its parser)."""
    def register(fn):
        SUBCOMMANDS[name] = fn
        return fn
    return register


# -- shared helpers -------------------------------------------------------------------------------------------------
def _mode_list(text: str) -> list[str]:
    """`--modes pcg,full` checked when parsed: an unknown name is a usage error before any model is built."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in _modes()]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"valid modes: {', '.join(_modes())}")
    return names


def _at_least(low: int):
    """An argparse type: an int >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def _ints(text: str) -> list[int]:
    items = text.replace(" ", "").split(",")
    try:
        if "" in items:
            raise ValueError
        return [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,3, got {text!r}") from None


def _presets() -> list[str]:
    from hattn.models.presets import PRESETS

    return list(PRESETS)


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (and of sampling)")
    p.add_argument("--capture-sizes", type=_ints, default=None,
                   help="token counts graphs are captured for (graph modes; default: hattn's 16 sizes up to 2048)")
    p.add_argument("--inner-compiler", default="inductor", choices=["inductor", "eager"],
                   help="what compiles the pieces between split ops in pcg/bcg/full")


def check_device(name: str | None) -> None:
    """--device names cpu or cuda, and cuda only where torch has a CUDA device (ValueError otherwise)."""
    import torch

    if name is None:
        return
    try:
        kind = torch.device(name).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu or cuda (cuda:N for one GPU)")
    if kind == "cuda" and not torch.cuda.is_available():
        build = "has no CUDA support (a CPU build)" if torch.version.cuda is None else "sees no CUDA device"
        raise ValueError(f"--device {name}: this torch {torch.__version__} {build}; use --device cpu, or run on a "
                         f"machine with a CUDA GPU and a CUDA build of torch")
    index, count = torch.device(name).index, torch.cuda.device_count() if kind == "cuda" else 0
    if index is not None and index >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def _device_dtype(args):
    import torch

    check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, name)


def compile_mode(lm, mode: str, capture_sizes: list[int] | None, inner_compiler: str = "inductor",
                 cache_dir: str | None = None):
    """`torch.compile(lm)` with the hattn backend in `mode`; returns (model, backend) (backend.stats counts)."""
    import torch

    from hattn.compiler.backend import backend

    sizes = {"capture_sizes": list(capture_sizes)} if capture_sizes else {}
    be = backend(mode=mode, inner_compiler=inner_compiler, progress=False, cache_dir=cache_dir, **sizes)
    return torch.compile(lm, backend=be), be


def _progress(line: str) -> None:
    """A progress line on stderr (the results go to stdout)."""
    print(line, file=sys.stderr, flush=True)


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        for r in [header] + rows:
            print("  ".join(f"{c:<14}" for c in r))
        return
    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 160).print(table)


# -- demo -----------------------------------------------------------------------------------------------------------
@dataclass
class ModeResult:
    mode: str
    ok: bool
    note: str
    first_s: float = 0.0
    prefill_ms: float = 0.0
    decode_tok_s: float = 0.0
    graphs: int = 0

    def status(self) -> str:
        if not self.first_s:
            return f"ERROR {self.note}"
        return f"{'ok' if self.ok else 'MISMATCH'} (first run, compile and capture included: {self.first_s:.1f} s)"

    def row(self) -> list[str]:
        if not self.first_s:
            return [self.mode, "ERROR", "", "", "", "", self.note]
        return [self.mode, "ok" if self.ok else "MISMATCH", f"{self.first_s:.2f}", f"{self.prefill_ms:.1f}",
                f"{self.decode_tok_s:.0f}", str(self.graphs), self.note]


def run_mode(lm, mode: str, prompts, cache, ref, params, args, tie: float) -> ModeResult:
    """Compile `lm` in `mode`, generate twice (first: compile + capture; second: timed), check tokens vs HF."""
    import torch

    from hattn.models.generate import generate
    from hattn.models.reference import check_tokens

    torch._dynamo.reset()
    try:
        model, be = compile_mode(lm, mode, args.capture_sizes, args.inner_compiler)
        t0 = time.perf_counter()
        first = generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds)
        first_s = time.perf_counter() - t0
        res = generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds)
    except Exception as e:  # a failing mode is reported in its row, not raised; its traceback goes to stderr
        traceback.print_exc()
        return ModeResult(mode, False, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    ok, note = check_tokens(ref, res.tokens, tie)
    if ok and first.tokens != res.tokens:
        ok, note = False, "the first and second runs gave different tokens"
    return ModeResult(mode, ok, note, first_s, res.prefill_s * 1e3, res.decode_tok_per_s, be.stats.cuda_graphs)


def demo_prompts(vocab: int, lengths=(5, 17, 9), seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def run_demo(args) -> int:
    import torch

    from hattn.models.sampling import SamplingParams
    from hattn.models.hf import adapt
    from hattn.models.presets import preset_config, random_model
    from hattn.models.reference import hf_greedy

    device, dtype = _device_dtype(args)
    hf = random_model(preset_config(args.preset), dtype, device, args.seed)
    reference_model = copy.deepcopy(hf)
    lm = adapt(hf)
    prompts = demo_prompts(lm.config.vocab_size, seed=args.seed)
    _progress(f"{args.preset} on {device}: transformers' own generate, the reference ...")
    t0 = time.perf_counter()
    ref = hf_greedy(reference_model, prompts, args.max_new_tokens)
    hf_s = time.perf_counter() - t0
    del reference_model
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    cache = lm.make_cache(len(prompts), max(map(len, prompts)) + args.max_new_tokens)
    tie = 1e-4 if dtype == torch.float32 else 0.1
    modes = args.modes or _modes()
    results = []
    for i, mode in enumerate(modes, 1):
        _progress(f"[{i}/{len(modes)}] {mode}: compiling, capturing graphs and generating twice ...")
        results.append(run_mode(lm, mode, prompts, cache, ref, params, args, tie))
        _progress(f"[{i}/{len(modes)}] {mode}: {results[-1].status()}")
    title = (f"hattn demo: preset {args.preset} on {device} ({str(dtype).removeprefix('torch.')}), "
             f"{len(prompts)} prompts of {[len(p) for p in prompts]} tokens, {args.max_new_tokens} new tokens each; "
             f"HF eager generate (one prompt at a time): {hf_s:.2f}s")
    header = ["mode", "tokens", "first run s", "prefill ms", "decode tok/s", "cuda graphs", "note"]
    _print_table(title, header, [r.row() for r in results])
    if device == "cpu":
        print("on CPU the graph modes (pcg, bcg, full) run graph-free: no CUDA graphs to capture")
    return 0 if all(r.ok for r in results) else 1


@subcommand("demo")
def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a tiny model in every mode: tokens checked against HF eager, times")
    p.add_argument("--preset", default="tiny", choices=_presets(), metavar="PRESET",
                   help=f"model preset, one of: {', '.join(_presets())} (default: tiny)")
    p.add_argument("--modes", type=_mode_list, default=None,
                   help=f"comma-separated modes, of: {', '.join(_modes())} (default: every mode)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=32)
    _device_args(p)
    p.set_defaults(func=run_demo)


# -- generate -------------------------------------------------------------------------------------------------------
def _load(args, device, dtype):
    from hattn.models.presets import load

    return load(args.preset, config=args.config, model=args.model, dtype=dtype, device=device, seed=args.seed)


def _prompts(args, lm) -> tuple[list[list[int]], object]:
    prompts = list(args.prompt_ids or [])
    tokenizer = None
    if args.prompt:
        if args.model is None:
            raise ValueError("--prompt needs --model PATH with a tokenizer; with presets give --prompt-ids 1,2,3")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        encoded = [tokenizer(text)["input_ids"] for text in args.prompt]
        if any(text and not ids for text, ids in zip(args.prompt, encoded)):  # transformers 5 builds an empty one
            raise ValueError(f"--model {args.model} has no usable tokenizer (a non-empty --prompt became no tokens): "
                             f"save the tokenizer with the model, or give --prompt-ids")
        prompts += encoded
    if not prompts:
        raise ValueError("give at least one --prompt-ids 1,2,3 (or --prompt TEXT with --model)")
    _check_ids(prompts, lm.config.vocab_size)
    return prompts, tokenizer


def _check_ids(prompts: list[list[int]], vocab: int) -> None:
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")


def _step_model(lm, args):
    """What generate calls per step: `lm` as is (--mode none) or compiled in --mode, two micro-batches with --tbo;
    and the backends (their stats count graphs)."""
    backends = []

    def compiled(module):
        if args.mode == "none":
            return module
        model, be = compile_mode(module, args.mode, args.capture_sizes, args.inner_compiler, args.cache_dir)
        backends.append(be)
        return model

    if args.tbo:
        from hattn.parallel.overlap import TwoBatchOverlap

        return TwoBatchOverlap.for_model(lm, compile=compiled), backends
    return compiled(lm), backends


def _warmup(args) -> int:
    """Untimed generate calls before the timed one: --warmup, by default 1, or 0 with --timing (which measures the
    first call)."""
    if args.warmup is None:
        return 0 if args.timing else 1
    if args.timing and args.warmup:
        raise ValueError("--timing measures the first generate (compile, capture, prefill): drop --warmup")
    return args.warmup


def _eos(lm):
    """The stop tokens transformers' generate uses: the generation config's eos, else the model config's."""
    generation = getattr(lm.hf, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    return lm.config.eos_token_id if eos is None else eos


def _check_tp(args) -> None:
    """Head counts and a vocabulary that do not divide over --tp, from the config alone (a model folder's config
    that cannot be read here is left to the ranks)."""
    from hattn.models.hf import family_of, text_config
    from hattn.models.presets import _read_config, preset_config
    from hattn.parallel.plans import plan_of
    from hattn.parallel.tp import check_config

    try:
        config = preset_config(args.preset) if args.preset else _read_config(args.config or args.model)
        plan_of(family_of(text_config(config)).name)
    except Exception:  # noqa: BLE001  (the ranks load it again and report)
        return
    check_config(config, args.tp)
    _check_ids(getattr(args, "prompt_ids", None) or [], text_config(config).vocab_size)


def _sampling(args, stops):
    from hattn.models.sampling import SamplingParams

    return SamplingParams(args.max_new_tokens, args.temperature, args.top_p, stops, args.seed, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty)  # ValueError: one line


def run_generate(args) -> int:
    from hattn.counters import describe_startup, process_seconds, total_stats
    from hattn.models.generate import generate
    from hattn.parallel import launch, shard

    if args.tp > 1 and not launch.under_torchrun():
        # input errors once here, not once per rank with torchrun's traceback after it started them
        check_device(args.device)
        _warmup(args)
        _sampling(args, stops=())
        _check_tp(args)
        return launch.relaunch(args.tp, args.argv)
    warmup = _warmup(args)
    started_s = process_seconds()  # interpreter start, imports of torch and hattn
    if args.timing:  # what the start did: each capture, each cache save, why a warm start traced
        logging.basicConfig(format="%(message)s")
        logging.getLogger("hattn").setLevel(logging.INFO)
    if args.cache_dir is not None:  # before the model's first kernels (adapt's probe runs some)
        from hattn.compiler.artifacts import keep_kernels_in

        keep_kernels_in(args.cache_dir)
    device, dtype = _device_dtype(args)
    tp, device = launch.init(args.tp, device)
    lm = shard(_load(args, device, dtype), tp)
    loaded_s = process_seconds()  # + CUDA init, transformers, the model built on the device, adapted
    prompts, tokenizer = _prompts(args, lm)
    stops = args.stop_ids if args.stop_ids is not None else _eos(lm)
    params = _sampling(args, stops)
    max_len = args.max_len or max(map(len, prompts)) + args.max_new_tokens
    cache = lm.make_cache(len(prompts), max_len)
    model, backends = _step_model(lm, args)
    first_s, before_s = None, process_seconds()
    for _ in range(warmup):
        t0 = time.perf_counter()
        generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds)
        first_s = time.perf_counter() - t0 if first_s is None else first_s
    res = generate(model, prompts, cache, params, layer_kinds=lm.layer_kinds)
    launch.finish()
    if tp.rank != 0:  # every rank generated the same tokens
        return 0
    for i, (p, new) in enumerate(zip(prompts, res.tokens)):
        text = f"  {tokenizer.decode(new)!r}" if tokenizer is not None else ""
        print(f"[{i}] {p} -> {new}{text}")
    graphs = f", {sum(be.stats.cuda_graphs for be in backends)} cuda graphs" if backends else ""
    where = f"{device} and {tp.size - 1} more rank(s)" if tp.size > 1 else device
    first = (f"first call (compile + capture + generate) {first_s:.2f} s; timed call: " if first_s is not None else
             "no warm-up (--warmup 0): these times include compiling and capturing: ")
    print(f"mode {args.mode} on {where}: {first}prefill {res.prefill_s * 1e3:.1f} ms, decode {res.decode_steps} "
          f"steps {res.decode_tok_per_s:.0f} tok/s{graphs}", file=sys.stderr)
    if args.timing:
        print(f"process start to first token {before_s + res.prefill_s:.2f} s: {before_s:.2f} s before generate "
              f"(imports {started_s:.2f}, model built and adapted {loaded_s - started_s:.2f}, cache and compile "
              f"set-up {before_s - loaded_s:.2f}), {res.prefill_s:.2f} s first step\n"
              f"{describe_startup(total_stats())}", file=sys.stderr)
    return 0


@subcommand("generate")
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate from token ids with a preset, a config or a saved model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=_presets(), metavar="PRESET",
                     help=f"a preset (random weights), one of: {', '.join(_presets())}")
    src.add_argument("--config", help="a config.json (or its directory): random weights")
    src.add_argument("--model", help="a saved model directory (save_pretrained output)")
    p.add_argument("--mode", default="eager", choices=_modes() + ["none"],
                   help="'none': the eager module, uncompiled")
    p.add_argument("--prompt-ids", type=_ints, action="append", help="a prompt as ids 1,2,3; repeat for a batch")
    p.add_argument("--prompt", action="append", help="a text prompt (needs --model with a tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-len", type=_at_least(1), default=None,
                   help="cache length per sequence (default: just enough)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="transformers' repetition penalty (1: off; > 1 discourages tokens already seen)")
    p.add_argument("--stop-ids", type=_ints, default=None, help="stop tokens (default: the config's eos)")
    p.add_argument("--warmup", type=_at_least(0), default=None,
                   help="untimed runs first (the first compiles and captures; its time is printed; default: 1, "
                        "0 with --timing)")
    p.add_argument("--tp", type=_at_least(1), default=1,
                   help="tensor-parallel ranks: one process per GPU (gloo processes on CPU), started with torchrun")
    p.add_argument("--tbo", action="store_true",
                   help="two-batch overlap: each step as two micro-batches (one's all-reduces overlap the other's "
                        "compute on GPUs)")
    p.add_argument("--cache-dir", default=None,
                   help="warm start: torch's compiled artifacts and Dynamo's graphs kept here")
    p.add_argument("--timing", action="store_true",
                   help="print where the start went: process start to first token, and hattn's log of it")
    _device_args(p)
    p.set_defaults(func=run_generate)


# -- bench ----------------------------------------------------------------------------------------------------------
@subcommand("bench")
def _add_bench(sub) -> None:
    from hattn.bench.cli import add_parser  # modes and peers side by side (hattn/bench)

    add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    import torch

    from hattn import __version__

    parser = argparse.ArgumentParser(
        prog="hattn", description="hybrid-attention LLMs under torch.compile",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"modes:   {', '.join(_modes())}\npresets: {', '.join(_presets())}\n"
               f"python:  model = hattn.compile(transformers_model); model.generate(input_ids, ...)")
    parser.add_argument("--version", action="version", version=f"hattn {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS.values():
        add(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # --tp relaunches the command under torchrun
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what and how to fix it, no traceback
        print(f"hattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
