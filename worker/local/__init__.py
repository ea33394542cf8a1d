"""The local stack: real processes (Redis, the sandbox, web, workers, beat) on one machine, for `make demo`,
the tests and the benchmarks. Production code never imports this package (tests/unit/test_layers.py)."""
