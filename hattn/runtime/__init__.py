"""Runtimes that serve a split graph: graph-free (eager/inductor, and CPU), PCG, BCG, full."""
from __future__ import annotations

import logging

import torch.fx as fx

from hattn.registry import split_op_of
from hattn.runtime.graph_free import graph_free
from hattn.runtime.tokens import layout_from_examples

log = logging.getLogger("hattn")


def _on_cuda(example_inputs) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)


def _example(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _layout(split_gm: fx.GraphModule):
    nodes = list(split_gm.graph.nodes)
    inputs = [_example(n) for n in nodes if n.op == "placeholder"]
    out = nodes[-1].args[0]
    outputs = [_example(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
    return layout_from_examples(inputs, outputs)


def build_runtime(config, split_gm: fx.GraphModule, example_inputs, stats):
    """The callable that runs `split_gm` in `config.mode`."""
    if not config.uses_graphs:
        return graph_free(split_gm, stats)
    if not _on_cuda(example_inputs):
        log.info("hattn: mode=%s runs graph-free: the inputs are not on a CUDA device", config.mode)
        return graph_free(split_gm, stats)
    layout = _layout(split_gm)
    if layout.reason is not None:
        log.warning("hattn: mode=%s runs this graph graph-free: %s", config.mode, layout.reason)
    sizes, progress = config.capture_sizes, config.progress
    if config.mode == "pcg":
        from hattn.runtime.piecewise import PiecewiseRuntime

        pieces = [n.target for n in split_gm.graph.nodes if n.op == "call_module"]
        return PiecewiseRuntime(split_gm, pieces, layout, sizes, stats, progress)
    if config.mode == "bcg":
        from hattn.runtime.breakable import BreakableRuntime

        return BreakableRuntime(split_gm, layout, sizes, stats, progress)
    from hattn.runtime.full import FullGraphRuntime

    ops = [op for op in map(split_op_of, split_gm.graph.nodes) if op is not None]
    return FullGraphRuntime(split_gm, layout, sizes, stats, ops, progress)
