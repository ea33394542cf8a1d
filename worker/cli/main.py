"""The `stkpush` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from worker.phones import mask_phone
from worker.settings import SettingsError


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class SettingsAwareGroup(click.Group):
    """Settings problems end the command with the message naming each variable, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SettingsError as error:
            fail(str(error))


@click.group(cls=SettingsAwareGroup)
def main() -> None:
    """stkpush: M-Pesa STK push payments through UpesiPay, in the background, inside the abuse limits."""


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def web(host: str, port: int) -> None:
    """Serve the callback receiver, the payments API and /healthz."""
    import uvicorn

    from worker import runtime

    runtime.settings()  # fail now, naming the variable, rather than inside a request
    uvicorn.run("worker.web.app:create_app", factory=True, host=host, port=port, log_level="info")


@main.command()
@click.option("--amount", required=True, type=int, help="Whole shillings.")
@click.option("--phone", "phone_number", required=True, help="Kenyan mobile number, any common form.")
@click.option("--reference", "external_reference", default=None, help="Your unique reference (e.g. INV-009).")
@click.option("--name", "customer_name", default=None)
@click.option("--channel-id", type=int, default=None)
@click.option(
    "--expires-in",
    type=int,
    default=None,
    help="Seconds the prompt is worth sending for (default INTERACTIVE_EXPIRES_IN_S); then EXPIRED.",
)
@click.option("--account", default=None, help="The UpesiPay account (default: UPESIPAY_ACCOUNT's).")
def enqueue(
    amount: int,
    phone_number: str,
    external_reference: str | None,
    customer_name: str | None,
    channel_id: int | None,
    expires_in: int | None,
    account: str | None,
) -> None:
    """Record one payment and queue its STK push (idempotent per reference)."""
    from producers import PaymentConflictError, PaymentValidationError, enqueue_payment

    try:
        handle = enqueue_payment(
            amount,
            phone_number,
            external_reference,
            customer_name,
            channel_id,
            expires_in=expires_in,
            account=account,
        )
    except PaymentValidationError as error:
        fail(str(error))
        return
    except PaymentConflictError as error:
        fail(str(error), code=3)
        return
    click.echo(
        json.dumps(
            {
                "id": handle.id,
                "external_reference": handle.external_reference,
                "state": handle.state.value,
                "queued": handle.queued,
                "created": handle.created,
                "note": handle.note,
            }
        )
    )


@main.command()
@click.argument("external_reference")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--account", default=None, help="The payment's account (default: UPESIPAY_ACCOUNT's).")
def status(external_reference: str, as_json: bool, account: str | None) -> None:
    """Show one payment by its external reference."""
    from worker import runtime
    from worker.ledger import find_by_reference
    from worker.web.access import history_view

    payment = find_by_reference(
        runtime.engine(), account or runtime.settings().upesipay_account, external_reference
    )
    if payment is None:
        fail("no payment with that external_reference", code=1)
        return
    view = history_view(payment)
    if as_json:
        click.echo(json.dumps(view))
        return
    attempts = view.pop("attempts")
    for key, value in view.items():
        click.echo(f"{key:>20}: {value}")
    for attempt in attempts:
        ended = attempt["outcome"] or "in flight"
        told = "guard told" if attempt["guard_told_at"] else "guard owed"
        click.echo(
            f"{'attempt ' + str(attempt['number']):>20}: {ended} (claimed {attempt['claimed_at']}, "
            f"sent {attempt['sent_at']}, {told}){' <- current' if attempt['current'] else ''}"
        )


@main.command()
@click.argument("ref")
@click.option("--by", "reopened_by", default="cli", show_default=True, help="Who re-opens it (recorded).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--account", default=None, help="The payment's account (default: UPESIPAY_ACCOUNT's).")
def retry(ref: str, reopened_by: str, as_json: bool, account: str | None) -> None:
    """Re-open a FAILED payment that provably never reached UpesiPay (REF: external reference or payment id).

    Every send attempt must have ended without UpesiPay recording it; anything else is refused with the reason
    (exit 1), since the customer may have been prompted. Re-opening twice is the same as once."""
    from worker.retry import reopen_view, retry_payment

    if not reopened_by.strip():
        fail("--by: must name who re-opens the payment")
    answer = retry_payment(ref, reopened_by.strip(), account)
    if answer is None:
        fail("no payment with that external reference or id", code=1)
        return
    view = reopen_view(answer)
    if as_json:
        click.echo(json.dumps(view))
    elif answer.refusal is None:
        done = "re-opened" if answer.reopened else "already re-opened"
        click.echo(f"{done} {answer.payment.external_reference}: now {answer.payment.state.value}")
    if answer.refusal is not None:
        fail(f"not re-opened: {answer.refusal}", code=1)


class GuardGroup(click.Group):
    """`stkpush guard [PHONE]` shows the guard; `stkpush guard rebuild|verify|release` are its subcommands."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] not in self.commands:
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


@main.group(cls=GuardGroup, invoke_without_command=True, context_settings={"ignore_unknown_options": True})
@click.pass_context
def guard(ctx: click.Context) -> None:
    """The abuse guard: show it (`stkpush guard [PHONE]`), rebuild it from the ledger, verify it."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(show)


@guard.command(hidden=True)
@click.argument("phone", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--account", default=None, help="The account (default: UPESIPAY_ACCOUNT's).")
def show(phone: str | None = None, as_json: bool = False, account: str | None = None) -> None:
    """Show the guard's view of the account, or of one number (always masked)."""
    from dataclasses import asdict

    from worker.guard import recovery
    from worker.phones import PhoneNumberError, normalise_phone

    guard = _account_guard(account)
    snapshot: dict[str, Any] = {"account": asdict(guard.account_snapshot())}
    snapshot["account"]["rebuilt"] = recovery.has_state(guard)
    if phone:
        try:
            canonical = normalise_phone(phone)
        except PhoneNumberError as error:
            fail(f"PHONE: {error}")
            return
        phone_view = asdict(guard.phone_snapshot(canonical))
        phone_view["phone"] = mask_phone(canonical)
        snapshot["phone"] = phone_view
    from worker import forecast, runtime

    budget = forecast.budget_forecast(runtime.engine(), guard.account, runtime.settings_of(guard.account))
    snapshot["forecast"] = budget.as_dict()
    if as_json:
        click.echo(json.dumps(snapshot, default=str))
        return
    for section, values in snapshot.items():
        click.echo(f"[{section}]")
        for key, value in values.items():
            click.echo(f"  {key:>22}: {value}")
    for line in forecast.describe_budget(budget):
        click.echo(line)


def _account_guard(account: str | None) -> Any:
    from worker import runtime
    from worker.accounts import UnknownAccount

    try:
        return runtime.guard_of(account)
    except UnknownAccount as error:
        fail(f"--account: {error.rule}")
        raise  # pragma: no cover - fail() raises


@guard.command()
@click.option("--account", default=None, help="The account (default: UPESIPAY_ACCOUNT's).")
def rebuild(account: str | None) -> None:
    """Rebuild the guard's state from the ledger now (admits refuse for the moment it takes)."""
    from worker import reconcile
    from worker.guard import GuardUnavailable

    guard = _account_guard(account)
    try:
        reconcile.rebuild_guard(force=True, account=guard.account)
        snapshot = guard.account_snapshot()
    except GuardUnavailable:
        fail("Redis does not answer: the guard cannot be rebuilt now", code=1)
        return
    click.echo(
        f"rebuilt from the ledger: {snapshot.failures_in_window} failures in the window, "
        f"{snapshot.in_flight} in flight, headroom {snapshot.headroom}"
    )


@guard.command()
@click.argument("phone")
@click.option(
    "--by", "released_by", required=True, help="Who releases it (recorded in the ledger and the log)."
)
@click.option("--account", default=None, help="The account (default: UPESIPAY_ACCOUNT's).")
def release(phone: str, released_by: str, account: str | None) -> None:
    """Free a number held at its streak limit: its streak starts afresh and its waiting payments go out.

    UpesiPay documents no expiry for a streak: release a number only once the customer asked to be prompted
    again (the next failure would otherwise be the one UpesiPay blocks it for)."""
    from worker import reconcile
    from worker.guard import GuardUnavailable
    from worker.phones import PhoneNumberError, normalise_phone

    try:
        canonical = normalise_phone(phone)
    except PhoneNumberError as error:
        fail(f"PHONE: {error}")
        return
    if not released_by.strip():
        fail("--by: must name who releases the number")
    try:
        waiting = reconcile.release_phone(canonical, released_by.strip(), _account_guard(account).account)
    except GuardUnavailable:
        fail("Redis does not answer: the release is recorded and applies at the next rebuild", code=1)
        return
    click.echo(f"released {mask_phone(canonical)}: {waiting} waiting payments due now")


@guard.command()
@click.option("--repair", is_flag=True, help="Also resolve reservations whose attempt has ended.")
@click.option("--account", default=None, help="The account (default: UPESIPAY_ACCOUNT's).")
def verify(repair: bool, account: str | None) -> None:
    """Compare the guard's live state with what the ledger implies; exit 1 on drift."""
    from worker import reconcile
    from worker.guard import GuardUnavailable

    try:
        drift = reconcile.verify_guard(repair=repair, account=_account_guard(account).account)
    except GuardUnavailable:
        fail("Redis does not answer: the guard cannot be verified now", code=1)
        return
    for item in drift.items:
        click.echo(f"drift: {item}")
    if drift.repaired:
        click.echo(f"repaired {drift.repaired}")
    if drift.count:
        raise SystemExit(1)
    click.echo("no drift: the guard agrees with the ledger")


@main.group()
def db() -> None:
    """Database schema."""


@db.command()
def upgrade() -> None:
    """Create or upgrade the ledger's tables (Alembic migrations to the newest revision)."""
    from worker import runtime
    from worker.logs import setup_logging
    from worker.migrations import DatabaseNotMigrated, current_revisions
    from worker.migrations import upgrade as upgrade_schema

    setup_logging(runtime.settings())
    try:
        upgrade_schema(runtime.engine())
    except DatabaseNotMigrated as error:
        fail(str(error))
    click.echo(f"database is up to date (revision {', '.join(sorted(current_revisions(runtime.engine())))})")


@db.command()
def check() -> None:
    """Exit 1 unless the database is migrated and matches the models (no drift)."""
    from worker import runtime
    from worker.migrations import DatabaseNotMigrated, require_migrated, schema_drift

    try:
        require_migrated(runtime.engine())
    except DatabaseNotMigrated as error:
        fail(str(error), code=1)
    differences = schema_drift(runtime.engine())
    if differences:
        fail(f"the database differs from the models: {differences}", code=1)
    click.echo("database is migrated and matches the models")


@main.command()
@click.option("--payments", default=12, show_default=True, help="How many sample payments to push.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON summary instead of a table.")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for payments to settle.")
@click.option(
    "--scenario",
    type=click.Choice(["mixed", "faults"]),
    default="mixed",
    show_default=True,
    help="mixed: one number per outcome (success, cancel, failures, no callback, rejected). faults: one number "
    "per payment while the sandbox drops 20% of callbacks, duplicates 10%, times out 10% of sends and answers "
    "5% with a 5xx (try --payments 500).",
)
@click.option("--workers", default=1, show_default=True, help="`celery worker` processes to start.")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep every process's log (and the SQLite ledger) in this folder instead of deleting them.",
)
def demo(
    payments: int, as_json: bool, timeout: float, scenario: str, workers: int, log_dir: Path | None
) -> None:
    """Start everything on this machine, push a sample batch with mixed outcomes, print what happened.

    Starts (and afterwards stops) Redis if REDIS_URL does not answer, the UpesiPay sandbox, the web app, a
    worker and beat, with a SQLite ledger in a temporary folder. Leaves nothing running.
    """
    from worker.local.demo import run_demo

    summary = run_demo(
        payments=payments,
        timeout_s=timeout,
        echo=None if as_json else click.echo,
        scenario=scenario,
        workers=workers,
        log_dir=log_dir,
    )
    if as_json:
        click.echo(json.dumps(summary, default=str))
    sys.exit(0 if summary["all_settled"] else 1)


def _register_sandbox() -> None:
    from worker.sandbox.cli import sandbox_command

    main.add_command(sandbox_command, name="sandbox")


_register_sandbox()


def _register_batch() -> None:
    from worker.cli.batch import batch_command, batch_resume_command, batch_status_command

    main.add_command(batch_command, name="batch")
    main.add_command(batch_status_command, name="batch-status")
    main.add_command(batch_resume_command, name="batch-resume")


_register_batch()


def _register_webhook() -> None:
    from worker.cli.account import account_command
    from worker.cli.webhook import webhook_command

    main.add_command(webhook_command, name="webhook")
    main.add_command(account_command, name="account")


_register_webhook()
