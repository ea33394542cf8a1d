"""`python -m worker.cli` is `stkpush`."""

from worker.cli.main import main

main()
