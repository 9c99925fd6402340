"""Mode "pcg": piecewise CUDA graphs. Each compiled piece gets one CUDA graph per capture size; split ops run
eagerly between the graphs; all graphs of all pieces and sizes share one memory pool.

A piece's graph reads its inputs at the addresses seen at capture: outputs of the previous piece's graph (pool
memory, fixed), parameters (fixed) and the padded static inputs (fixed). An input at a new address (e.g. what a
functional split op returned) is copied into the captured tensor before replay.

A size's first replay runs the split graph's Python code and records what it did: each piece's graph replay and
each split-op call site with its arguments (`_Plan`). Its later replays with the same inputs run that list, not the
split graph (its nn.Module calls, argument copies and checks: host time a decode step waits for), when every split
op of the graph returns nothing: then the same inputs mean the same calls.
"""
from __future__ import annotations

import functools
import operator
import os

import torch
import torch.fx as fx

from hattn.context import get_forward_context
from hattn.counters import Stats
from hattn.registry import Mode, prepare_of, register_mode, returns_nothing, split_op_of
from hattn.runtime import graphs, stitch
from hattn.runtime.freeing import run_freeing
from hattn.runtime.graph_free import direct_split_ops, graph_free
from hattn.runtime.graphs import (CapturedGraph, GraphRuntime, capture_graph, copy_if_moved, served_layout,
                                  storage_ptr, weak_ref)
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
        graph = self.graphs[size]
        out = graph.replay(args)
        if self.runtime.recording is not None:
            self.runtime.recording.record_piece(graph, args)
        return out

    def boxed(self, inputs: list):
        """forward(*inputs), emptying `inputs` (`run_freeing` calls pieces so during a capture): a capture then
        holds no input of the piece past its last use inside it, and the pool can give that memory to the piece's
        later buffers."""
        if self.runtime.phase == "capture":
            return self._capture(self.runtime.size, inputs, boxed=getattr(self.fn, "boxed", None))
        args = tuple(inputs)
        inputs.clear()
        return self.forward(*args)

    def _capture(self, size: int, args, boxed=None):
        # what earlier graphs of this size produced is pool memory: the graph keeps weak references, so later
        # pieces and the next size's capture can reuse it; anything else (inputs, eager split-op results) stays owned
        pooled = self.runtime.pooled
        inputs = [weak_ref(a) if storage_ptr(a) in pooled else a for a in args]
        args = args if boxed is not None else list(args)
        graph, out = capture_graph(self.fn, args, size, self.runtime.pool, keep=True, boxed=boxed, inputs=inputs,
                                   stream=self.runtime.capture_stream)
        # a capture runs no kernel: its outputs hold what the pool held (memory of other sizes' graphs). The next
        # pieces' warm-ups and the split ops between them read them as an eager run would, and one may index by
        # them (the LM head's logits rows, clamped inside the first piece): replayed once, they hold this step's
        # values (on the H200 the decode step's capture indexed by the pool's garbage: a device-side assert)
        graph.graph.replay()
        pooled.update(storage_ptr(o) for o in (out if isinstance(out, (tuple, list)) else [out]))
        self.graphs[size] = graph
        self.runtime.stats.cuda_graphs += 1
        return out


class PiecewiseRuntime(GraphRuntime):
    """Runs a split graph whose pieces replay CUDA graphs (see module docstring)."""

    name = "pcg"

    def __init__(self, split_gm: fx.GraphModule, layout: TokenLayout, sizes, stats: Stats, progress: bool = True):
        super().__init__(self._run_eager, layout, sizes, stats, progress)
        self.call_sites: list[dict] = []  # each prepared call site's runners by size (`_call_site`)
        self.recording: _Plan | None = None  # a size's first replay, while it runs
        self.planned = False  # a plan runs: its call sites pass the arguments they were recorded with
        self.plans: dict[int, _Plan] = {}
        self.unplanned: set[int] = set()  # sizes whose first replay could not be a plan
        self.split_gm, self.phase, self.size = _prepared_split_ops(direct_split_ops(split_gm), self), "eager", 0
        self.plannable = _plannable(self.split_gm)
        self.pooled: set[int] = set()  # storages allocated by the graphs of the size being captured
        names = [n.target for n in split_gm.graph.nodes if n.op == "call_module"]
        self.pieces = [_PieceGraphs(split_gm.get_submodule(name), self) for name in names]
        for name, piece in zip(names, self.pieces):
            split_gm.register_module(name, piece)

    def _run(self, phase: str, size: int, args):
        self.phase, self.size = phase, size
        try:
            if phase == "capture":  # each value released at its last use, inside pieces too (runtime/freeing.py)
                return run_freeing(self.split_gm, *args)
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
        plan = self.plans.get(size) if plans else None
        if plan is not None:
            out = plan.run(self, args)
            if out is not DECLINED:
                return out
            del self.plans[size]  # other inputs than the plan's: the next replay records again
            return self._run("replay", size, args)
        if not plans or not self.plannable or size in self.unplanned:
            # a plan runs only after its own recording: its call sites then hold the runners of its arguments
            self.plans.pop(size, None)
            return self._run("replay", size, args)
        self.recording = _Plan(size, args, self.stats)
        try:
            out = self._run("replay", size, args)
            if self.recording.valid:
                self.plans[size] = self.recording.finish(out)
            else:
                self.unplanned.add(size)
        finally:
            self.recording = None
        return out

    def release(self) -> None:
        self.plans.clear()
        self.unplanned.clear()
        for piece in self.pieces:
            piece.graphs.clear()
        for sites in self.call_sites:  # their runners hold the released graphs' tensors
            sites.clear()
        super().release()


DECLINED = object()
plans = os.environ.get("HATTN_PCG_PLANS", "1") != "0"  # off: every replay runs the split graph (an A/B switch)


class _Plan:
    """What a size's replay did, in order (`stitch.replay`'s steps): (graph, None) per piece's graph replay and
    (None, call) per split-op call site, recorded while the split graph ran (`record_piece`, `record_site`). The
    pieces' graphs return the same static tensors every replay and the call sites return nothing, so for the same
    inputs the same calls follow. An input the pieces read is copied into their captured tensors where it moved (as
    a piece's replay does); other inputs than the recorded ones reaching a call site or the output make the plan
    decline (`run`: DECLINED). A decode step whose replay was graph replays only runs as one stitched launch
    (`stitch.StepStitcher`)."""

    def __init__(self, size: int, args: list, stats: Stats):
        self.size, self.args, self.steps, self.out = size, list(args), [], None
        self.stitched = stitch.StepStitcher(stats)
        self.index = {id(a): i for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
        self.feeds: dict[int, list] = {}  # input -> the captured tensors of pieces that read it
        self.copies: list[tuple[int, torch.Tensor]] = []  # feeds at another address at recording: copied every run
        self.fixed: set[int] = set()  # inputs a call site or the output reads: the recorded objects only
        self.valid = len(self.index) == sum(isinstance(a, torch.Tensor) for a in args)  # no input passed twice

    def record_piece(self, graph: CapturedGraph, args) -> None:
        for a, s in zip(args, graph.inputs):
            i = self.index.get(id(a))
            if i is not None:
                self.feeds.setdefault(i, []).append(s)
                if a is not s and a.data_ptr() != s.data_ptr():
                    self.copies.append((i, s))
            elif isinstance(a, torch.Tensor) and a is not s and a.data_ptr() != s.data_ptr():
                self.valid = False  # made between the graphs at another address each time: no plan
        self.steps.append((graph.graph, None))

    def record_site(self, call, args, kwargs) -> None:
        self.fixed.update(i for v in (*args, *kwargs.values()) if (i := self.index.get(id(v))) is not None)
        self.steps.append((None, functools.partial(call, *args, **kwargs)))

    def finish(self, out) -> "_Plan":
        self.out = out
        leaves = out if isinstance(out, (tuple, list)) else [out]
        self.fixed.update(i for v in leaves if (i := self.index.get(id(v))) is not None)
        return self

    def run(self, runtime: "PiecewiseRuntime", args):
        """The replay's output, or DECLINED (then run the split graph)."""
        if len(args) != len(self.args):
            return DECLINED
        changed = ()
        if not all(map(operator.is_, self.args, args)):
            changed = [i for i, (a, b) in enumerate(zip(self.args, args)) if a is not b]
            if any(i in self.fixed or not isinstance(args[i], torch.Tensor) for i in changed):
                return DECLINED
            for i in changed:  # every piece that reads it (the `copies` among them)
                feeds = self.feeds.get(i, [])
                copy_if_moved(feeds, [args[i]] * len(feeds))
        for i, s in self.copies:
            if i not in changed:
                copy_if_moved([s], [args[i]])
        runtime.phase, runtime.size, runtime.planned = "replay", self.size, True  # what the call sites read
        try:
            self.stitched.run(get_forward_context(), self.steps)
        finally:
            runtime.phase, runtime.planned = "eager", False
        return self.out


def _plannable(split_gm: fx.GraphModule) -> bool:
    """Whether a replay can be recorded as a plan: between the pieces only split-op call sites (which return nothing)
    and unpacking of a piece's outputs; any other call (indexing an input, say) makes a new tensor every replay."""
    for node in split_gm.graph.nodes:
        if node.op == "call_method":
            return False
        if node.op == "call_function" and not getattr(node.target, "hattn_call_site", False) and not (
                node.target is operator.getitem and getattr(node.args[0], "op", None) == "call_module"):
            return False
    return True


def _prepared_split_ops(split_gm: fx.GraphModule, runtime: "PiecewiseRuntime") -> fx.GraphModule:
    """Route each split-op call whose op returns nothing through `_call_site` (a plan can record it; an op with a
    `prepare` (registry) is served by its runners)."""
    changed = False
    for node in split_gm.graph.nodes:
        target = node.meta.get("split_op")
        op = split_op_of(target)
        if op is not None and returns_nothing(target):
            node.target, changed = _call_site(node.target, op, prepare_of(target), runtime), True
    if changed:
        split_gm.recompile()
    return split_gm


_REBINDS = 4  # a site whose arguments keep changing at one size (between captures) stops preparing there


def _call_site(fn, op, prepare, runtime: "PiecewiseRuntime"):
    """A split op's call site under pcg. At replay a size's calls pass the same tensors step after step (what the
    pieces' graphs return, parameters): per size, the op's `prepare` (if it has one) gives a runner once, and the
    runner serves the steps it accepts (`graphs.prepared` switches it off too). Other phases, steps the runner
    declines and ops without `prepare` call the op."""
    sites: dict[int, list] = {}  # size -> [args, kwargs, runner, rebinds]; cleared with the runtime's graphs
    runtime.call_sites.append(sites)

    def call(*args, **kwargs):
        if runtime.recording is not None:
            runtime.recording.record_site(call, args, kwargs)
        if runtime.phase == "replay" and graphs.prepared and prepare is not None:
            site = sites.get(runtime.size)
            if site is None or not (runtime.planned or _same(site, args, kwargs)):
                rebinds = 0 if site is None else site[3] + 1
                runner = graphs.prepared_runner(prepare, args, kwargs, runtime.stats) if rebinds < _REBINDS else None
                site = sites[runtime.size] = [args, kwargs, runner, rebinds]
            if site[2] is not None and graphs.run_prepared(site[2], op.name):
                runtime.stats.prepared_calls += 1
                return None
        elif runtime.recording is not None:  # recorded without binding (runners off): the plan's runs bind anew
            sites.pop(runtime.size, None)
        return fn(*args, **kwargs)
    call.__name__ = getattr(fn, "__name__", "split_op")
    call.hattn_call_site = True  # `_plannable`
    return call


def _same(site: list, args: tuple, kwargs: dict) -> bool:
    old, old_kwargs = site[0], site[1]
    return (len(old) == len(args) and all(map(operator.is_, old, args)) and old_kwargs.keys() == kwargs.keys()
            and all(old_kwargs[k] is v for k, v in kwargs.items()))


def build(config, split_gm, example_inputs, stats):
    layout = served_layout("pcg", split_gm, example_inputs, stats)
    if layout is None:
        return graph_free(split_gm, stats)
    return PiecewiseRuntime(split_gm, layout, config.capture_sizes, stats, config.progress)


register_mode(Mode("pcg", "piecewise CUDA graphs: one graph per piece per capture size, split ops eager between them",
                   graphs=True, build=build))
