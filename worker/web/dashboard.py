"""`/dashboard`: one page for the operator, refreshing itself from `/dashboard/data`.

It shows the account's failure budget (the guard's window, in-flight sends, headroom), restrictions (a provider or
threshold restriction, the credentials pause), blocked numbers (masked), payments by state and the progress of each
running batch. The page is self-contained (no external scripts or styles) and writes data only as text, never as
HTML, so a batch file name cannot inject markup.
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import Engine, func
from sqlmodel import col, select

from worker import forecast, other_channels, runtime
from worker.accounts import UnknownAccount
from worker.guard import Guard
from worker.ledger import (
    TERMINAL_STATES,
    Batch,
    BatchState,
    Payment,
    PaymentState,
    count_by_state,
    session_scope,
    utcnow,
)

__all__ = ["router", "snapshot"]

# Numbers examined for blocks per refresh: those with a DEFERRED payment or a recent failure, newest first. The
# guard answers one number per round trip, so this bounds the cost of a refresh.
BLOCKED_CANDIDATES = 100
RUNNING_BATCHES_SHOWN = 50
DEFAULT_REFRESH_S = 5.0

router = APIRouter()


def _iso(epoch_s: float | None) -> str | None:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds") if epoch_s else None


def _guard_view(guard: Guard) -> dict[str, Any]:
    account = guard.account_snapshot()
    limit = guard.limits.account_failure_limit
    restricted = account.restricted_until is not None and account.restricted_until > time.time()
    return {
        "available": True,
        "failure_limit": limit,
        "window_s": guard.limits.account_window_s,
        "failures_in_window": account.failures_in_window,
        "in_flight": account.in_flight,
        "headroom": account.headroom,
        "bulk_in_flight": account.bulk_in_flight,
        "bulk_headroom": account.bulk_headroom,
        "interactive_reserve": guard.limits.interactive_reserve,
        "budget_used_pct": round(100 * (account.failures_in_window + account.in_flight) / limit, 1),
        "restricted_until": _iso(account.restricted_until) if restricted else None,
        "restriction_reason": account.restriction_reason if restricted else None,
        "blocked_numbers": account.blocked_numbers,
    }


def _blocked_numbers(engine: Engine, guard: Guard, account: str) -> list[dict[str, Any]]:
    since = utcnow() - timedelta(seconds=guard.limits.phone_cooldown_s)
    latest = func.max(Payment.updated_at)
    with session_scope(engine) as session:
        phones = session.exec(
            select(Payment.phone, latest)
            .where(Payment.account == account)
            .where(
                (col(Payment.state) == PaymentState.DEFERRED)
                | (
                    col(Payment.state).in_([PaymentState.FAILED, PaymentState.CANCELLED])
                    & (col(Payment.updated_at) >= since)
                )
            )
            .group_by(Payment.phone)
            .order_by(latest.desc())
            .limit(BLOCKED_CANDIDATES)
        ).all()
    blocked = []
    now = time.time()
    for phone, _updated in phones:
        view = guard.phone_snapshot(phone)  # masked by the guard
        if view.blocked_until is None or view.blocked_until <= now:
            continue
        at_limit = view.streak >= guard.limits.phone_streak_limit
        blocked.append(
            {
                "phone": view.phone,
                "until": "a success or a release" if view.held else _iso(view.blocked_until),
                "streak": view.streak,
                "cause": "failure streak at the limit" if at_limit else "blocked by UpesiPay",
            }
        )
    return blocked


def _running_batches(engine: Engine, account: str) -> list[dict[str, Any]]:
    terminal = [state.value for state in TERMINAL_STATES]
    with session_scope(engine) as session:
        unfinished = (
            select(Payment.batch_id)
            .where(Payment.account == account, col(Payment.batch_id).is_not(None))
            .where(col(Payment.state).not_in(terminal))
            .distinct()
        )
        batches = session.exec(
            select(Batch)
            .where(Batch.account == account)
            .where((col(Batch.state) == BatchState.INGESTING) | col(Batch.id).in_(unfinished))
            .order_by(col(Batch.created_at))
            .limit(RUNNING_BATCHES_SHOWN)
        ).all()
        ids = [batch.id for batch in batches]
        rows = session.exec(
            select(Payment.batch_id, Payment.state, func.count())
            .where(col(Payment.batch_id).in_(ids))
            .group_by(Payment.batch_id, Payment.state)
        ).all()
    by_batch: dict[str, dict[str, int]] = {batch_id: {} for batch_id in ids}
    for batch_id, state, count in rows:
        if batch_id is not None:
            by_batch[batch_id][PaymentState(state).value] = int(count)
    views = []
    for batch in batches:
        states = by_batch[batch.id]
        payments = sum(states.values())
        done = sum(count for state, count in states.items() if state in terminal)
        views.append(
            {
                "id": batch.id,
                "source_name": batch.source_name,
                "state": batch.state.value,
                "rows_total": batch.rows_total,
                "payments": payments,
                "done": done,
                "succeeded": states.get(PaymentState.SUCCEEDED.value, 0),
                "progress_pct": round(100 * done / payments, 1) if payments else 0.0,
                "by_state": states,
                "created_at": batch.created_at.isoformat(timespec="seconds"),
                "paused": batch.paused_at is not None,
                "pause_reason": batch.pause_reason,
                "finish_at": _finish_at(engine, batch.id),
            }
        )
    return views


def _finish_at(engine: Engine, batch_id: str) -> str | None:
    eta = forecast.batch_forecast(engine, batch_id, runtime.settings())
    if eta is None or eta.finish_at is None:
        return None
    return eta.finish_at.isoformat(timespec="seconds")


def _other_channels_view(account: str) -> dict[str, Any]:
    settings = runtime.settings()
    try:
        reading = other_channels.last_reading(account)
    except Exception as error:  # Redis away: the ledger's count still shows
        reading = {"readable": False, "problem": f"unknown ({type(error).__name__})"}
    return {
        "enabled": settings.other_channels_poll_s > 0,
        "failures_in_window": other_channels.failures_in_window(account, settings.account_window_s),
        "readable": None if reading is None else bool(reading["readable"]),
        "problem": None if reading is None else reading.get("problem"),
    }


def snapshot(account: str | None = None) -> dict[str, Any]:
    """Everything the dashboard shows of `account` (None: the environment's), as JSON-ready values; phone numbers
    masked. UnknownAccount when there is no such account."""
    engine, account = runtime.engine(), runtime.account(account).name
    payments = count_by_state(engine, account)
    data: dict[str, Any] = {
        "account": account,
        "accounts": runtime.accounts(),  # the switcher's choices
        "generated_at": utcnow().isoformat(timespec="seconds"),
        "payments": payments,
        "payments_total": sum(payments.values()),
        "batches": _running_batches(engine, account),
        "other_channels": _other_channels_view(account),
    }
    settings = runtime.settings_of(account)
    budget = forecast.budget_forecast(engine, account, settings)
    data["forecast"] = budget.as_dict()
    data["chart"] = {
        "limit": settings.account_failure_limit,
        "reserve": settings.interactive_reserve,
        "bulk_budget": budget.bulk_budget,
        "points": forecast.window_series(engine, account, settings),
    }
    try:
        guard = runtime.guard_of(account)
        data["guard"] = _guard_view(guard)
        data["blocked"] = _blocked_numbers(engine, guard, account)
        data["paused_s"] = round(runtime.credentials_pause_of(account).remaining_s(), 1)
    except Exception as error:  # the guard's Redis is away: show that, keep the ledger's numbers
        data["guard"] = {"available": False, "error": type(error).__name__}
        data["blocked"] = []
        data["paused_s"] = None
    return data


AccountChoice = Annotated[str | None, Query(max_length=64, description="default: the environment's account")]


def _snapshot_of(account: str | None) -> dict[str, Any]:
    try:
        return snapshot(account)
    except UnknownAccount:
        raise HTTPException(404, detail="no such account") from None


@router.get("/dashboard/data")
def dashboard_data(account: AccountChoice = None) -> dict[str, Any]:
    return _snapshot_of(account)


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    every: float = Query(DEFAULT_REFRESH_S, ge=1, le=300), account: AccountChoice = None
) -> HTMLResponse:
    # The first render comes with the page (no blank flash, and it works for a reader without scripts running
    # yet); the script then refreshes from /dashboard/data every `every` seconds.
    initial = json.dumps(_snapshot_of(account)).replace("<", "\\u003c")
    nonce = secrets.token_urlsafe(18)
    page = (
        PAGE.replace("__NONCE__", nonce)
        .replace("__EVERY_MS__", str(int(every * 1000)))
        .replace("__INITIAL__", initial)  # last: the data must not be searched for placeholders
    )
    headers = {
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": content_security_policy(nonce),
    }
    return HTMLResponse(page, headers=headers)


def content_security_policy(nonce: str) -> str:
    """Only the page's own inline script and style (this response's nonce) run; it may fetch only from here.

    A value that slipped past the text-only rendering (a batch name, a reason) still could not run a script,
    load one from elsewhere, or send data anywhere but this origin."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>stkpush dashboard</title>
<style nonce="__NONCE__">
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 12px 24px; display: flex; gap: 24px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  #status { margin-left: auto; font-size: 13px; opacity: .8; }
  #status.stale { color: #ffb4a8; opacity: 1; }
  main { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 16px; padding: 16px 24px; }
  section { background: #fff; border-radius: 8px; padding: 14px 18px; box-shadow: 0 1px 2px #0002; }
  section h2 { font-size: 14px; text-transform: uppercase; letter-spacing: .05em; color: #5a6275; margin: 0 0 10px; }
  .big { font-size: 34px; font-weight: 600; }
  .muted { color: #6b7385; font-size: 13px; }
  .meter { height: 10px; background: #e4e7ee; border-radius: 5px; overflow: hidden; margin: 8px 0; }
  .meter > div { height: 100%; background: #2f9e6e; width: 0; }
  .meter.warn > div { background: #e0a100; } .meter.bad > div { background: #d64545; }
  table { width: 100%; border-collapse: collapse; font-size: 14px; }
  td, th { text-align: left; padding: 4px 6px; border-bottom: 1px solid #eceef3; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .none { color: #6b7385; font-style: italic; }
  .alert { color: #b42318; font-weight: 600; }
</style>
</head>
<body data-refreshes="0">
<header><h1>stkpush</h1><span>account <b id="account"></b></span>
<label>switch to <select id="account-switch"></select></label><span id="status">loading</span></header>
<main>
  <section id="budget">
    <h2>Failure budget</h2>
    <div><span class="big" id="failures"></span> <span class="muted">failed in the window, of
      <span id="limit"></span></span></div>
    <div class="meter" id="meter"><div></div></div>
    <table>
      <tr><td>in flight (possible failures)</td><td class="n" id="in-flight"></td></tr>
      <tr><td>headroom (sends allowed now)</td><td class="n" id="headroom"></td></tr>
      <tr><td>batch sends in flight</td><td class="n" id="bulk-in-flight"></td></tr>
      <tr><td>batch headroom (after the <span id="reserve"></span> kept for single payments)</td>
        <td class="n" id="bulk-headroom"></td></tr>
      <tr><td>window</td><td class="n" id="window"></td></tr>
      <tr><td>numbers under an UpesiPay block</td><td class="n" id="blocked-count"></td></tr>
      <tr><td>of the failures, from other channels</td><td class="n" id="other-channels"></td></tr>
    </table>
  </section>
  <section id="window-chart">
    <h2>Failure window, last 6 h</h2>
    <svg id="failure-chart" viewBox="0 0 360 140" width="100%" role="img"
      aria-label="failures in the window over the last 6 hours, with the limit and the reserve"></svg>
    <p class="muted">budget frees next: <span id="next-free"></span>; bulk lane full until:
      <span id="bulk-free"></span></p>
  </section>
  <section id="restrictions"><h2>Restrictions</h2><div id="restriction-list"></div></section>
  <section id="payments">
    <h2>Payments by state</h2>
    <table id="payment-states"></table>
    <p class="muted">total <span id="payments-total"></span></p>
  </section>
  <section id="blocked"><h2>Blocked numbers</h2><table id="blocked-list"></table></section>
  <section id="batches"><h2>Running batches</h2><table id="batch-list"></table></section>
</main>
<script nonce="__NONCE__">
"use strict";
const INITIAL = __INITIAL__;
const EVERY_MS = __EVERY_MS__;
const DATA_URL = new URL("dashboard/data", window.location.href);
const CHOSEN = new URL(window.location.href).searchParams.get("account");
if (CHOSEN) DATA_URL.searchParams.set("account", CHOSEN);
let refreshes = 0;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function set(id, text) { document.getElementById(id).textContent = String(text); }
function row(cells) {
  const tr = el("tr");
  cells.forEach(([text, cls]) => tr.appendChild(el("td", text, cls)));
  return tr;
}
function fill(id, rows, empty) {
  const table = document.getElementById(id);
  table.replaceChildren(...(rows.length ? rows : [row([[empty, "none"]])]));
}
function duration(seconds) {
  if (seconds >= 3600) return (seconds / 3600).toFixed(1) + " h";
  if (seconds >= 60) return Math.round(seconds / 60) + " min";
  return Math.round(seconds) + " s";
}

function switcher(d) {
  // The account switcher: the page again with ?account=NAME (the data's own list of enabled accounts).
  const select = document.getElementById("account-switch");
  if (select.options.length === d.accounts.length) return;
  select.replaceChildren(...d.accounts.map((name) => {
    const option = el("option", name);
    option.value = name;
    option.selected = name === d.account;
    return option;
  }));
  select.onchange = () => {
    const next = new URL(window.location.href);
    next.searchParams.set("account", select.value);
    window.location.assign(next.toString());
  };
}

function render(d) {
  set("account", d.account);
  switcher(d);
  const g = d.guard;
  if (g.available) {
    set("failures", g.failures_in_window);
    set("limit", g.failure_limit);
    set("in-flight", g.in_flight);
    set("headroom", g.headroom);
    set("bulk-in-flight", g.bulk_in_flight);
    set("bulk-headroom", g.bulk_headroom);
    set("reserve", g.interactive_reserve);
    set("window", duration(g.window_s));
    set("blocked-count", g.blocked_numbers);
    const meter = document.getElementById("meter");
    meter.firstElementChild.style.width = Math.min(g.budget_used_pct, 100) + "%";
    meter.className = "meter" + (g.budget_used_pct >= 90 ? " bad" : g.budget_used_pct >= 60 ? " warn" : "");
  } else {
    ["failures", "in-flight", "headroom", "bulk-in-flight", "bulk-headroom", "blocked-count"]
      .forEach((id) => set(id, "?"));
    set("limit", "? (guard unavailable: " + g.error + ")");
  }
  const restrictions = [];
  if (g.available && g.restricted_until) {
    const why = g.restriction_reason || "";
    restrictions.push(el("p", "Account restricted until " + g.restricted_until + ": " + why, "alert"));
  }
  if (d.paused_s) {
    const text = "Sending paused for " + duration(d.paused_s) + ": UpesiPay refused the credentials";
    restrictions.push(el("p", text, "alert"));
  }
  if (!g.available) restrictions.push(el("p", "Unknown: the guard cannot be read, so nothing is being sent", "alert"));
  if (d.payments.UNKNOWN) {
    const text = d.payments.UNKNOWN + " payments UNKNOWN: their send may have reached UpesiPay; they are never " +
      "resent without proof (see the runbook)";
    restrictions.push(el("p", text, "alert unknown-payments"));
  }
  const oc = d.other_channels;
  set("other-channels", oc.enabled ? oc.failures_in_window : "not read");
  if (oc.enabled && oc.readable === false) {
    const text = "Failures from other channels are not counted: the transactions list could not be read (" +
      oc.problem + "); only the margin below UpesiPay's limit protects the account";
    restrictions.push(el("p", text, "alert"));
  }
  document.getElementById("restriction-list").replaceChildren(
    ...(restrictions.length ? restrictions : [el("p", "none", "none")]));

  fill("payment-states", Object.entries(d.payments).map(([state, count]) => {
    const tr = row([[state], [count, "n"]]);
    tr.dataset.state = state;
    return tr;
  }), "no payments");
  set("payments-total", d.payments_total);
  chart(d.chart);
  set("next-free", d.forecast.next_free_at || "now (no failures in the window)");
  set("bulk-free", d.forecast.bulk_free_at || "not full");

  fill("blocked-list", d.blocked.map((b) => row([[b.phone], [b.cause], ["until " + b.until, "muted"]])),
       "no blocked numbers");

  fill("batch-list", d.batches.map((b) => {
    const tr = row([[b.source_name], [b.done + " / " + b.payments + " settled", "n"],
                    [b.progress_pct + "%", "n"], [b.succeeded + " succeeded", "n muted"],
                    [b.finish_at ? "finish ~" + b.finish_at : "", "muted"],
                    [b.paused ? "PAUSED: " + b.pause_reason : "", b.paused ? "alert" : "none"]]);
    tr.dataset.batch = b.id;
    return tr;
  }), "no running batches");
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, String(v)));
  if (text !== undefined) node.textContent = String(text);
  return node;
}
function chart(c) {
  // Drawn here from the page's own data: no library, nothing fetched from elsewhere.
  const W = 360, H = 140, L = 28, R = 6, T = 8, B = 18;
  const top = Math.max(c.limit, ...c.points.map((p) => p.failures)) * 1.1 || 1;
  const x = (i) => L + (W - L - R) * (c.points.length > 1 ? i / (c.points.length - 1) : 0);
  const y = (v) => T + (H - T - B) * (1 - v / top);
  const nodes = [
    svg("line", { x1: L, x2: W - R, y1: y(0), y2: y(0), stroke: "#9aa1b1" }),
    svg("line", { id: "chart-limit", x1: L, x2: W - R, y1: y(c.limit), y2: y(c.limit), stroke: "#d64545",
                  "stroke-dasharray": "4 3" }),
    svg("text", { x: 2, y: y(c.limit) + 4, "font-size": 10, fill: "#d64545" }, c.limit),
    svg("line", { id: "chart-reserve", x1: L, x2: W - R, y1: y(c.bulk_budget), y2: y(c.bulk_budget),
                  stroke: "#e0a100", "stroke-dasharray": "2 3" }),
    svg("text", { x: 2, y: y(c.bulk_budget) + 4, "font-size": 10, fill: "#b07e00" }, c.bulk_budget),
    svg("polyline", { id: "chart-line", fill: "none", stroke: "#2f6fd6", "stroke-width": 2,
                      points: c.points.map((p, i) => x(i).toFixed(1) + "," + y(p.failures).toFixed(1)).join(" ") }),
    svg("text", { x: L, y: H - 4, "font-size": 10, fill: "#6b7385" }, "-6 h"),
    svg("text", { x: W - R - 22, y: H - 4, "font-size": 10, fill: "#6b7385" }, "now"),
  ];
  const box = document.getElementById("failure-chart");
  box.dataset.points = String(c.points.length);
  box.replaceChildren(...nodes);
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch(DATA_URL, { cache: "no-store", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    refreshes += 1;
    document.body.dataset.refreshes = String(refreshes);
    status.className = "";
    status.textContent = "updated " + new Date().toLocaleTimeString() + ", every " + EVERY_MS / 1000 + " s";
  } catch (error) {
    status.className = "stale";
    status.textContent = "not refreshed (" + error.message + "); retrying";
  } finally {
    window.setTimeout(refresh, EVERY_MS);
  }
}

render(INITIAL);
document.getElementById("status").textContent = "as of " + INITIAL.generated_at;
window.setTimeout(refresh, EVERY_MS);
</script>
</body>
</html>
"""
