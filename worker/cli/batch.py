"""`stkpush batch FILE` and `stkpush batch-status BATCH_ID`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the batch modules load only when a batch command runs: every other command starts faster
    from producers.batch.reading import ReadProgress

# Without a terminal, one progress line per this share of the file (and at least this often in seconds), so a
# log of a long run shows it moving without drowning in lines.
PLAIN_PROGRESS_STEP = 0.1
PLAIN_PROGRESS_EVERY_S = 10.0

EXIT_CLEAN = 0
EXIT_SOME_ROWS_BAD = 1
EXIT_NOTHING_RECORDED = 2


class ProgressDisplay:
    """A progress bar on a terminal; plain lines otherwise (CI logs, pipes). Written to stderr, so `--json`
    output on stdout stays machine-readable."""

    def __init__(self, total_bytes: int, *, terminal: bool | None = None) -> None:
        self.total_bytes = max(total_bytes, 1)
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.phase = ""
        self.shown_bytes = 0
        self.bar: Any = None
        self.last_line_share = 0.0
        self.last_line_at = 0.0

    def __call__(self, phase: str, progress: ReadProgress, counts: Any) -> None:
        if phase != self.phase:
            self.close()
            self.phase, self.shown_bytes, self.last_line_share = phase, 0, -1.0
            if self.terminal:
                self.bar = click.progressbar(
                    length=self.total_bytes, label=phase.ljust(22), file=sys.stderr, show_percent=True
                )
                self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(progress.bytes_read - self.shown_bytes)
            self.shown_bytes = progress.bytes_read
            return
        share = progress.bytes_read / self.total_bytes
        now = time.monotonic()
        finished = share >= 1.0 > self.last_line_share
        step = share - self.last_line_share >= PLAIN_PROGRESS_STEP
        if finished or step or now - self.last_line_at >= PLAIN_PROGRESS_EVERY_S:
            self.last_line_share, self.last_line_at = share, now
            click.echo(
                f"{phase}: {progress.rows_read} rows read ({min(share, 1.0):.0%}), "
                f"{counts.rows_recorded} recorded, {counts.rows_skipped} skipped, {counts.bad_rows} bad",
                err=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total_bytes - self.shown_bytes)
            self.bar.__exit__(None, None, None)
            self.bar = None


def _lines_text(lines: list[int], total: int) -> str:
    if not lines:
        return ""
    shown = ", ".join(str(line) for line in lines)
    more = total - len(lines)
    return f" (lines {shown}{f' and {more} more' if more > 0 else ''})"


def _print_report(report: dict[str, Any]) -> None:
    click.echo(f"batch {report['batch_id']}: {report['state']}")
    if report["error"]:
        click.echo(f"  error: {report['error']}")
    click.echo(f"  {'rows read':<16}{report['rows_total']:>10}")
    click.echo(f"  {'recorded':<16}{report['rows_recorded']:>10}  KES {report['amount_requested']}")
    skipped_lines = _lines_text(report["skipped_lines"], report["rows_skipped"])
    click.echo(
        f"  {'skipped':<16}{report['rows_skipped']:>10}  already recorded with the same details{skipped_lines}"
    )
    click.echo(
        f"  {'conflicting':<16}{report['rows_conflicting']:>10}  reference already used with other details"
    )
    click.echo(f"  {'rejected':<16}{report['rows_rejected']:>10}  bad rows")
    click.echo(f"  {'queued':<16}{report['rows_queued']:>10}")
    if report["rows_not_queued"]:
        click.echo(
            f"  {'not yet queued':<16}{report['rows_not_queued']:>10}  recorded; Redis did not answer, the "
            "dispatcher queues them once it does"
        )
    if report["rejects_path"]:
        click.echo(f"  rejects file: {report['rejects_path']} (line, field, rule)")
    if report["state"] == "ABORTED":
        click.echo("  --all-or-nothing: bad rows found, nothing was recorded")


@click.command("batch")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path))
@click.option(
    "--format",
    "file_format",
    type=click.Choice(["csv", "jsonl"]),
    default=None,
    help="Default: from the name (.csv; .jsonl, .ndjson).",
)
@click.option("--all-or-nothing", is_flag=True, help="Record nothing if any row is bad.")
@click.option(
    "--rejects",
    "rejects_path",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Where bad rows are listed (line, field, rule). Default: FILE.rejects.csv.",
)
@click.option(
    "--reprompt",
    type=int,
    default=0,
    show_default=True,
    help="Further prompts (at most 5) for a row whose prompt was cancelled or not answered. 0: never twice.",
)
@click.option(
    "--reprompt-after",
    default=None,
    help="With --reprompt: the least time from a prompt's end to the next, e.g. 4h, 30m, 90s, 2d.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report.")
@click.option("--account", default=None, help="The UpesiPay account (default: UPESIPAY_ACCOUNT's).")
def batch_command(
    file: Path,
    file_format: str | None,
    all_or_nothing: bool,
    rejects_path: Path | None,
    reprompt: int,
    reprompt_after: str | None,
    as_json: bool,
    account: str | None,
) -> None:
    """Record and queue every payment of a bulk invoice FILE (CSV with a header row, or JSON Lines).

    CSV columns: external_reference, phone_number, amount (whole shillings, digits only), optional
    customer_name and channel_id. Every row is validated like `stkpush enqueue`; bad rows go to the rejects
    file. Running the same file again records nothing twice. Exit status: 0 every row good; 1 some rows
    rejected or conflicting (the good ones recorded); 2 nothing recorded (--all-or-nothing found bad rows, or
    the file is unusable).
    """
    from producers.batch import ingest_batch
    from worker.reprompts import RepromptError, check, parse_after

    try:
        reprompt, after_s = check(
            reprompt, parse_after(reprompt_after) if reprompt_after is not None else None
        )
    except RepromptError as error:
        click.echo(f"error: --{error.field.replace('_', '-')}: {error.rule}", err=True)
        sys.exit(EXIT_NOTHING_RECORDED)
    display = ProgressDisplay(file.stat().st_size)
    try:
        report = ingest_batch(
            file,
            file_format=file_format,
            all_or_nothing=all_or_nothing,
            reprompt=reprompt,
            reprompt_after_s=after_s,
            rejects_path=rejects_path or file.with_name(file.name + ".rejects.csv"),
            on_progress=display,
            account=account,
        )
    except ValueError as error:
        display.close()
        click.echo(f"error: {error}", err=True)
        sys.exit(EXIT_NOTHING_RECORDED)
    display.close()
    view = report.as_dict()
    if as_json:
        click.echo(json.dumps(view))
    else:
        _print_report(view)
    if report.state.value != "INGESTED":
        sys.exit(EXIT_NOTHING_RECORDED)
    sys.exit(EXIT_SOME_ROWS_BAD if report.counts.bad_rows else EXIT_CLEAN)


@click.command("batch-status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--account", default=None, help="The batch's account (default: UPESIPAY_ACCOUNT's).")
def batch_status_command(batch_id: str, as_json: bool, account: str | None) -> None:
    """Show a batch: its rows, its payments by state, money requested and collected, why payments wait."""
    from producers.batch import batch_status

    status = batch_status(batch_id, account)
    if status is None:
        click.echo("error: no batch with that id", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(status))
        return
    click.echo(f"batch {status['batch_id']}: {status['state']} ({status['source_name']})")
    if status["paused"]:
        click.echo(f"  PAUSED since {status['paused_at']}: {status['pause_reason']}")
        click.echo(f"  its waiting rows are held; resume with: stkpush batch-resume {status['batch_id']}")
    if status["error"]:
        click.echo(f"  error: {status['error']}")
    click.echo(
        f"  rows: {status['rows_total']} read, {status['rows_recorded']} recorded, {status['rows_skipped']} "
        f"skipped, {status['rows_rejected']} rejected, {status['rows_conflicting']} conflicting"
    )
    click.echo("  payments by state:")
    for state, count in status["payments_by_state"].items():
        if count:
            click.echo(f"    {state:<18}{count:>10}")
    click.echo(f"  money requested: KES {status['amount_requested']}")
    click.echo(f"  money collected: KES {status['amount_collected']}")
    if status["recorded_not_yet_queued"]:
        click.echo(f"  recorded, not yet queued: {status['recorded_not_yet_queued']}")
    if status["deferred_reasons"]:
        click.echo("  deferred, and why:")
        for reason, count in status["deferred_reasons"].items():
            click.echo(f"    {count:>8}  {reason}")
    if status["rejects_path"]:
        click.echo(f"  rejects file: {status['rejects_path']}")
    if status["reprompt"]:
        click.echo(
            f"  re-prompts: up to {status['reprompt']} per row, {status['reprompt_after_s']} s apart at least"
        )
    eta = status["forecast"]
    if eta is not None and eta["remaining_rows"]:
        finish = eta["finish_at"] or "unknown (beyond the forecast's reach)"
        click.echo(
            f"  forecast: {eta['remaining_rows']} rows left, observed failure rate "
            f"{eta['observed_failure_rate']:.0%} over {eta['prompts_ended']} prompts, finish about {finish}"
        )
    if eta is not None:
        budget = eta["budget"]
        click.echo(
            f"  failure budget: {budget['failures_in_window']} of {budget['limit']} used in the window "
            f"(bulk lane {budget['bulk_budget']}); frees next at {budget['next_free_at'] or 'now (none used)'}"
        )


@click.command("batch-resume")
@click.argument("batch_id")
@click.option("--account", default=None, help="The batch's account (default: UPESIPAY_ACCOUNT's).")
def batch_resume_command(batch_id: str, account: str | None) -> None:
    """Resume a batch that paused itself: its held rows are released within the bulk lane's headroom."""
    from producers.batch import batch_status
    from worker import batch_brake

    if batch_status(batch_id, account) is None:
        click.echo("error: no batch with that id", err=True)
        sys.exit(1)
    released = batch_brake.resume(batch_id)
    if released is None:
        click.echo("error: the batch is not paused", err=True)
        sys.exit(3)
    click.echo(f"batch {batch_id} resumed: {released} held payments released")
