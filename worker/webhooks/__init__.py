"""Telling the merchant's app what happened: webhook endpoints, their deliveries (waiting in the ledger), the
signature, and the delivery and release steps run by the Celery workers on the `webhooks` queue (docs/webhooks.md).
"""
