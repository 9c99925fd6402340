"""Runtimes that serve a split graph: graph-free (eager/inductor, and CPU), PCG, BCG, full.

`build_runtime` is what the backend calls. Graph modes pad the token count (the graph's one dynamic size) up to a
capture size; a graph they cannot serve (several dynamic sizes, sizes derived from the token count) runs
graph-free, with the reason logged once and counted in `Stats.graph_free_graphs`.
"""
from __future__ import annotations

import logging

import torch.fx as fx

from hattn.registry import split_op_of
from hattn.runtime.graph_free import direct_split_ops, graph_free
from hattn.runtime.tokens import TokenLayout, layout_from_examples

log = logging.getLogger("hattn")
_LOGGED: set[str] = set()


def _log_once(message: str, *args) -> None:
    line = message % args
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.warning(line)


def _on_cuda(example_inputs) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)


def _example(node):
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def _is_forward_arg(node: fx.Node) -> bool:
    """A placeholder that is one of the forward's own arguments (Dynamo's LocalSource), not module state."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    return type(source).__name__ == "LocalSource"


def graph_layout(split_gm: fx.GraphModule) -> TokenLayout:
    """Token layout of a (split) Dynamo graph, from its placeholders' and outputs' example values."""
    nodes = list(split_gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out = nodes[-1].args[0]
    outputs = [_example(o) for o in (out if isinstance(out, (tuple, list)) else [out])]
    forward_args = {i for i, n in enumerate(placeholders) if _is_forward_arg(n)}
    return layout_from_examples([_example(n) for n in placeholders], outputs, forward_args)


def _split_ops(split_gm: fx.GraphModule):
    return [op for op in map(split_op_of, split_gm.graph.nodes) if op is not None]


def build_runtime(config, split_gm: fx.GraphModule, example_inputs, stats):
    """The callable that runs `split_gm` in `config.mode` (see the module docstring)."""
    if not config.uses_graphs:
        return graph_free(split_gm, stats)
    if config.mode == "full":
        from hattn.runtime.full import check_capture_safe

        check_capture_safe(_split_ops(split_gm))  # on every device, so CPU runs catch it too
    if not _on_cuda(example_inputs):
        _log_once("hattn: mode=%s runs graph-free on CPU (the inputs are not on a CUDA device)", config.mode)
        return graph_free(split_gm, stats)
    layout = graph_layout(split_gm)
    if layout.reason is not None:
        _log_once("hattn: mode=%s runs a graph graph-free: %s", config.mode, layout.reason)
        stats.graph_free_graphs += 1
        return graph_free(split_gm, stats)
    sizes, progress = config.capture_sizes, config.progress
    if config.mode == "pcg":
        from hattn.runtime.piecewise import PiecewiseRuntime

        pieces = [n.target for n in split_gm.graph.nodes if n.op == "call_module"]
        return PiecewiseRuntime(direct_split_ops(split_gm), pieces, layout, sizes, stats, progress)
    if config.mode == "bcg":
        from hattn.runtime.breakable import BreakableRuntime

        return BreakableRuntime(split_gm, layout, sizes, stats, progress)
    from hattn.runtime.full import FullGraphRuntime

    return FullGraphRuntime(split_gm, layout, sizes, stats, _split_ops(split_gm), progress)


from hattn.runtime.breakable import BreakableGraphRunner  # noqa: E402  (public: BCG on a plain module)

__all__ = ["build_runtime", "direct_split_ops", "graph_layout", "BreakableGraphRunner"]
