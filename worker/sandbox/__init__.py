"""The UpesiPay sandbox: a provider of its own that speaks the documented API and enforces the abuse rules.

A product beside stkpush, not part of it: no production module imports this package (only the CLI and the local
stack start it), and it imports nothing of stkpush but the phone-number rules (tests/unit/test_layers.py).
`app.py` is the HTTP surface, `provider.py` the provider's state, `rules.py` the abuse rules, `scenario.py` the
scripted outcomes and faults, `cli.py` `stkpush sandbox`.
"""

from worker.sandbox.app import create_app
from worker.sandbox.config import SandboxConfig

__all__ = ["SandboxConfig", "create_app"]
