"""`hattn bench`: hattn's modes, the peers a user would pick instead, and hattn's kernels, side by side, in one process.

    hattn bench --preset qwen3.5-1b --out out/bench        # the model suite: tables, bench.json, .png, .txt
    hattn bench --suite kernels                            # each kernel alone, against fla, torch and a copy
    python3 -m hattn.bench --preset tiny --quick           # the same entry point without the hattn command
    hattn.bench.main(["--quick", "--modes", "eager,pcg"])  # from Python: returns the exit code

Files: harness (clock, median of N, copy bandwidth, matmul peak, budget and hard deadlines), workloads (the rows),
floor (each row's bytes and FLOPs floor), modes, peers and kernels (the columns), runner (time boxes, skips,
errors), data (derived rows, ratios, goals, JSON), tables (terminal and bench.txt), plot (PNG), goals (issues 17
and 18, met or missed).
"""
from hattn.bench.cli import add_parser, main, run

__all__ = ["main", "run", "add_parser"]
