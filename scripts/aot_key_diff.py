"""Why a warm start's piece misses torch's AOTAutograd cache: the GPU warm-start test's two "processes" (the toy
model, cold then warm from cache_dir's snapshot, all of torch's caches emptied between them), with the cache's key
details logged; for each key the warm process missed, the lines that differ from the closest key the cold process
made. From the repository root (it imports the test's scenario): PYTHONPATH=. python3 scripts/aot_key_diff.py
[--mode full] [--device cuda]; gpu_check.sh's part aot-key-diff runs it on the device."""
from __future__ import annotations

import argparse
import logging
import re
import tempfile

import torch

from tests.compiler.test_warm_start import cold_then_warm

LOGGER = "torch._functorch._aot_autograd.autograd_cache"


class Keys(logging.Handler):
    """The key details and the hits and misses the AOTAutograd cache logs, by phase."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.phase, self.details, self.missed = "cold", {"cold": {}, "warm": {}}, {"cold": [], "warm": []}

    def emit(self, record):
        text = record.getMessage()
        if text.startswith("Autograd graph cache hash details for key"):
            key, _, body = text.partition(":\n")
            lines = [re.sub(r"^\[[a-z0-9]+\] ", "", line) for line in body.splitlines()]
            self.details[self.phase][key.split()[-1]] = lines
        elif text.startswith("AOTAutograd cache miss for key"):
            self.missed[self.phase].append(text.split()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="full")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    keys, logger = Keys(), logging.getLogger(LOGGER)
    logger.addHandler(keys)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # the details only here, not torch's log of every line
    (_, cold, _), (_, warm, _) = cold_then_warm(tempfile.mkdtemp(), args.mode, args.device, [6, 3], [6, 3, 11, 1],
                                                between=lambda: setattr(keys, "phase", "warm"),
                                                capture_sizes=[1, 4, 8, 16])
    print(f"cold: {cold.pieces_compiled} compiled; warm: {warm.pieces_compiled} compiled, {warm.pieces_from_cache} "
          f"from cache, {warm.graphs_from_snapshots} graphs from snapshots")
    for key in keys.missed["warm"]:
        lines = keys.details["warm"].get(key, [])
        closest = max(keys.details["cold"].values(), key=lambda c: len(set(c) & set(lines)), default=[])
        print(f"== warm miss {key}: {len(lines)} detail lines; lines unlike the closest cold key's:")
        for line in sorted(set(lines) ^ set(closest)):
            print(("warm  " if line in lines else "cold  ") + line[:600])


if __name__ == "__main__":
    main()
