"""What happens right after an event commits, in the process that made the change: its deliveries are released at
once (no wait for beat's tick), and a note goes out on the account's Redis channel so `?wait=` requests wake.

Both are shortcuts: if this process dies first, beat's release finds the deliveries and a waiter re-reads the
ledger at the end of its wait. The note carries the public reference only.
"""

from __future__ import annotations

import json
import logging

from worker import runtime
from worker.events import CommittedEvent, on_committed
from worker.webhooks.release import release

log = logging.getLogger("stkpush.webhooks")


def outcome_channel(account: str, key_prefix: str = "") -> str:
    return f"{key_prefix}stkpush:{{{account}}}:outcomes"


def _after_commit(event: CommittedEvent) -> None:
    if event.delivery_ids:
        release(event.delivery_ids)
    if event.external_reference is None:
        return
    settings = runtime.settings()
    note = json.dumps({"event": event.id, "type": event.type, "external_reference": event.external_reference})
    try:
        runtime.redis_client().publish(outcome_channel(event.account, settings.redis_key_prefix), note)
    except Exception as error:  # waiters re-read the ledger when their wait ends
        log.debug("outcome note not published (%s)", type(error).__name__)


def install() -> None:
    """Idempotent; called where processes build the Celery app and the web app."""
    on_committed(_after_commit)
