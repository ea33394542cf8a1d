"""Beat's schedule: the dispatcher and settlement run every few seconds (`celery -A worker beat`)."""

from __future__ import annotations

from typing import Any

from worker.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    every = settings.dispatch_interval_s
    # expires: a tick that waited longer than its own interval is stale; the next one does the same work.
    return {
        "release-deferred": {
            "task": "stkpush.dispatch.release_deferred",
            "schedule": every,
            "options": {"expires": every},
        },
        "requeue-stale": {
            "task": "stkpush.dispatch.requeue_stale",
            "schedule": every * 5,
            "options": {"expires": every * 5},
        },
        "release-webhooks": {
            "task": "stkpush.dispatch.release_webhooks",
            "schedule": every,
            "options": {"expires": every},
        },
        "settle": {
            "task": "stkpush.dispatch.settle",
            "schedule": every * 2,
            "options": {"expires": every * 2},
        },
    }
