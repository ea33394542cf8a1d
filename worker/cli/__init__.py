"""The `stkpush` command line: `main.py` holds the commands, `batch.py` the batch upload and status commands.

The CLI is the top layer: it may import every package, the sandbox and the local stack included.
"""

from worker.cli.main import main

__all__ = ["main"]
