"""The `hattn` Dynamo backend: guard -> split -> compile pieces -> hand to the runtime of the mode.

    torch.compile(model, backend="hattn", mode="pcg")                    # entry point, no import needed
    torch.compile(model, backend="hattn", options={"mode": "bcg", "capture_sizes": [1, 2, 4]})
    torch.compile(model, backend=hattn.backend(mode="pcg", capture_sizes=[1, 2, 4]))
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import TracingContext, detect_fake_mode

from hattn.compiler.config import Config
from hattn.passes.fuse_linears import fuse_linears
from hattn.passes.guards import check_no_unregistered_attention, check_split_ops_present
from hattn.passes.split import split_graph
from hattn.counters import Stats, new_stats

log = logging.getLogger("hattn")


def _compile_piece(piece: fx.GraphModule, args: list) -> Callable:
    from torch._inductor.compile_fx import compile_fx

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
    """Runs the split graph on Dynamo's (fake) example inputs, compiling each piece with the inputs it receives."""

    def __init__(self, module: fx.GraphModule, fake_mode=None):
        super().__init__(module)
        self.fake_mode = fake_mode

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)  # a real tensor (e.g. a fused weight): fake under fake mode
        return self.fake_mode.from_tensor(value) if self.fake_mode is not None else value

    def call_module(self, target, args, kwargs):
        piece = self.fetch_attr(target)
        out = piece(*args)
        self.module.register_module(target, _Compiled(_compile_piece(piece, list(args))))
        return out


class _Compiled(torch.nn.Module):
    """A compiled piece as a submodule of the split graph (the runtime calls it like the piece)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def count_collectives(gm: fx.GraphModule) -> int:
    """Collective ops in the graph (tensor parallel's all-reduces and all-gathers; not their waits): they sit in
    pieces, so graph modes capture them."""
    names = (n.target._qualified_op_name for n in gm.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverloadPacket))
    return sum(1 for name in names if name.startswith("_c10d_functional::") and not name.endswith("::wait_tensor"))


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config, stats: Stats) -> Callable:
    """Guard, fuse linears, split and compile one Dynamo graph; return what the mode's runtime serves it with."""
    check_no_unregistered_attention(gm)  # first: a rejected graph leaves the user's parameters untouched
    check_split_ops_present(gm, example_inputs, config.mode, config.uses_graphs)
    # with "eager" the pieces run as traced FX code: no fake run. The fakes are made before fuse_linears rebinds
    # parameters: a rebound one's storage offset contradicts the one Dynamo traced it with.
    piece_inputs = _piece_inputs(gm, example_inputs) if config.inner_compiler == "inductor" else None
    if config.fuse_linears:
        stats.fused_linears += fuse_linears(gm, example_inputs)
    split_gm, info = split_graph(gm)
    stats.graphs_compiled += 1
    stats.pieces += len(info.pieces)
    stats.split_ops += len(info.split_nodes)
    stats.collectives += count_collectives(gm)
    if piece_inputs is not None:
        _compile_pieces(split_gm, *piece_inputs)
    log.debug("hattn: %d pieces, %d split ops, mode=%s", len(info.pieces), len(info.split_nodes), config.mode)
    from hattn.runtime import build_runtime

    return build_runtime(config, split_gm, example_inputs, stats)


def _piece_inputs(gm: fx.GraphModule, example_inputs: list) -> tuple:
    """(Dynamo's fake mode, the fakes of the graph inputs), or (None, the real inputs) outside Dynamo (tests)."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        return None, example_inputs
    placeholders = gm.graph.find_nodes(op="placeholder")
    return fake_mode, [_traced_fake(x, n, fake_mode) for x, n in zip(example_inputs, placeholders, strict=True)]


def _compile_pieces(split_gm: fx.GraphModule, fake_mode, inputs: list) -> None:
    if fake_mode is None:
        _CompilePieces(split_gm).run(*inputs)
        return
    # the python dispatcher, as Dynamo traces: without it some CUDA kernels' C++ decompositions (linear on a
    # 3-d input) call aten.size, whose fake handler guards every symbolic size to its example value
    with fake_mode, enable_python_dispatcher():
        _CompilePieces(split_gm, fake_mode).run(*inputs)


class HattnBackend:
    """A configured backend: `torch.compile(m, backend=hattn.backend(mode="pcg", capture_sizes=[...]))`.

    Its `stats` add up every graph it compiled (more than one graph means Dynamo graph breaks).
    """

    def __init__(self, config: Config):
        self.config = config
        self.graph_stats: list[Stats] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
        config = self.config
        if kwargs:
            config = Config.from_options(None, {**dataclasses.asdict(self.config), **_merge(kwargs)})
        stats = new_stats()
        self.graph_stats.append(stats)
        return compile_graph(gm, example_inputs, config, stats)

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
    """A hattn backend configured with `mode` and options (inner_compiler, capture_sizes, progress)."""
    return HattnBackend(Config.from_options(mode, options))


def hattn_backend(gm: fx.GraphModule, example_inputs: list, mode: str | None = None, options: dict | None = None):
    """The function registered as torch.compile backend "hattn" (entry point group torch_dynamo_backends)."""
    config = Config.from_options(mode, options)
    return compile_graph(gm, example_inputs, config, new_stats())
