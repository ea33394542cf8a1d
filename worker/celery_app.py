"""The Celery app. Its configuration is derived from the settings object, and its invariants asserted here."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from kombu import Queue  # type: ignore[attr-defined]

from worker.settings import Settings, SettingsError, get_settings

SINGLE_QUEUE = "single"  # payments from web apps: dispatched ahead of bulk batches
BULK_QUEUE = "bulk"
MAINTENANCE_QUEUE = "maintenance"  # beat's dispatcher and settlement: never stuck behind a payment backlog
# Webhook deliveries: listed last by workers, so with the priority order a delivery never delays a push.
WEBHOOKS_QUEUE = "webhooks"


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = settings.visibility_timeout_s
    # Every countdown we schedule must be delivered once: kombu's Redis transport redelivers a message still
    # unacked after visibility_timeout, so nothing may wait longer than half of it.
    assert settings.send_backoff_cap_s <= visibility / 2, "backoff cap must stay below visibility_timeout / 2"
    transport_options: dict[str, Any] = {
        "visibility_timeout": visibility,
        # BRPOP checks queues in the order the worker lists them: single before bulk, so a waiting batch never
        # starves a web app's payment.
        "queue_order_strategy": "priority",
    }
    if settings.redis_key_prefix:
        transport_options["global_keyprefix"] = settings.redis_key_prefix
    config: dict[str, Any] = {
        "broker_url": settings.redis_url,
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # A message is acknowledged only after the task returns, and a worker that dies mid-task gives its
        # message back: the task's conditional claim makes the redelivery harmless.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_queues": [
            Queue(SINGLE_QUEUE),
            Queue(BULK_QUEUE),
            Queue(MAINTENANCE_QUEUE),
            Queue(WEBHOOKS_QUEUE),
        ],
        "task_default_queue": SINGLE_QUEUE,
        "task_routes": {
            "stkpush.dispatch.*": {"queue": MAINTENANCE_QUEUE},
            "stkpush.webhooks.*": {"queue": WEBHOOKS_QUEUE},
        },
        "task_soft_time_limit": 120,
        "task_time_limit": 150,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "timezone": "UTC",
    }
    assert config["worker_prefetch_multiplier"] == 1 and config["task_acks_late"]
    return config


def build_app(settings: Settings) -> Celery:
    celery = Celery("stkpush", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    from worker.schedule import beat_schedule

    celery.conf.beat_schedule = beat_schedule(settings)
    return celery


def _startup_settings() -> Settings:
    try:
        return get_settings()
    except SettingsError as error:
        # `celery -A worker ...` with a missing variable: say which, not a traceback.
        raise SystemExit(f"stkpush: {error}") from None


app = build_app(_startup_settings())


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    # Connecting this signal tells Celery to leave logging to us: the same redacting handler as the web app.
    from worker.logs import setup_logging

    setup_logging(get_settings(), level=loglevel or "INFO")


@signals.worker_init.connect
def _refuse_unmigrated_database(**_: Any) -> None:
    from worker.ledger import make_engine
    from worker.migrations import DatabaseNotMigrated, require_migrated

    # A throwaway engine: the prefork pool forks after this, and children must not share its connections.
    engine = make_engine(get_settings().sqlalchemy_url)
    try:
        require_migrated(engine)
    except DatabaseNotMigrated as error:
        # SystemExit, not an exception: Celery logs and ignores exceptions raised by signal handlers.
        raise SystemExit(f"stkpush: {error}") from None
    finally:
        engine.dispose()
