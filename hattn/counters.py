"""Counters of what hattn did (pieces compiled, graphs captured, eager fallbacks, ...), read by tests and users."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass


@dataclass
class Stats:
    graphs_compiled: int = 0     # Dynamo graphs handed to the backend (> 1 means Dynamo graph breaks)
    pieces: int = 0              # pieces between split ops (compiled by the inner compiler)
    split_ops: int = 0           # split-op nodes in the graphs
    fused_linears: int = 0       # groups of same-input linears run as one GEMM (passes/fuse_linears.py)
    collectives: int = 0         # collectives (all-reduce, all-gather; tensor parallel) in the pieces: graphs hold them
    cuda_graphs: int = 0         # CUDA graphs captured (all pieces/segments, all sizes)
    capture_sizes_done: int = 0  # sizes captured
    capture_seconds: float = 0.0
    pool_bytes: int = 0          # memory reserved by the shared graph pool, measured around capture
    replays: int = 0             # forward calls served by graph replay
    eager_runs: int = 0          # forward calls run without graphs (above the largest capture size, CPU, ...)
    padded_tokens: int = 0       # padding rows added to reach a capture size
    graph_free_graphs: int = 0   # graphs a graph mode serves graph-free (several dynamic sizes, ...; reason logged)

    def add(self, other: "Stats") -> "Stats":
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_LOCK = threading.Lock()
_ALL: list[Stats] = []


def new_stats() -> Stats:
    """A fresh Stats for one compiled graph, also counted in the process-wide totals."""
    s = Stats()
    with _LOCK:
        _ALL.append(s)
    return s


def total_stats() -> Stats:
    with _LOCK:
        out = Stats()
        for s in _ALL:
            out.add(s)
        return out


def reset_stats() -> None:
    with _LOCK:
        _ALL.clear()
