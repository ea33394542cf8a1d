"""stkpush's worker side: the Celery app (`celery -A worker ...`), settings, ledger, guard, client, web app.

The Celery app is built on first access so that importing a submodule (the sandbox, say) does not demand the
production settings.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name in {"app", "celery"}:
        from worker.celery_app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
