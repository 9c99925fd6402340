"""Runtimes that serve a split graph: graph-free (eager/inductor, and CPU), PCG, BCG, full."""
from __future__ import annotations

import logging

from hattn.runtime.graph_free import graph_free

log = logging.getLogger("hattn")


def _on_cuda(example_inputs) -> bool:
    return any(getattr(x, "is_cuda", False) for x in example_inputs)


def build_runtime(config, split_gm, example_inputs, stats):
    """The callable that runs `split_gm` in `config.mode`."""
    if config.uses_graphs and not _on_cuda(example_inputs):
        log.info("hattn: mode=%s runs graph-free: the inputs are not on a CUDA device", config.mode)
    return graph_free(split_gm, stats)
