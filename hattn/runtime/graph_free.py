"""Mode "eager": no CUDA graphs; the split graph's pieces (compiled by the inner compiler) and split ops run as they
are. Every graph mode runs this way on CPU."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from hattn.counters import Stats
from hattn.registry import Mode, direct_call, register_mode, split_op_of
from hattn.runtime.graphs import ran_graph_free


def graph_free(split_gm: fx.GraphModule, stats: Stats) -> Callable:
    direct_split_ops(split_gm)

    def run(*args):
        ran_graph_free(stats)
        return split_gm(*args)

    return run


def direct_split_ops(split_gm: fx.GraphModule) -> fx.GraphModule:
    """Point the split graph's split-op calls at their direct implementations (`registry.direct_call`), for the
    runtimes that run them eagerly from the graph: graph-free and pcg. BCG finds split ops through the dispatcher
    and full captures them, so neither gets this. The op each node called stays in node.meta["split_op"]."""
    changed = False
    for node in split_gm.graph.nodes:
        fn = direct_call(node.target) if split_op_of(node) is not None else node.target
        if fn is not node.target:
            node.meta["split_op"], node.target, changed = node.target, fn, True
    if changed:
        split_gm.recompile()
    return split_gm


register_mode(Mode("eager", "no CUDA graphs: pieces (compiled by the inner compiler) and split ops run as they are",
                   graphs=False, build=lambda config, split_gm, example_inputs, stats: graph_free(split_gm, stats)))
