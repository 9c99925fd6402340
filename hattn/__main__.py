"""`python -m hattn ...`: the `hattn` command (hattn/cli.py)."""
import sys

from hattn.cli import main

sys.exit(main())
