"""The web app's factory: the callback receiver, the payments and batches API, the dashboard, `/metrics` and
`/healthz`, each a router of its own module in this package. Served by uvicorn (`stkpush web`)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker import runtime
from worker.guard import recovery
from worker.ledger import utcnow
from worker.logs import setup_logging
from worker.migrations import DatabaseNotMigrated, require_migrated
from worker.web.access import AccessRefused, access_refused
from worker.web.accounts_api import router as accounts_router
from worker.web.callbacks import router as callbacks_router
from worker.web.dashboard import router as dashboard_router
from worker.web.metrics import router as metrics_router
from worker.web.payments_api import router as payments_router
from worker.web.webhooks_api import router as webhooks_router
from worker.webhooks import outbox

log = logging.getLogger("stkpush.web")


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # Serving callbacks against a schema the code does not expect could lose them: refuse to start instead.
    try:
        require_migrated(runtime.engine())
    except DatabaseNotMigrated as error:
        log.critical("%s", error)
        raise
    yield


def create_app() -> FastAPI:
    setup_logging(runtime.settings())
    outbox.install()
    app = FastAPI(
        title="stkpush",
        description="M-Pesa STK push payments through UpesiPay: callbacks, payments API, health.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_exception_handler(AccessRefused, access_refused)
    app.include_router(metrics_router)
    app.include_router(dashboard_router)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        checks: dict[str, str] = {}
        try:
            with runtime.engine().connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as error:
            checks["database"] = f"error: {type(error).__name__}"
        try:
            runtime.redis_client().ping()
            checks["redis"] = "ok"
        except Exception as error:
            checks["redis"] = f"error: {type(error).__name__}"
        healthy = all(value == "ok" for value in checks.values())
        # Said, not failed on: while the guard is rebuilt nothing is sent, but callbacks must still be taken in,
        # so a load balancer must keep this instance.
        guard = "unknown"
        if checks["redis"] == "ok":
            try:
                guard = "ok" if recovery.has_state(runtime.guard()) else "rebuilding: sends refused"
            except Exception as error:
                guard = f"error: {type(error).__name__}"
        return JSONResponse(
            {
                "status": "ok" if healthy else "degraded",
                "time": utcnow().isoformat(),
                **checks,
                "guard": guard,
            },
            status_code=200 if healthy else 503,
        )

    app.include_router(callbacks_router)
    app.include_router(payments_router)
    app.include_router(webhooks_router)
    app.include_router(accounts_router)
    return app
