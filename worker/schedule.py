"""Beat's schedule: the dispatcher and settlement run every few seconds (`celery -A worker beat`)."""

from __future__ import annotations

from typing import Any

from worker.settings import Settings


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    every = settings.dispatch_interval_s
    # expires: a tick that waited longer than its own interval is stale; the next one does the same work.
    schedule = {
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
        "verify-guard": {
            "task": "stkpush.dispatch.verify_guard",
            "schedule": every * 10,
            "options": {"expires": every * 10},
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
    if settings.other_channels_poll_s > 0:
        schedule["other-channels"] = {
            "task": "stkpush.dispatch.other_channels",
            "schedule": settings.other_channels_poll_s,
            "options": {"expires": settings.other_channels_poll_s},
        }
    return schedule
