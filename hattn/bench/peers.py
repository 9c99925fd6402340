"""Peers: what a user would run instead of hattn, on the same (unmodified) transformers model and weights.

    hf-eager-fla  HF eager forward with the fast kernels transformers found (flash-linear-attention, causal-conv1d)
    hf-eager      HF eager forward with those kernels switched off (transformers' torch reference code)
    hf-static     HF `generate` with a static cache, which transformers compiles itself (reduce-overhead) on a GPU
    tc-default    torch.compile(model) on the HF model; decode over a transformers StaticCache
    tc-ro         torch.compile(model, mode="reduce-overhead") likewise (inductor + cudagraph trees)

The fla switch. transformers 5 decorates its linear-attention kernels (`causal_conv1d_fn`, `causal_conv1d_update`,
`torch_chunk_gated_delta_rule`, `torch_recurrent_gated_delta_rule` in modeling_qwen3_5, and the same in other hybrid
families) with `use_kernel_func_from_hub_with_fallback`: at import of the modeling module it tries
`import fla` / `import causal_conv1d` and, if that works, the module-level function calls the package's kernel;
the torch code stays reachable inside (`fn.__wrapped__`, or from transformers 5.25 with `kernels` installed, inside
the module the function became). "Without fla" replaces those module globals by that torch code for the duration
of the target (`torch_kernels`); `hub_kernels` reports which
implementation each one resolved to. Peers never write the KV cache during prefill (`use_cache=False`), which can
only favour them. Peers that compile run the goals' rows only, and the slow torch path only where it is cheap, so
the default run keeps its budget.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

from hattn.bench.goals import GOAL_BATCHES, PREFILL_MAX_TOKENS
from hattn.bench.harness import Skip
from hattn.bench.target import Setup, Target
from hattn.bench.workloads import Point, token_ids


# -- the fla switch ------------------------------------------------------------------------------------------------
def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or not fn.__closure__:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def _inner(fn):
    """What a hub-kernel decorator wraps: `fn.__wrapped__` (a decorated function), or the function a `kernels`
    function module calls (transformers >= 5.25 with `kernels` installed makes a module of each such function)."""
    if isinstance(fn, torch.nn.Module):
        return _closure(type(fn).forward).get("func")
    return getattr(fn, "__wrapped__", None)


def _kernel_wrapper(fn):
    """The transformers fallback wrapper inside `fn` (following `_inner`), or None if `fn` is not one."""
    while fn is not None:
        if "is_new_implementation" in _closure(fn):
            return fn
        fn = _inner(fn)
    return None


def hub_kernels(module) -> dict[str, str]:
    """{module-level kernel function: "package.module.function" it resolved to, or "torch"} of a modeling module."""
    out = {}
    for name, fn in sorted(vars(module).items()):
        wrapper = _kernel_wrapper(fn) if callable(fn) else None
        if wrapper is not None:
            c = _closure(wrapper)
            impl = c["implementation"]
            out[name] = f"{impl.__module__}.{impl.__name__}" if c["is_new_implementation"] else "torch"
    return out


@contextlib.contextmanager
def torch_kernels(module):
    """Inside the block, the module's fast kernel functions call transformers' torch code instead."""
    saved = {}
    for name, fn in list(vars(module).items()):
        wrapper = _kernel_wrapper(fn) if callable(fn) else None
        if wrapper is not None and _closure(wrapper)["is_new_implementation"]:
            saved[name] = fn
            setattr(module, name, _closure(wrapper)["torch_function"])
    try:
        yield sorted(saved)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def modeling_module(hf) -> object:
    return sys.modules[type(hf).__module__]


# -- peers ---------------------------------------------------------------------------------------------------------
def _batched(point: Point, setup: Setup) -> torch.Tensor:
    """The prefill point's tokens as HF input [seqs, tokens/seqs] (same tokens as hattn's packed input)."""
    ids = token_ids(point.tokens, setup.vocab, setup.device, setup.seed)
    return ids.view(point.seqs, point.tokens // point.seqs)


def _goal_rows_only(name: str, point: Point, plan) -> None:
    """Compiling peers run the goals' rows only: each new shape costs them a recompile (tens of seconds)."""
    if point.kind == "decode" and point.batch not in GOAL_BATCHES:
        raise Skip(f"{name} runs decode at the goals' batches {GOAL_BATCHES} only (a new batch recompiles)")
    if point.kind == "decode" and point.context != plan.context:
        raise Skip(f"{name} runs decode at the goals' context {plan.context} only (another static cache recompiles)")
    if point.kind == "prefill" and point.tokens > PREFILL_MAX_TOKENS:
        raise Skip(f"{name} runs prefill up to the goals' {PREFILL_MAX_TOKENS} tokens only")


STATIC_FILL = 16  # tokens a StaticCache is filled with for decode steps (see `_filled_cache`)


class _HFPeer(Target):
    kind = "peer"
    est_s = (5.0, 2.0)

    def prefill(self, point: Point):
        ids = _batched(point, self.s)  # logits of each prompt's last token only, as hattn computes
        return lambda: _infer(self.s.hf, input_ids=ids, use_cache=False, logits_to_keep=1)

    def _filled_cache(self, point: Point, static: bool):
        """A transformers cache for decode steps at `context` tokens of `batch` sequences (eager prefill, last
        logits only). A DynamicCache holds `context` tokens (its steps attend to what it holds). A StaticCache's step
        costs the same whatever it holds (attention over all its positions, masked), so it is filled with a few
        tokens through transformers' torch kernels: a throwaway prefill over fla's kernels would autotune them cold
        first (30-40 s on the H200 with the eager target still to run)."""
        from transformers import StaticCache

        b, c = point.batch, point.context
        n = min(c, STATIC_FILL) if static else c
        ids = token_ids(b * n, self.s.vocab, self.s.device, self.s.seed).view(b, n)
        cache = StaticCache(config=self.s.hf.config, max_cache_len=c + 16) if static else None
        with torch_kernels(modeling_module(self.s.hf)) if static else contextlib.nullcontext():
            out = _infer(self.s.hf, input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.past_key_values, ids[:, -1:].clone()

    def _generate(self, point: Point, **kwargs) -> Callable[[], object]:
        ids = token_ids(point.prompt, self.s.vocab, self.s.device, self.s.seed).view(1, -1).repeat(point.batch, 1)
        n = point.new_tokens
        return lambda: _infer_generate(self.s.hf, ids, n, **kwargs)

    def info(self) -> dict:
        return {"kernels": hub_kernels(modeling_module(self.s.hf))}


def _infer(model, **kwargs):
    with torch.inference_mode():
        return model(**kwargs)


def _infer_generate(hf, ids: torch.Tensor, n: int, **kwargs):
    with torch.inference_mode():
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           eos_token_id=None, **kwargs)


class HFEager(_HFPeer):
    """HF eager forward; decode steps over transformers' default DynamicCache (it grows by one token per call).
    The torch path (fla=False) runs where it is cheap only: decode B <= 4, prefill <= 1024 tokens."""

    def __init__(self, setup: Setup, fla: bool):
        super().__init__(setup)
        self.fla = fla
        self.name = "hf-eager-fla" if fla else "hf-eager"
        self.about = "HF eager + fla kernels" if fla else "HF eager, torch kernels (fla switched off)"
        self._switch = contextlib.ExitStack()

    def prepare(self) -> None:
        module = modeling_module(self.s.hf)
        kernels = hub_kernels(module)
        fast = {k: v for k, v in kernels.items() if v != "torch"}
        if self.fla and not fast:
            raise Skip(f"transformers found no fast kernels for {type(self.s.hf).__name__} ({kernels or 'none'}): "
                       f"install flash-linear-attention; hf-eager measures the torch path")
        if not self.fla:
            switched = self._switch.enter_context(torch_kernels(module))
            if switched:
                self.notes.append(f"switched to torch code: {', '.join(switched)}")

    def step(self, point: Point):
        if not self.fla and (point.batch > 4 or point.tokens > 1024):
            raise Skip("hf-eager's torch path is slow: it runs decode B <= 4 and prefill <= 1024 tokens only")
        return super().step(point)

    def decode(self, point: Point):
        cache, last = self._filled_cache(point, static=False)
        return lambda: _infer(self.s.hf, input_ids=last, past_key_values=cache, use_cache=True)

    def e2e(self, point: Point):
        raise Skip(f"{self.name} generates a token per eager decode step (see the decode rows): not run, to keep "
                   f"the run's budget")

    def close(self) -> None:
        self._switch.close()


class HFStatic(_HFPeer):
    """`generate(cache_implementation="static")`: transformers compiles the decode step (CompileConfig default).
    Run at batch 1 only (the goal's row): another batch recompiles."""

    # its first generate took 60.5 and 80.3 s on the H200 (nineteenth and twenty-first sessions; ~30 s in the
    # eighteenth): with 40 s estimated, a 430 s run's box (70 s) ended before its second generate row
    name, about, est_s = "hf-static", "HF generate, static cache, compiled by transformers (+fla if found)", (70.0, 5.0)

    def prepare(self) -> None:
        torch._dynamo.reset()
        if self.s.device.type != "cuda":
            self.notes.append("transformers compiles generate only on GPUs: on this device it ran uncompiled")

    def prefill(self, point: Point):
        raise Skip("hf-static is measured end to end (generate); its per-token figure is in the per-token row")

    decode = prefill

    def e2e(self, point: Point):
        if point.batch != 1:
            raise Skip("hf-static generates at batch 1 only (the goal's row): another batch recompiles")
        return self._generate(point, cache_implementation="static")

    def close(self) -> None:
        torch._dynamo.reset()


class TorchCompile(_HFPeer):
    """torch.compile of the HF model: prefill without cache, decode steps over a filled StaticCache."""

    def __init__(self, setup: Setup, mode: str):
        super().__init__(setup)
        self.mode = mode
        self.name = "tc-default" if mode == "default" else "tc-ro"
        self.about = f"torch.compile(model{'' if mode == 'default' else ', mode=' + repr(mode)}) on the HF model"
        self.warmup = 3 if mode == "reduce-overhead" else 2  # cudagraph trees record on the second call
        # compiles on the H200: a decode batch 28-35 s (eighteenth session; the second took 62-67 s while Dynamo
        # recompiled it dynamic); the prefill graph ~100 s in the thirteenth session, over 250 s in the eighteenth
        # (fla's kernels autotuned cold inside it), and on an H100 in the thirty-ninth it had not compiled after
        # 343 s (a 16-token prompt, the box of a --budget 450 run). The estimate covers the decode rows the goals
        # need; the prefill rows run where the time box still holds their graph (a run given more --budget, or
        # fewer --modes), and are skipped up front where it cannot, instead of spending the box on a compile
        self.graph_s = {"decode": (35.0, 20.0), "prefill": (400.0, 25.0)}
        self.est_s = (2 * 35.0, 45.0)
        self.model, self.graphs, self._static = None, set(), None

    @staticmethod
    def _graph(point: Point) -> str:
        """The Dynamo graph a point's first call compiles: one per decode batch and one per prefill batch of prompts
        (static shapes, see `prepare`), the prefill's token dimension marked dynamic (one graph for every size)."""
        return f"decode B={point.batch}" if point.kind == "decode" else f"{point.kind} S={point.seqs}"

    def first_call_s(self, point: Point, cuda: bool) -> float:
        """The compile estimate of a point whose graph no measured point compiled yet (the thirteenth session's run:
        tc-ro's first prefill ran 100 s past its box); 0 once one was."""
        if self._graph(point) in self.graphs or point.kind not in self.graph_s:
            return 0.0
        return self.graph_s[point.kind][0 if cuda else 1]

    def compiled(self, point: Point) -> None:
        self.graphs.add(self._graph(point))

    def prepare(self) -> None:
        torch._dynamo.reset()
        self.graphs = set()
        # a decode batch is one static graph (the batch a user's server would capture), not a dynamic recompile at
        # the second batch: 30 s instead of 62-67 s on the H200, and the fastest code for each batch
        self._static = torch._dynamo.config.patch(automatic_dynamic_shapes=False)
        self._static.__enter__()
        if self.s.peer_backend == "inductor":
            self.model = torch.compile(self.s.hf, mode=None if self.mode == "default" else self.mode)
        else:
            self.model = torch.compile(self.s.hf, backend=self.s.peer_backend)
            self.notes.append(f"compiled with backend={self.s.peer_backend!r} (mode {self.mode!r} not applied)")

    def step(self, point: Point):
        _goal_rows_only(self.name, point, self.s.plan)
        return super().step(point)

    def prefill(self, point: Point):
        ids = _batched(point, self.s)
        if ids.shape[1] > 1:
            torch._dynamo.maybe_mark_dynamic(ids, 1)  # one graph for every token count, as hattn gets
        return lambda: _infer(self.model, input_ids=ids, use_cache=False, logits_to_keep=1)  # as hattn: last rows

    def decode(self, point: Point):
        cache, last = self._filled_cache(point, static=True)
        pos = torch.tensor([point.context], device=self.s.device)
        return lambda: _infer(self.model, input_ids=last, past_key_values=cache, cache_position=pos, use_cache=True)

    def e2e(self, point: Point):
        raise Skip("generate with torch.compile is the hf-static peer (transformers compiles the decode step)")

    def close(self) -> None:
        self.model, self.graphs = None, set()
        if self._static is not None:
            self._static.__exit__(None, None, None)
            self._static = None
        torch._dynamo.reset()


PEERS = ("hf-static", "tc-ro", "tc-default", "hf-eager-fla", "hf-eager")


def make_peer(name: str, setup: Setup) -> Target:
    if name in ("hf-eager-fla", "hf-eager"):
        return HFEager(setup, fla=name == "hf-eager-fla")
    if name == "hf-static":
        return HFStatic(setup)
    if name in ("tc-default", "tc-ro"):
        return TorchCompile(setup, "default" if name == "tc-default" else "reduce-overhead")
    raise ValueError(f"unknown peer {name!r}; peers: {', '.join(PEERS)}")
