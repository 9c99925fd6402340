"""`python3 -m hattn.bench`: the `hattn bench` command."""
import sys

from hattn.bench.cli import main

sys.exit(main())
