"""`hattn bench`: every hattn mode and the peers a user would pick instead, side by side on one model, in one process.

    hattn bench --preset qwen3.5-1b --out out/bench        # table on the terminal, bench.json, bench.png, bench.txt
    python3 -m hattn.bench --preset tiny --quick           # the same entry point without the hattn command
    hattn.bench.main(["--quick", "--modes", "eager,pcg"])  # from Python: returns the exit code

Files: harness (clock, median of N, copy bandwidth, budget), workloads (what is measured), modes and peers (the
targets), runner (time boxes, skips, errors), report (tables, JSON, PNG), goals (issue 7's goals, met or missed).
"""
from hattn.bench.cli import add_parser, main, run

__all__ = ["main", "run", "add_parser"]
