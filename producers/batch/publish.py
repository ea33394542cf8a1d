"""Publishing a chunk of batch rows: one Redis pipeline of stk_push messages, then one UPDATE of queued_at."""

from __future__ import annotations

import logging

from sqlalchemy import update
from sqlmodel import col

from worker import runtime
from worker.ledger import Payment, utcnow

log = logging.getLogger("stkpush.batch")

STK_PUSH_TASK = "stkpush.stk_push"
# Publishing gives up fast when Redis is away: the rows stay recorded and the dispatcher queues them later.
BROKER_CONNECT_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


def publish_bulk(payment_ids: list[str]) -> int:
    """Publish stk_push(id) for every id on the bulk queue through one Redis pipeline, then note queued_at in one
    UPDATE. Returns how many were published: all of them, or 0 when the broker could not take them."""
    from celery.utils import uuid as task_id

    from worker.celery_app import BULK_QUEUE, app

    try:
        with app.producer_or_acquire() as producer:
            producer.connection.ensure_connection(**BROKER_CONNECT_POLICY)
            with producer.batch(max_size=len(payment_ids) + 1):
                for payment_id in payment_ids:
                    # Built directly, without the task-sent event send_task adds: that event doubles the cost of
                    # every message, and Flower still sees the task once a worker receives it. The default
                    # exchange routes by queue name, so the queue needs no declaring per message; and the
                    # argument's repr is plain (an id), so Celery's safe-repr walk is skipped.
                    message = app.amqp.create_task_message(
                        task_id(),
                        STK_PUSH_TASK,
                        [payment_id],
                        {},
                        create_sent_event=False,
                        ignore_result=True,
                        argsrepr=repr([payment_id]),
                        kwargsrepr="{}",
                    )
                    app.amqp.send_task_message(
                        producer, STK_PUSH_TASK, message, queue=BULK_QUEUE, retry=False, declare=[]
                    )
    except Exception as error:  # kombu wraps broker failures in several types; all mean "not (surely) queued"
        log.warning(
            "%d batch payments not queued: broker unavailable (%s)", len(payment_ids), type(error).__name__
        )
        return 0
    with runtime.engine().begin() as connection:
        connection.execute(update(Payment).where(col(Payment.id).in_(payment_ids)).values(queued_at=utcnow()))
    return len(payment_ids)
