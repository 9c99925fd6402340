"""`python3 -m hattn.bench`: the `hattn bench` command; its budget counts from the process's start (imports too)."""
import sys

from hattn.bench.cli import main
from hattn.bench.harness import process_start

sys.exit(main(start=process_start()))
