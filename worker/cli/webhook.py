"""`stkpush webhook add|list|enable|disable|deliveries|replay`: the merchant's endpoints, from the command line.

The signing secret is printed once, by `add`; nothing else shows it (list it again by adding a new endpoint).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import click


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group("webhook")
def webhook_command() -> None:
    """Webhook endpoints: signed deliveries of payment events (docs/webhooks.md)."""


@webhook_command.command("add")
@click.argument("url")
@click.option("--events", default="*", show_default=True, help="Comma-separated event types, or * for all.")
def add(url: str, events: str) -> None:
    """Add an endpoint; prints its id and its signing secret (shown this once)."""
    from worker.webhooks.endpoints import WebhookInputError, add_endpoint, endpoint_view

    try:
        created = add_endpoint(url, events)
    except WebhookInputError as error:
        _fail(str(error))
        return
    click.echo(json.dumps({**endpoint_view(created.endpoint), "secret": created.secret}))
    click.echo("Keep the secret: it is shown only now (the receiver verifies signatures with it).", err=True)


@webhook_command.command("list")
def list_command() -> None:
    """Every endpoint of this account (no secrets)."""
    from worker.webhooks.endpoints import endpoint_view, list_endpoints

    for endpoint in list_endpoints():
        click.echo(json.dumps(endpoint_view(endpoint)))


def _set(endpoint_id: str, enabled: bool) -> None:
    from worker.webhooks.endpoints import WebhookInputError, endpoint_view, set_enabled

    try:
        click.echo(json.dumps(endpoint_view(set_enabled(endpoint_id, enabled))))
    except WebhookInputError as error:
        _fail(str(error))


@webhook_command.command("enable")
@click.argument("endpoint_id")
def enable(endpoint_id: str) -> None:
    """Enable an endpoint again; its waiting deliveries go out on beat's next tick."""
    _set(endpoint_id, True)


@webhook_command.command("disable")
@click.argument("endpoint_id")
def disable(endpoint_id: str) -> None:
    """Stop delivering to an endpoint; its deliveries wait in the ledger."""
    _set(endpoint_id, False)


@webhook_command.command("deliveries")
@click.argument("endpoint_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def deliveries(endpoint_id: str, limit: int) -> None:
    """The endpoint's delivery log, newest first: attempts, status codes, next retry."""
    from worker.webhooks.endpoints import delivery_log, get_endpoint

    if get_endpoint(endpoint_id) is None:
        _fail("endpoint: no such endpoint for this account")
    for row in delivery_log(endpoint_id, limit):
        click.echo(json.dumps(row))


def _parse_time(raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise click.BadParameter(
            "must be an ISO 8601 time, e.g. 2026-12-01T09:00:00Z", param_hint="--since"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@webhook_command.command("replay")
@click.argument("event_id", required=False)
@click.option("--since", default=None, help="Replay every event created at or after this ISO 8601 time.")
@click.option(
    "--endpoint", "endpoint_id", default=None, help="Only to this endpoint (default: every enabled one)."
)
def replay(event_id: str | None, since: str | None, endpoint_id: str | None) -> None:
    """Deliver EVENT_ID (or every event since a time) again, with the same event id."""
    from worker.webhooks.endpoints import WebhookInputError
    from worker.webhooks.endpoints import replay as replay_events

    try:
        made = replay_events(event_id, _parse_time(since) if since else None, endpoint_id)
    except WebhookInputError as error:
        _fail(str(error))
        return
    click.echo(json.dumps({"deliveries": made}))
