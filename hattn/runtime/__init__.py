"""Runtimes that serve a split graph, one module per mode, each registering its mode with the registry:
graph_free ("eager"), piecewise ("pcg"), breakable ("bcg"), full ("full").

`build_runtime` is what the backend calls. Graph modes pad the token count (the graph's one dynamic size) up to a
capture size; a graph they cannot serve (inputs not on CUDA, several dynamic sizes, sizes derived from the token
count) runs graph-free, with the reason logged once.
"""
from __future__ import annotations

import torch.fx as fx

from hattn import registry
from hattn.runtime import graph_free, piecewise, breakable, full  # noqa: F401, I001  (registration order = listing order)
from hattn.runtime.breakable import BreakableGraphRunner
from hattn.runtime.graph_free import direct_split_ops
from hattn.runtime.graphs import DEFAULT_CAPTURE_SIZES, graph_layout


def build_runtime(config, split_gm: fx.GraphModule, example_inputs, stats, pools=None):
    """The callable that runs `split_gm` in `config.mode` (a graph runtime captures as config.lazy_capture says,
    into `pools` when given: a backend's runtimes share their graph pool, `GraphPools`)."""
    runtime = registry.mode(config.mode).build(config, split_gm, example_inputs, stats)
    if hasattr(runtime, "lazy_capture"):
        runtime.lazy_capture = config.lazy_capture
    if pools is not None and hasattr(runtime, "pools"):
        runtime.pools = pools
    return runtime


__all__ = ["build_runtime", "direct_split_ops", "graph_layout", "BreakableGraphRunner", "DEFAULT_CAPTURE_SIZES"]
