"""The web app: `app.py` builds it from one router per module (`callbacks.py`, `payments_api.py`,
`dashboard.py`, `metrics.py`); `access.py` holds the API-key check and the public view of a payment."""

from worker.web.app import create_app

__all__ = ["create_app"]
