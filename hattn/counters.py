"""Counters of what hattn did (pieces compiled, graphs captured, eager fallbacks, ...) and where the start went
(fields ending in `_seconds`), read by tests and users (`hattn.stats()`)."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field

_IMPORTED = time.perf_counter()


@dataclass
class Stats:
    graphs_compiled: int = 0     # Dynamo graphs handed to the backend (> 1 means Dynamo graph breaks)
    pieces: int = 0              # pieces between split ops
    pieces_compiled: int = 0     # pieces the inner compiler compiled; the others reuse an identical piece's code
    pieces_from_cache: int = 0   # compiled pieces that torch's AOTAutograd cache served (a warm start)
    split_ops: int = 0           # split-op nodes in the graphs
    small_m_linears: int = 0     # linears routed to hattn_kernels::linear (cuBLAS or the skinny GEMM per shape)
    fused_linears: int = 0       # groups of same-input linears run as one GEMM (passes/fuse_linears.py)
    collectives: int = 0         # collectives (all-reduce, all-gather; tensor parallel) in the pieces: graphs hold them
    cache_hits: int = 0          # graphs whose cache_dir entry was loaded before compiling
    cache_misses: int = 0        # graphs with a cache_dir but no entry for their key
    graphs_from_snapshots: int = 0  # graphs compiled from a cache_dir's snapshot, without Dynamo (snapshot.py)
    cuda_graphs: int = 0         # CUDA graphs captured (all pieces/segments, all sizes)
    capture_sizes_done: int = 0  # sizes captured
    kernels_compiled_ahead: int = 0  # Triton kernels compiled in parallel before captures (kernels/ahead.py)
    pool_bytes: int = 0          # memory held by the graph pools (each pool once), measured after capture
    pool_bytes_by_pool: dict[str, int] = field(default_factory=dict)  # the same per pool id (str)
    replays: int = 0             # forward calls served by graph replay
    prepared_calls: int = 0      # split-op calls served by the runner their `prepare` gave (bcg, pcg replays)
    stitched_steps: int = 0      # pcg/bcg decode replays served as one stitched step of graphs (runtime/stitch.py)
    eager_runs: int = 0          # forward calls run without graphs (above the largest capture size, CPU, ...)
    padded_tokens: int = 0       # padding rows added to reach a capture size
    graph_free_graphs: int = 0   # graphs a graph mode serves graph-free (several dynamic sizes, ...; reason logged)
    # the startup breakdown, in the order it happens
    probe_seconds: float = 0.0          # adapt's 2-token probe (fake tensors; for real where a fake run fails)
    dynamo_seconds: float = 0.0         # Dynamo: from the start of the frame's compile to the backend call
    snapshot_load_seconds: float = 0.0  # reading a warm-start snapshot of a Dynamo graph instead of tracing
    cache_load_seconds: float = 0.0     # reading cache_dir's artifacts into torch's caches
    split_seconds: float = 0.0          # hattn's guard and split passes
    fake_run_seconds: float = 0.0       # running the split graph on fake inputs, compiles excluded
    compile_seconds: float = 0.0        # the inner compiler (inductor), all pieces
    piece_compile_seconds: list[float] = field(default_factory=list)  # each compiled piece, in order
    cache_save_seconds: float = 0.0     # writing the artifacts to cache_dir
    snapshot_save_seconds: float = 0.0  # pickling a Dynamo graph for its warm-start snapshot, and writing it
    capture_seconds: float = 0.0        # CUDA graph capture, warm-up runs included
    capture_size_seconds: dict[str, float] = field(default_factory=dict)  # "<runtime> <size>" -> its captures
    first_replay_seconds: float = 0.0   # each runtime's first replay after its capture (synchronized)

    def add(self, other: "Stats") -> "Stats":
        pools = dict(self.pool_bytes_by_pool)  # runtimes of one backend share a pool: each pool once, at its
        for key, nbytes in other.pool_bytes_by_pool.items():  # largest figure (a pool only grows)
            pools[key] = max(pools.get(key, 0), nbytes)
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            # dicts of seconds add up per key: two graphs' runtimes of one name capture the same sizes
            setattr(self, f.name, {k: mine.get(k, 0) + theirs.get(k, 0) for k in {**mine, **theirs}}
                    if isinstance(mine, dict) else mine + theirs)
        self.pool_bytes_by_pool, self.pool_bytes = pools, sum(pools.values())
        return self

    def set_pool_bytes(self, pool_id: str, nbytes: int) -> None:
        """Record what pool `pool_id` holds now (replacing its earlier figure); pool_bytes is the sum over pools."""
        self.pool_bytes_by_pool[pool_id] = nbytes
        self.pool_bytes = sum(self.pool_bytes_by_pool.values())

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def startup(self) -> dict[str, float]:
        """The startup breakdown: the `_seconds` totals in the order they happen (per-piece times left out)."""
        return {f.name: v for f in dataclasses.fields(self)
                if f.name.endswith("_seconds") and isinstance(v := getattr(self, f.name), float)}


def describe_startup(s: Stats) -> str:
    """Two lines: where the start went, and what was compiled, reused, cached and captured."""
    times = ", ".join(f"{name.removesuffix('_seconds').replace('_', ' ')} {v:.2f}" for name, v in s.startup().items())
    slowest = f" (slowest {max(s.piece_compile_seconds):.2f} s)" if s.piece_compile_seconds else ""
    captures = sorted(s.capture_size_seconds.items(), key=lambda kv: -kv[1])[:4]
    slow_captures = f"; slowest: {', '.join(f'{k} {v:.2f} s' for k, v in captures)}" if captures else ""
    return (f"startup s: {times}\n"
            f"graphs {s.graphs_compiled}, pieces {s.pieces}: {s.pieces_compiled} compiled{slowest}, "
            f"{s.pieces_from_cache} from torch's cache; cache_dir hits {s.cache_hits}, misses {s.cache_misses}, "
            f"graphs from snapshots (no Dynamo) {s.graphs_from_snapshots}; "
            f"{s.capture_sizes_done} sizes captured ({s.cuda_graphs} cuda graphs, {s.kernels_compiled_ahead} Triton "
            f"kernels compiled ahead){slow_captures}")


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since hattn was imported)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
            return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except OSError:
        return time.perf_counter() - _IMPORTED


_LOCK = threading.Lock()
_ALL: list[Stats] = []


def new_stats() -> Stats:
    """A fresh Stats for one compiled graph, also counted in the process-wide totals."""
    return register(Stats())


def register(s: Stats) -> Stats:
    """Count `s` in the process-wide totals (a graph whose compile succeeded)."""
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
