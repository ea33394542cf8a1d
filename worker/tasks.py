"""Celery tasks: thin. Each loads, decides through one module, and records. Arguments are ids, never personal data."""

from __future__ import annotations

from celery import shared_task

from worker import batch_events, dispatch, other_channels, reconcile, settlement
from worker.sending import send_payment
from worker.webhooks import delivery, outbox, release

# Workers release a new event's deliveries and wake `?wait=` requests right after their own transitions commit.
outbox.install()


@shared_task(name="stkpush.stk_push", acks_late=True, ignore_result=True)
def stk_push(payment_id: str) -> str:
    result, retry = send_payment(payment_id)
    if retry is not None:
        # A fresh message rather than self.retry(): the payment is already back in PENDING, so whichever message
        # arrives first claims it and any duplicate finds nothing to do.
        dispatch.publish_payment(payment_id, countdown_s=retry.countdown_s)
    return result.value


@shared_task(name="stkpush.dispatch.release_deferred", ignore_result=True)
def release_deferred() -> int:
    # The guard first: rebuilt if Redis forgot it, and told what the ledger still owes it.
    reconcile.keep_guard()
    return dispatch.release_deferred()


@shared_task(name="stkpush.dispatch.requeue_stale", ignore_result=True)
def requeue_stale() -> int:
    return dispatch.requeue_stale_pending() + dispatch.recover_stuck_sending()


@shared_task(name="stkpush.dispatch.settle", ignore_result=True)
def settle() -> int:
    return settlement.settle_due()


@shared_task(name="stkpush.dispatch.other_channels", ignore_result=True)
def count_other_channels() -> int:
    return other_channels.count_other_channel_failures()


@shared_task(name="stkpush.dispatch.verify_guard", ignore_result=True)
def verify_guard() -> int:
    return sum(
        reconcile.verify_guard(repair=True, account=name).count for name in reconcile.accounts_to_verify()
    )


@shared_task(name="stkpush.dispatch.release_webhooks", ignore_result=True)
def release_webhooks() -> int:
    batch_events.emit_finished_batches()
    return release.release()


@shared_task(name="stkpush.webhooks.deliver", acks_late=True, ignore_result=True)
def deliver_webhooks(delivery_ids: list[int], lease_token: str) -> dict[str, int]:
    return delivery.deliver(delivery_ids, lease_token)
