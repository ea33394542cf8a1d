"""`stkpush sandbox` / `python -m worker.sandbox.cli`: serve the UpesiPay sandbox with uvicorn."""

from __future__ import annotations

import click
import uvicorn

from worker.sandbox.app import SandboxConfig, create_app
from worker.sandbox.rules import AbuseLimits
from worker.sandbox.scenario import Scenario, ScenarioError, load_scenario

DEFAULT_PORT = 8070
# Long enough for in-flight answers, short enough that a `hang` fault never holds a shutdown for long.
GRACEFUL_SHUTDOWN_S = 3

HELP = """Serve the UpesiPay sandbox: the documented STK push API, UpesiPay's abuse rules, scripted outcomes and
faults. State lives in memory; nothing is written to disk.

\b
Point a worker at it:
  UPESIPAY_BASE_URL=http://127.0.0.1:PORT  UPESIPAY_AUTH_TOKEN=<one of the --token values>
Each --token is one UpesiPay account (account-1, account-2, ... in /sandbox/stats, in the order given),
with abuse counters of its own (stats: rule_triggers_by_account, pushes_by_account).

\b
API (every call needs "Authorization: Basic <token>", else 401 {"error_message": ...}):
  POST /api/v2/payments   {"amount", "phone_number", "channel_id", "provider": "m-pesa",
                           optional "external_reference", "customer_name", "callback_url", "credential_id"}
       201 {"success": true, "status": "QUEUED", "reference", "CheckoutRequestID"}
       400 {"error_message": "Invalid request: <field> ..."}   415 Content-Type is not application/json
       413 body over 64 KiB   429 abuse protection or the rate_limit fault (with Retry-After)
       Unknown body fields are ignored.
  GET  /api/v2/transaction-status?reference=R
       {transaction_date, provider, success, merchant, payment_reference, third_party_reference, status,
        reference, CheckoutRequestID, provider_reference, external_reference}; status QUEUED until the
        outcome, then SUCCESS or FAILED; the M-Pesa receipt is in provider_reference once SUCCESS.
       404 {"error_message": "Transaction not found"}
  GET  /api/v2/transactions?page=1&per=20[&external_reference=X]
       {"data": [items as above], "page", "per", "total"}: the token's pushes, newest first, per <= 100;
       a push is listed only list_lag_s after it was recorded (scenario, default 0).

\b
Abuse protection, per account, on the sandbox clock. Outcomes count when they happen, with or without a
callback; every non-zero ResultCode (cancelled included) is a failure; refused requests never count.
  - the 11th successive failure on one number blocks that number for 24 h from that outcome; a success
    resets the streak; other numbers are not affected;
  - the 51st / 501st / 1001st failure inside a sliding 6 h window restricts the account for 4 / 24 / 72 h
    from that failure.
  A refused push gets 429 with "Retry-After: <seconds until the end>" and the body
    {"error_message": "STK push blocked for this phone number by abuse protection until <ISO time>"}
    {"error_message": "Account restricted from STK push by abuse protection until <ISO time>"}
  The scenario's "abuse_answer" changes that answer: "retry_after_and_until" (the default, as above),
  "retry_after" (no "until" in the message), "until" (no Retry-After header), "bare" (neither).

\b
Scenario (--scenario FILE or inline JSON starting with "{"; every key optional; unknown keys are refused):
  {"seed": 7,                      replaces --seed
   "callback_delay_s": 1.0,        push -> outcome (and its callback); replaces --callback-delay
   "late_delay_s": 30,             outcome -> a "late" callback; replaces --late-delay
   "abuse_answer": "retry_after_and_until",   how blocks and restrictions are answered (see above)
   "list_lag_s": 0,                a push shows in the transactions list only this long after it was made
   "default": ENTRY,               for numbers not in "phones"; default "success"
   "phones": {"0712345678": ENTRY, ...},   any phone form (07.., 01.., 254.., +254..)
   "faults": FAULTS,
   "description": "free text"}
  ENTRY is an outcome NAME, or one of
    {"outcome": NAME, "duplicate": BOOL|P, "late": BOOL|P, "drop": BOOL|P}
    {"outcomes": {NAME: WEIGHT, ...}, "duplicate": P, "late": P, "drop": P}   relative weights, seeded draws
    {"sequence": [ENTRY, ...]}     "phones" only: one entry per push to that number, the last one repeats
  NAME (ResultCode): success (0, with a receipt), cancelled (1032), timeout (1037), insufficient (1),
    wrong_pin (2001), in_progress (1001), no_callback (FAILED 1037 at the provider, no callback ever),
    reject (no prompt: the push itself is answered 400 {"error_message": "Invalid request"}).
  duplicate: the same callback is POSTed twice.  late: it is POSTed late_delay_s after the outcome.
  drop: it is never POSTed, though the outcome happens (transaction-status shows it).
  P is a probability from 0 to 1; true is 1, false is 0.

\b
  FAULTS = {"latency_s": 0, "latency_jitter_s": 0, "error_5xx_rate": 0, "hang_rate": 0, "hang_s": 30,
            "reset_rate": 0, "rate_limit_rate": 0, "retry_after_s": 5, "endpoints": ["payments"]}
    endpoints: any of "payments", "transaction-status", "transactions" (latency applies to those too).
    The four rates are exclusive shares of the requests (their sum <= 1), drawn from the seed:
    error_5xx   half answer 500 AFTER the push was recorded (the customer IS prompted), a quarter 502 and
                a quarter 503 BEFORE anything was recorded; a client cannot tell which.
    hang        the push is recorded, the answer waits hang_s (dropped if the client leaves first).
    reset       the push is recorded, then the TCP connection is reset without any HTTP answer.
    rate_limit  429 {"error_message": "Too many requests"}, Retry-After: retry_after_s; nothing recorded.

\b
Control endpoints (no token; keep the sandbox on loopback):
  GET  /sandbox/stats            counters: pushes, outcomes, rule triggers, blocks, callbacks, faults
  GET  /sandbox/scenario         the scenario in force;  PUT /sandbox/scenario replaces it (same JSON)
  GET  /sandbox/clock            POST /sandbox/clock/advance {"seconds": N} moves the sandbox clock on
  POST /sandbox/reset            forgets every push, block and counter (keeps the scenario and the clock)
  POST /sandbox/other-channel    {"account": "account-1", "count": N, "phone": optional, "outcome": "cancelled"}
                                 N failed pushes the merchant made without stkpush (payment buttons, the
                                 dashboard): they count in the abuse rules and show in the transactions list
                                 (FAILED, no external_reference), with no callback; without "phone" each goes
                                 to a number of its own. 200 {"recorded": N, "rule_triggers": T}
"""


def serve(app: object, host: str, port: int, *, log_level: str = "warning") -> None:
    """The uvicorn settings the sandbox runs with (the benchmark's baseline uses the same)."""
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # one log line per request would cost more than the request
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def _scenario(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Scenario:
    if value is None:
        return Scenario()
    try:
        return load_scenario(value)
    except ScenarioError as error:
        raise click.BadParameter(str(error)) from None


@click.command("sandbox", help=HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    "tokens",
    multiple=True,
    required=True,
    help="An accepted Basic token; repeat for several accounts. Never logged.",
)
@click.option(
    "--scenario", callback=_scenario, help="Scenario: a JSON file, or inline JSON. Default: all succeed."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random draw.")
@click.option(
    "--callback-delay",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds from a push to its outcome and callback; 0 applies the outcome before the 201.",
)
@click.option("--late-delay", default=30.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--abuse-window",
    default=6 * 3600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds of the sliding failure window (UpesiPay's is 6 h); shorter for time-scaled benchmarks.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def sandbox_command(
    host: str,
    port: int,
    tokens: tuple[str, ...],
    scenario: Scenario,
    seed: int,
    callback_delay: float,
    late_delay: float,
    abuse_window: float,
    log_level: str,
) -> None:
    try:
        config = SandboxConfig(
            tokens=tokens,
            scenario=scenario,
            seed=seed,
            callback_delay_s=callback_delay,
            late_delay_s=late_delay,
            limits=AbuseLimits(window_s=abuse_window),
        )
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    click.echo(f"UpesiPay sandbox on http://{host}:{port} for {len(config.tokens)} account(s)", err=True)
    serve(create_app(config), host, port, log_level=log_level)


if __name__ == "__main__":
    sandbox_command()
