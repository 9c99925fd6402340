"""The `hattn` Dynamo backend: guard -> split -> compile pieces -> hand to the runtime of the mode.

    torch.compile(model, backend="hattn", mode="pcg")                    # entry point, no import needed
    torch.compile(model, backend="hattn", options={"mode": "bcg", "capture_sizes": [1, 2, 4]})
    torch.compile(model, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4]))
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import time
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import TracingContext, detect_fake_mode

from hattn.compiler import snapshot
from hattn.compiler.artifacts import keep_kernels_in, load_entry, same_triton_toolchain
from hattn.compiler.config import Config
from hattn.compiler.dispatch import Traced, input_sources, learning, one_token_dims, symbolic_sizes, whole_frame
from hattn.compiler.inference import NoBackward, drop_grad_mode_switches, output_inputs
from hattn.compiler.signature import signature
from hattn.passes.fuse_linears import FusedWeightsGuard, fuse_linears
from hattn.passes.guards import (AsRegistered, check_no_unregistered_attention, check_split_ops_outside_contexts,
                                 check_split_ops_present)
from hattn.passes.small_m_linears import route_small_m_linears
from hattn.passes.split import split_graph
from hattn.counters import Stats, register

log = logging.getLogger("hattn")


# Where inductor's combo_kernels (independent kernels of a piece launched as one: q's and k's norms, the gates'
# activations) is on: "static" (pieces on CUDA whose shapes are all static: the one-token decode graph), "all" (every
# CUDA piece) or "off". Measured in one process on the H100 (session 48, scripts/inductor_config_ab.py, full mode,
# ctx 1024, logits bit for bit the same): decode B=1 1.086 -> 1.057 ms (340 -> 298 kernels), B=16 1.797 -> 1.726
# (426 -> 383), but a 1024-token prefill 5.81 -> 5.96 ms (GPU busy +2%): the dynamic pieces serve prefill too.
COMBO_KERNELS = "static"


def _piece_options(args: list) -> dict:
    if COMBO_KERNELS == "off" or not any(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
        return {}
    static = not any(isinstance(n, torch.SymInt) for a in args
                     for n in (a.shape if isinstance(a, torch.Tensor) else (a,)))
    return {"combo_kernels": True} if static or COMBO_KERNELS == "all" else {}


def _compile_piece(piece: fx.GraphModule, args: list) -> Callable:
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    from hattn.kernels import pdl

    tagged = pdl.compiler_options()
    options = {**_piece_options(args), **pdl.inductor_options()}
    with inductor_config.patch(options), (
            torch.compiler.config.patch(tagged) if tagged else contextlib.nullcontext()):
        return compile_fx(piece, args)


def _traced_fake(x, node: fx.Node, fake_mode):
    """The fake of a Dynamo graph input with the symbols Dynamo traced it with (as AOTAutograd fakeifies inputs).

    Dynamo's example inputs are real: on torch 2.11 the token-count placeholder (a SymInt) arrives as a plain int,
    and a bare `fake_mode.from_tensor(x)` may give static sizes. Running the pieces on either guards the token count
    to a constant, and Dynamo then rejects every mark_dynamic'd batch after the first (seen on the H100). So a SymInt
    placeholder gets its traced SymInt, and a tensor whose fake lacks the symbols of the placeholder's example value
    gets an empty fake of that symbolic shape (pieces are compiled from shapes, dtypes and strides only).
    """
    traced = node.meta.get("example_value", node.meta.get("val"))
    if not isinstance(x, torch.Tensor):  # torch 2.11 passes a SymInt placeholder's example input as a plain int
        return traced if isinstance(traced, torch.SymInt) else x
    context = source = None
    tracing = TracingContext.try_get()
    if tracing is not None and x in tracing.tensor_to_context:
        context = tracing.tensor_to_context[x]
        source = context.tensor_source
    fake = fake_mode.from_tensor(x, static_shapes=False, symbolic_context=context, source=source)
    if isinstance(traced, torch.Tensor) and _symbolic_dims(traced) - _symbolic_dims(fake):
        with fake_mode:
            fake = torch.empty_strided(traced.shape, traced.stride(), dtype=traced.dtype, device=traced.device)
    return fake


def _symbolic_dims(t: torch.Tensor) -> set[int]:
    return {i for i, n in enumerate(t.shape) if isinstance(n, torch.SymInt)}


class _CompilePieces(fx.Interpreter):
    """Runs the split graph on Dynamo's (fake) example inputs, compiling each piece with the inputs it receives.

    A piece with the signature of an earlier one (the same code on inputs of the same shapes: most of the layers'
    pieces, which differ only in their parameters) reuses that piece's compiled callable instead of compiling, and
    on fake inputs it does not run either: its outputs are made as the earlier piece's were (`_Returned`).
    """

    def __init__(self, split_gm: fx.GraphModule, stats: Stats, progress: bool, fake_mode=None):
        from tqdm.auto import tqdm

        super().__init__(split_gm)
        self.stats, self.compiles, self.seconds = stats, 0, 0.0  # this graph's compiles and their seconds
        self.compiled: dict[str, Callable] = {}  # signature -> compiled callable
        self.returned: dict[str, _Returned | None] = {}  # signature -> what its first piece returned
        pieces = len(split_gm.graph.find_nodes(op="call_module"))
        self.bar = tqdm(total=pieces, desc="hattn compile", unit="piece", disable=not progress)
        self.fake_mode = fake_mode

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)  # a real tensor (e.g. a fused weight): fake under fake mode
        # static, as Dynamo makes parameters: torch 2.11 gives a tensor without a source symbolic dims named by
        # how many tensors the fake mode met before, which differs in a warm start's compile (its pieces then
        # missed torch's cache on the H100: [192, s32] cold, [192, s61] warm)
        if self.fake_mode is None or not isinstance(value, torch.Tensor):  # a higher-order op's body (torch.cond)
            return value
        return self.fake_mode.from_tensor(value, static_shapes=True)

    def call_module(self, target, args, kwargs):
        from torch._inductor import config as inductor_config

        piece = self.fetch_attr(target)
        key = signature(piece, args)
        # no signature: nothing structural vouches for the piece; freezing: parameters' values become code
        if key is None or inductor_config.freezing:
            out, fn = piece(*args), self._compile(piece, list(args))
        else:
            returned = self.returned.get(key) if self.fake_mode is not None else None
            if returned is not None:
                out = returned.made_for(args)
            else:  # its signature once it ran: the run may unify symbols (later pieces' inputs share sizes then)
                before = _metadata(args)
                out = piece(*args)
                key = signature(piece, args)
            if key not in self.compiled:
                self.compiled[key] = self._compile(piece, list(args))
                self.returned[key] = _Returned.of(out, args, before) if self.fake_mode is not None else None
            fn = self.compiled[key]
        self.module.register_module(target, _Compiled(fn))
        self.bar.update()
        return out

    def _compile(self, piece: fx.GraphModule, args: list) -> Callable:
        from torch._dynamo.utils import counters

        if _returns_a_float(piece):
            # inductor cannot return a Python float (its graph outputs are tensors and ints). Dynamo passes a float
            # attribute whose value changed between two compiles of one frame (the attention scale of a second
            # model family in the process) as a tensor input, and a piece turns it back into the float a split op
            # takes: that piece runs as traced FX code (in a graph mode, inside the graph like any piece)
            log.debug("hattn: a piece returns a float: run as traced code, not compiled by inductor")
            return piece
        s, hits = self.stats, counters["aot_autograd"]["autograd_cache_hit"]
        start = time.perf_counter()
        fn = _compile_piece(piece, args)
        seconds = time.perf_counter() - start
        self.compiles, self.seconds = self.compiles + 1, self.seconds + seconds
        s.pieces_compiled += 1
        s.pieces_from_cache += counters["aot_autograd"]["autograd_cache_hit"] - hits
        s.compile_seconds += seconds
        s.piece_compile_seconds.append(seconds)
        self.bar.set_postfix(compiled=self.compiles)
        return fn


def _returns_a_float(piece: fx.GraphModule) -> bool:
    (output,) = piece.graph.find_nodes(op="output")
    values = [n.meta.get("example_value", n.meta.get("val")) for n in tree_leaves(output.args)
              if isinstance(n, fx.Node)]
    return any(isinstance(v, (float, torch.SymFloat)) for v in values)


@dataclasses.dataclass(frozen=True)
class _Made:
    """A tensor a piece returned: input `index` itself ("same"), a view (size, stride, offset) of its storage
    ("input"), or of fresh storage `index` of `elements` elements ("fresh"; outputs that shared one share it again),
    a view there only if it was one, of the output it viewed (`base`: AOTAutograd builds an aliased input's base
    from `_base`)."""

    owner: str
    index: int
    elements: Any
    size: tuple
    stride: tuple
    offset: Any
    dtype: torch.dtype
    device: torch.device
    view: bool
    base: int | None = None  # the output (leaf index) that is this view's `_base`


@dataclasses.dataclass
class _Returned:
    """What a piece returned on fake inputs, so that a piece of the same signature (the same code on inputs of the
    same sizes, strides, offsets and storage sharing) returns the same fakes without running it again."""

    spec: Any
    leaves: list  # per output leaf: a _Made, or the non-tensor value itself

    @classmethod
    def of(cls, out, args, before: list) -> _Returned | None:
        """None unless the run left its inputs' metadata as it was (`before`: `_metadata(args)`) and every tensor
        returned is a plain fake (no conj/neg bit, no constant, no unbacked size) that is an input, views one of its
        dtype, or views fresh storage of one dtype without needing grad."""
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        flat, spec = tree_flatten(out)
        if _metadata(args) != before or _unbacked([x for x in flat if not isinstance(x, torch.Tensor)]):
            return None
        inputs = {StorageWeakRef(a.untyped_storage()): k for k, a in enumerate(args) if isinstance(a, torch.Tensor)}
        fresh: dict = {}  # storage -> (its index, the dtype of its first view)
        leaves = []
        for x in flat:
            if not isinstance(x, torch.Tensor):
                leaves.append(x)
                continue
            if (not isinstance(x, FakeTensor) or x.is_conj() or x.is_neg() or x.constant is not None
                    or _unbacked([*x.shape, *x.stride(), x.storage_offset()])):
                return None
            storage = StorageWeakRef(x.untyped_storage())
            if storage in inputs:
                index = next((k for k, a in enumerate(args) if a is x), inputs[storage])
                owner, dtype = ("same" if args[index] is x else "input"), args[index].dtype
            elif x.requires_grad:  # a view of an input needing grad (a parameter passed through) needs it again
                return None
            else:
                owner, (index, dtype) = "fresh", fresh.setdefault(storage, (len(fresh), x.dtype))
            if dtype != x.dtype:
                return None
            base = next((j for j, y in enumerate(flat) if y is x._base), None) if x._base is not None else None
            leaves.append(_Made(owner, index, x.untyped_storage().nbytes() // x.element_size(), tuple(x.shape),
                                tuple(x.stride()), x.storage_offset(), x.dtype, x.device, x._base is not None, base))
        return cls(spec, leaves)

    def made_for(self, args):
        """The outputs the recorded piece would return on `args` (fakes; the caller's fake mode is active)."""
        from torch.utils._pytree import tree_unflatten

        fresh, flat = {}, [None] * len(self.leaves)
        # outputs that are some output's view come after it: their base is made first
        for j in sorted(range(len(self.leaves)), key=lambda j: getattr(self.leaves[j], "base", None) is not None):
            leaf = self.leaves[j]
            flat[j] = self._made(leaf, args, fresh, flat) if isinstance(leaf, _Made) else leaf
        return tree_unflatten(flat, self.spec)

    @staticmethod
    def _made(m: _Made, args, fresh: dict, outputs: list) -> torch.Tensor:
        if m.owner == "same":
            return args[m.index]
        if m.owner == "input":
            return args[m.index].as_strided(m.size, m.stride, m.offset)
        if m.index not in fresh:
            fresh[m.index] = torch.empty((m.elements,), dtype=m.dtype, device=m.device)
        if m.view:
            base = outputs[m.base] if m.base is not None else fresh[m.index]
            return base.as_strided(m.size, m.stride, m.offset)
        shared = torch.empty((0,), dtype=m.dtype, device=m.device).set_(fresh[m.index])  # its storage, not a view
        return shared.as_strided_(m.size, m.stride, m.offset)


def _metadata(args) -> list:
    """What a piece's run must not change of its inputs for its outputs to be made for another piece."""
    return [(x.shape, x.stride(), x.storage_offset(), x.untyped_storage()._cdata) if isinstance(x, torch.Tensor)
            else None for x in args]


def _unbacked(values) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    return any(isinstance(v, torch.SymInt) and free_unbacked_symbols(v) for v in values)


class _Compiled(torch.nn.Module):
    """A compiled piece as a submodule of the split graph (the runtime calls it like the piece). `boxed(inputs)`,
    where inductor compiled it: the same call with the inputs in a list it empties, so that the piece's code frees
    each input at its last use (`hattn.runtime.freeing`); None otherwise."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn
        self.boxed = _boxed(fn)

    def forward(self, *args):
        return self.fn(*args)


def _boxed(fn: Callable) -> Callable[[list], Any] | None:
    """`fn`'s call taking its inputs in a list that it empties, or None. inductor's compiled code frees each input
    at its last use once it owns the only reference, but AOTAutograd's forward (what compile_fx returns, under
    `torch._dynamo.disable`'s wrapper) takes `*runtime_args`, a tuple that holds every input until it returns.
    Its boxed inner function (`compiled_fn`, called with the parameters and the inputs in one list it empties)
    is reached through the closure, as torch 2.11-2.13 build it. Only the disable wrapper is stepped through: any
    other layer (compile_fx's wrapper that unpacks a one-tensor result, say) does work the boxed call would skip,
    so it gives None, as does any other shape."""
    if getattr(fn, "__code__", None) is _disable_wrapper_code():
        fn = getattr(fn, "__wrapped__", None)
    code = getattr(fn, "__code__", None)
    if code is None or code.co_name != "forward" or not code.co_flags & inspect.CO_VARARGS:
        return None
    cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
    params = cells.get("params_buffers_flat", cells.get("params_flat"))
    if "compiled_fn" not in cells or params is None:
        return None
    inner, leading = cells["compiled_fn"].cell_contents, params.cell_contents
    if not callable(inner) or not isinstance(leading, (list, tuple)):
        return None

    @torch._dynamo.disable
    def boxed(inputs: list):
        full = [*leading, *inputs]
        inputs.clear()
        return inner(full)

    return boxed


@functools.cache
def _disable_wrapper_code():
    """The code object of every `torch._dynamo.disable` wrapper (one function, a closure per wrapped callable)."""
    return getattr(torch._dynamo.disable(lambda: None), "__code__", None)


def count_collectives(gm: fx.GraphModule) -> int:
    """Collective ops in the graph (tensor parallel's all-reduces and all-gathers; not their waits): they sit in
    pieces, so graph modes capture them."""
    names = (n.target._qualified_op_name for n in gm.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverloadPacket))
    return sum(1 for name in names if name.startswith("_c10d_functional::") and not name.endswith("::wait_tensor"))


def _dynamo_seconds() -> float:
    """Seconds since Dynamo began compiling the frame whose graph the backend got (0 when called outside Dynamo)."""
    from torch._dynamo.utils import get_metrics_context

    metrics = get_metrics_context()
    start_ns = getattr(metrics, "_start_time_ns", 0)  # private: a torch that renames it gives 0, never an error
    return (time.time_ns() - start_ns) / 1e9 if metrics.in_progress() and start_ns else 0.0


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config, stats: Stats,
                  fake_mode=None, load_seconds: float = 0.0, pools=None) -> Traced:
    """Guard, fuse linears, split and compile one Dynamo graph; return what the mode's runtime serves it with.
    `fake_mode`: the fake mode of `gm`'s example values when its inputs are real and Dynamo is not tracing (a
    warm-start snapshot, read in `load_seconds`: the pieces compile from those values, with the traced symbols).
    A graph mode's graph compiles and runs for inference (`inference.NoBackward`)."""
    if not config.uses_graphs:
        return _compile_graph(gm, example_inputs, config, stats, fake_mode, load_seconds, pools)
    sources = output_inputs(gm)
    drop_grad_mode_switches(gm)
    with torch.no_grad():
        traced = _compile_graph(gm, example_inputs, config, stats, fake_mode, load_seconds, pools)
    traced.fn = NoBackward(traced.fn, sources)
    return traced


def _compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config, stats: Stats,
                   fake_mode, load_seconds: float, pools) -> Traced:
    stats.dynamo_seconds += _dynamo_seconds()
    if fake_mode is not None:
        stats.graphs_from_snapshots += 1
        stats.snapshot_load_seconds += load_seconds
    sources, code, sizes = input_sources(gm), whole_frame(gm), symbolic_sizes(gm)  # before the passes touch the graph
    same_triton_toolchain()  # before any kernel compiles: Triton's keys alike in every process (cache_dir or not)
    entry = graph = None
    if config.cache_dir is not None:
        keep_kernels_in(config.cache_dir)
        if config.inner_compiler == "inductor":  # "eager" compiles nothing to keep: only the snapshot below
            entry = load_entry(gm, example_inputs, config, stats)
        if fake_mode is None and code is not None and learning():  # a kind a dispatcher may learn and snapshot
            start = time.perf_counter()
            graph = snapshot.keep_graph(gm, example_inputs, sizes)
            stats.snapshot_save_seconds += time.perf_counter() - start
        snapshot.renew_names(gm)
    start = time.perf_counter()
    check_no_unregistered_attention(gm)  # first: a rejected graph leaves the user's parameters untouched
    check_split_ops_outside_contexts(gm)
    check_split_ops_present(gm, example_inputs, config.mode, config.uses_graphs)
    # with "eager" the pieces run as traced FX code: no fake run. The fakes are made before fuse_linears rebinds
    # parameters: a rebound one's storage offset contradicts the one Dynamo traced it with.
    piece_inputs = _piece_inputs(gm, example_inputs, fake_mode) if config.inner_compiler == "inductor" else None
    if config.fuse_linears:
        stats.fused_linears += fuse_linears(gm, example_inputs)
    if config.small_m_gemm:
        stats.small_m_linears += route_small_m_linears(gm, example_inputs, gated=config.gated_mlp)
    split_gm, info = split_graph(gm)
    stats.split_seconds += time.perf_counter() - start
    stats.graphs_compiled += 1
    stats.pieces += len(info.pieces)
    stats.split_ops += len(info.split_nodes)
    stats.collectives += count_collectives(gm)
    if piece_inputs is not None:
        _compile_pieces(split_gm, *piece_inputs, config, stats)
    log.debug("hattn: %d pieces, %d split ops, mode=%s", len(info.pieces), len(info.split_nodes), config.mode)
    from hattn.runtime import build_runtime

    runtime = FusedWeightsGuard.wrap(build_runtime(config, split_gm, example_inputs, stats, pools), gm,
                                     example_inputs)
    runtime = AsRegistered.wrap(runtime, gm, full=config.mode == "full")
    shape_env = getattr(fake_mode or detect_fake_mode(example_inputs), "shape_env", None)
    dynamic = one_token_dims(sizes, shape_env)  # after compiles
    return Traced(runtime if entry is None else entry.keep(runtime, stats), sources, code, dynamic, graph)


def _piece_inputs(gm: fx.GraphModule, example_inputs: list, fake_mode=None) -> tuple:
    """(Dynamo's fake mode, the fakes of the graph inputs), or (None, the real inputs) outside Dynamo (tests). With
    `fake_mode` (a snapshot's graph), the placeholders' own example values, which carry the traced symbols."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    if fake_mode is not None:
        return fake_mode, [n.meta["example_value"] for n in placeholders]
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return None, example_inputs
    return fake_mode, [_traced_fake(x, n, fake_mode) for x, n in zip(example_inputs, placeholders, strict=True)]


def _compile_pieces(split_gm: fx.GraphModule, fake_mode, inputs: list, config: Config, stats: Stats) -> None:
    """Compile the split graph's pieces in place (each piece submodule becomes its compiled callable)."""
    run = _CompilePieces(split_gm, stats, config.progress, fake_mode)
    start = time.perf_counter()
    try:
        if fake_mode is None:
            run.run(*inputs)
        else:
            # the python dispatcher, as Dynamo traces: without it some CUDA kernels' C++ decompositions (linear on
            # a 3-d input) call aten.size, whose fake handler guards every symbolic size to its example value
            with fake_mode, enable_python_dispatcher():
                run.run(*inputs)
    finally:
        run.bar.close()
    stats.fake_run_seconds += time.perf_counter() - start - run.seconds


class HattnBackend:
    """A configured backend: `torch.compile(m, backend=hattn.backend(mode="pcg", capture_sizes=[...]))`.

    Its `stats` add up every graph it compiled (more than one graph means Dynamo graph breaks).
    """

    def __init__(self, config: Config):
        from hattn.runtime.graphs import GraphPools

        self.config = config
        self.graph_stats: list[Stats] = []
        # one graph pool for the runtimes of all its graphs (per stream); HATTN_SHARED_POOLS=0: a pool per runtime
        self.pools = GraphPools() if os.environ.get("HATTN_SHARED_POOLS", "1") != "0" else None

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        return self._counted(compile_graph, gm, example_inputs, self.config_for(kwargs), pools=self.pools)

    def config_for(self, kwargs: dict) -> Config:
        """The config a compile uses: this backend's, with the mode / options torch.compile passed merged in."""
        if not kwargs:
            return self.config
        return Config.from_options(None, {**dataclasses.asdict(self.config), **_merge(kwargs)})

    def _counted(self, compile_fn, *args, **kwargs) -> Callable:
        """compile_fn(*args, stats), its Stats counted only once it succeeds: Dynamo may abandon an attempt and
        trace again (e.g. TensorifyScalarRestartAnalysis when inductor specializes a float), which is one graph."""
        stats = Stats()
        fn = compile_fn(*args, stats, **kwargs)
        self.graph_stats.append(register(stats))
        return fn

    @property
    def stats(self) -> Stats:
        total = Stats()
        for s in self.graph_stats:
            total.add(s)
        return total


def _merge(kwargs: dict) -> dict:
    merged = dict(kwargs.get("options") or {})
    if kwargs.get("mode") not in (None, "default"):
        merged["mode"] = kwargs["mode"]
    return merged


def backend(mode: str = "pcg", **options: Any) -> HattnBackend:
    """A hattn backend configured with `mode` and options (inner_compiler, capture_sizes, lazy_capture, progress,
    cache_dir: see Config)."""
    return HattnBackend(Config.from_options(mode, options))


def compiled_config(model) -> Config | None:
    """The hattn Config a model was compiled with: `torch.compile(m, backend=hattn.backend(...))`,
    `torch.compile(m, backend="hattn", mode=..., options=...)` or anything with a `hattn_config` (hattn.compile's
    model); None for any other model (eager, another backend)."""
    config = getattr(model, "hattn_config", None)
    if isinstance(config, Config):
        return config
    backend_fn, kwargs = _backend_of(model)
    if isinstance(backend_fn, HattnBackend):
        return backend_fn.config_for(kwargs)
    if backend_fn is hattn_backend:
        return Config.from_options(kwargs.get("mode"), kwargs.get("options"))
    return None


def compile_for(model) -> Callable[..., Traced] | None:
    """`compile(gm, example_inputs, fake_mode, load_seconds)`, compiling a Dynamo graph as the backend of
    torch.compile'd `model` would, its stats counted where that backend's are; None for a model hattn did not
    compile."""
    config = compiled_config(model)
    if config is None or not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return None
    backend = backend_object(model)
    counted = backend._counted if backend is not None else _registered
    pools = backend.pools if backend is not None else None

    def compile_(gm, example_inputs, fake_mode, load_seconds=0.0):
        return counted(compile_graph, gm, example_inputs, config, fake_mode=fake_mode, load_seconds=load_seconds,
                       pools=pools)

    return compile_


def backend_object(model) -> HattnBackend | None:
    """The HattnBackend object `model` was torch.compile'd with (`backend=hattn.backend(...)`), else None."""
    backend_fn, _ = _backend_of(model)
    return backend_fn if isinstance(backend_fn, HattnBackend) else None


def _backend_of(model) -> tuple[Any, dict]:
    """(the backend torch.compile was given, its mode/options kwargs) of an OptimizedModule; (None, {}) else."""
    if not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return None, {}
    fn = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    while hasattr(fn, "_torchdynamo_orig_backend"):  # torch's wrappers around the backend it was given
        fn = fn._torchdynamo_orig_backend
    return getattr(fn, "compiler_fn", fn), getattr(fn, "kwargs", None) or {}  # torch's wrapper of mode / options


def step_token_limit(model) -> int | None:
    """The most tokens one step of a hattn-compiled model in a graph mode serves from its graphs (the largest
    capture size; a longer step runs graph-free); None where no such limit applies."""
    config = compiled_config(model)
    return max(config.capture_sizes) if config is not None and config.uses_graphs else None


def hattn_backend(gm: fx.GraphModule, example_inputs: list, mode: str | None = None, options: dict | None = None):
    """The function registered as torch.compile backend "hattn" (entry point group torch_dynamo_backends)."""
    return _registered(compile_graph, gm, example_inputs, Config.from_options(mode, options))


def _registered(compile_fn, *args, **kwargs) -> Callable:
    """compile_fn(*args, stats), its Stats counted in the process-wide totals once it succeeds."""
    stats = Stats()
    fn = compile_fn(*args, stats, **kwargs)
    register(stats)
    return fn
