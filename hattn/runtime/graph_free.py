"""Graph-free runtime: the split graph's pieces and split ops run as they are (modes eager/inductor, and every
mode on CPU)."""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from hattn.stats import Stats


def graph_free(split_gm: fx.GraphModule, stats: Stats) -> Callable:
    def run(*args):
        stats.eager_runs += 1
        return split_gm(*args)

    return run
