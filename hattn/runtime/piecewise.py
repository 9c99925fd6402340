"""Mode "pcg": piecewise CUDA graphs. Each compiled piece gets one CUDA graph per capture size; split ops run
eagerly between the graphs; all graphs of all pieces and sizes share one memory pool.

A piece's graph reads its inputs at the addresses seen at capture: outputs of the previous piece's graph (pool
memory, fixed), parameters (fixed) and the padded static inputs (fixed). An input at a new address (e.g. what a
functional split op returned) is copied into the captured tensor before replay.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from hattn.counters import Stats
from hattn.registry import Mode, register_mode
from hattn.runtime.graph_free import direct_split_ops, graph_free
from hattn.runtime.graphs import CapturedGraph, GraphRuntime, capture_graph, served_layout, storage_ptr, weak_ref
from hattn.runtime.tokens import TokenLayout


class _PieceGraphs(torch.nn.Module):
    """One compiled piece and its CUDA graphs, one per size; what it does depends on the runtime's phase."""

    def __init__(self, fn, runtime: "PiecewiseRuntime"):
        super().__init__()
        self.fn, self.runtime = fn, runtime
        self.graphs: dict[int, CapturedGraph] = {}

    def forward(self, *args):
        phase, size = self.runtime.phase, self.runtime.size
        if phase == "eager":
            return self.fn(*args)
        if phase == "capture":
            return self._capture(size, args)
        return self.graphs[size].replay(args)

    def _capture(self, size: int, args):
        graph, out = capture_graph(self.fn, list(args), size, self.runtime.pool)
        # what earlier graphs of this size produced is pool memory: keep weak references, so the next size's
        # capture can reuse it; anything else (inputs, eager split-op results) stays owned here
        pooled = self.runtime.pooled
        graph.inputs = [weak_ref(a) if storage_ptr(a) in pooled else a for a in args]
        pooled.update(storage_ptr(o) for o in (out if isinstance(out, (tuple, list)) else [out]))
        self.graphs[size] = graph
        self.runtime.stats.cuda_graphs += 1
        return out


class PiecewiseRuntime(GraphRuntime):
    """Runs a split graph whose pieces replay CUDA graphs (see module docstring)."""

    name = "pcg"

    def __init__(self, split_gm: fx.GraphModule, layout: TokenLayout, sizes, stats: Stats, progress: bool = True):
        super().__init__(self._run_eager, layout, sizes, stats, progress)
        self.split_gm, self.phase, self.size = direct_split_ops(split_gm), "eager", 0
        self.pooled: set[int] = set()  # storages allocated by the graphs of the size being captured
        names = [n.target for n in split_gm.graph.nodes if n.op == "call_module"]
        self.pieces = [_PieceGraphs(split_gm.get_submodule(name), self) for name in names]
        for name, piece in zip(names, self.pieces):
            split_gm.register_module(name, piece)

    def _run(self, phase: str, size: int, args):
        self.phase, self.size = phase, size
        try:
            return self.split_gm(*args)
        finally:
            self.phase = "eager"

    def _run_eager(self, *args):
        return self._run("eager", 0, args)

    def capture(self, size: int, args: list) -> None:
        self._run("eager", size, args)  # warm the split ops too
        self.pooled = set()
        self._run("capture", size, args)
        self.pooled = set()

    def replay(self, size: int, args: list):
        return self._run("replay", size, args)

    def release(self) -> None:
        for piece in self.pieces:
            piece.graphs.clear()
        super().release()


def build(config, split_gm, example_inputs, stats):
    layout = served_layout("pcg", split_gm, example_inputs, stats)
    if layout is None:
        return graph_free(split_gm, stats)
    return PiecewiseRuntime(split_gm, layout, config.capture_sizes, stats, config.progress)


register_mode(Mode("pcg", "piecewise CUDA graphs: one graph per piece per capture size, split ops eager between them",
                   graphs=True, build=build))
