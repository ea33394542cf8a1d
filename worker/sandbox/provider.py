"""The sandbox's provider side: recorded pushes, their outcomes on the sandbox clock, callbacks, and counters.

Everything here runs on the server's event loop and keeps its state in memory. Outcomes are decided when a push
is recorded (so a seed replays them) and applied when they are due: lazily at the start of every request and by
one scheduler task for callbacks that must go out while nobody asks.

It is one class a little over 400 lines on purpose: every method reads and writes the same in-memory provider
state on one event loop, and the abuse rules (rules.py) and scenarios (scenario.py) already live apart.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import random
import string
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from worker.phones import mask_phone
from worker.sandbox.rules import AccountRules
from worker.sandbox.scenario import OUTCOMES, OutcomePlan, Scenario

if TYPE_CHECKING:
    from worker.sandbox.config import SandboxConfig

log = logging.getLogger("stkpush.sandbox")

_ALPHABET = string.ascii_uppercase + string.digits
# M-Pesa stamps CheckoutRequestIDs in Nairobi time.
_NAIROBI = timezone(timedelta(hours=3))
_OUTCOME, _CALLBACK = 0, 1

# Every request applies due outcomes itself; the scheduler only has to send callbacks when nobody asks, so
# under load it wakes at most this often instead of once per push.
SCHEDULER_TICK_S = 0.01

REFUSALS = ("blocked", "restricted", "invalid", "unauthorized", "rate_limited", "rejected")
FAULT_COUNTERS = ("latency", "rate_limited", "error_500", "error_502", "error_503", "hang", "reset")


def iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class PushInput:
    """A validated POST /api/v2/payments body; `phone` is canonical (2547...)."""

    amount: int
    phone: str
    channel_id: int
    external_reference: str | None = None
    customer_name: str | None = None
    callback_url: str | None = None
    credential_id: str | None = None

    def __repr__(self) -> str:
        return f"PushInput(amount={self.amount}, phone={mask_phone(self.phone)!r})"


@dataclass(slots=True, eq=False)
class Transaction:
    account: str
    push: PushInput
    plan: OutcomePlan
    reference: str
    checkout_request_id: str
    merchant_request_id: str
    receipt: str  # revealed only once the outcome is a success
    created_at: float
    status: str = "QUEUED"

    def item(self) -> dict[str, Any]:
        """The transaction-status body, also one item of the transactions list."""
        receipt = self.receipt if self.status == "SUCCESS" else None
        return {
            "transaction_date": iso(self.created_at),
            "provider": "m-pesa",
            "success": self.status == "SUCCESS",
            "merchant": self.account,
            "payment_reference": self.merchant_request_id,
            "third_party_reference": receipt,
            "status": self.status,
            "reference": self.reference,
            "CheckoutRequestID": self.checkout_request_id,
            "provider_reference": receipt,
            "external_reference": self.push.external_reference,
        }

    def callback_body(self) -> bytes:
        kind = OUTCOMES[self.plan.outcome]
        success = kind.result_code == 0
        response = {
            "Amount": self.push.amount,
            "CheckoutRequestID": self.checkout_request_id,
            "ExternalReference": self.push.external_reference or "",
            "MerchantRequestID": self.merchant_request_id,
            "MpesaReceiptNumber": self.receipt if success else "",
            "Phone": "+" + self.push.phone,
            "ResultCode": kind.result_code,
            "ResultDesc": kind.result_desc,
            "Status": kind.callback_status,
        }
        return json.dumps({"forward_url": "", "response": response, "status": success}).encode()


class SandboxProvider:
    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.clock = config.clock
        self.scenario: Scenario = config.scenario
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self.reset()

    # ---- settings: the scenario's own, else the config's ------------------------------------------------
    @property
    def seed(self) -> int:
        return self.config.seed if self.scenario.seed is None else self.scenario.seed

    @property
    def callback_delay_s(self) -> float:
        delay = self.scenario.callback_delay_s
        return self.config.callback_delay_s if delay is None else delay

    @property
    def late_delay_s(self) -> float:
        delay = self.scenario.late_delay_s
        return self.config.late_delay_s if delay is None else delay

    # ---- state --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every push, outcome, block and counter; scheduled callbacks are dropped. Reseeds all draws."""
        for task in self._deliveries:
            task.cancel()
        self._deliveries = set()
        accounts = self.config.accounts
        self.transactions: dict[str, Transaction] = {}
        self._by_account: dict[str, list[Transaction]] = {label: [] for label in accounts}
        self._by_external: dict[tuple[str, str], list[Transaction]] = {}
        self._checkout_ids: set[str] = set()
        self._stamp_second, self._stamp = -1, ""
        self.rules = {label: AccountRules(self.config.limits) for label in accounts}
        self._events: list[tuple[float, int, int, Transaction]] = []
        self._event_ids = itertools.count()
        self._sequence_positions: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._ids_rng = random.Random(f"{self.seed}:ids")
        self.reseed()
        self.pushes_total = 0
        self.pushes_by_reference: Counter[str] = Counter()
        self.rule_triggers = dict.fromkeys(self.config.limits.rule_names, 0)
        # The same counts per account label: each token is an account with abuse counters of its own.
        self.rule_triggers_by_account = {
            label: dict.fromkeys(self.config.limits.rule_names, 0) for label in accounts
        }
        self.pushes_by_account: Counter[str] = Counter()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.queued = 0
        self.callbacks_sent = 0
        self.callbacks_failed = 0
        self.callbacks_dropped = 0
        self.refused = dict.fromkeys(REFUSALS, 0)
        self.faults = dict.fromkeys(FAULT_COUNTERS, 0)
        self.inflight_max_per_phone = 0
        self.other_channel_failures = dict.fromkeys(accounts, 0)
        self._wake.set()

    def reseed(self) -> None:
        """Outcome and fault draws restart from the seed: the same requests in the same order replay exactly."""
        self.outcome_rng = random.Random(f"{self.seed}:outcomes")
        self.fault_rng = random.Random(f"{self.seed}:faults")

    def replace_scenario(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self._sequence_positions.clear()
        self.reseed()

    # ---- pushes -------------------------------------------------------------------------------------------
    def refusal(self, account: str, phone: str) -> tuple[str, float] | None:
        """("restricted" | "blocked", until) when abuse protection refuses this push now."""
        rules, now = self.rules[account], self.clock.now()
        until = rules.restriction_end(now)
        if until is not None:
            return "restricted", until
        until = rules.phone_block_end(phone, now)
        if until is not None:
            return "blocked", until
        return None

    def plan_for(self, phone: str) -> OutcomePlan:
        rule = self.scenario.rule_for(phone)
        if rule.sequence:
            position = self._sequence_positions.get(phone, 0)
            self._sequence_positions[phone] = position + 1
            rule = rule.sequence[min(position, len(rule.sequence) - 1)]  # the last entry repeats
        return rule.plan(self.outcome_rng)

    def record(self, account: str, push: PushInput, plan: OutcomePlan) -> Transaction:
        """The push reaches the phone: store it and schedule its outcome."""
        now = self.clock.now()
        transaction = self._store(account, push, plan, now)
        if push.external_reference is not None:
            self.pushes_by_reference[push.external_reference] += 1
        self.pushes_total += 1
        self.pushes_by_account[account] += 1
        delay = self.callback_delay_s
        if delay <= 0:
            # Applied before the 201 goes out, so the very next request sees its effect on the abuse rules.
            self._apply_outcome(transaction, now)
        else:
            self._schedule(now + delay, _OUTCOME, transaction)
        return transaction

    def _store(self, account: str, push: PushInput, plan: OutcomePlan, now: float) -> Transaction:
        rng = self._ids_rng
        reference = _code(rng, 10)
        while reference in self.transactions:
            reference = _code(rng, 10)
        merchant_high, merchant_low = divmod(rng.randrange(9000 * 90_000_000), 90_000_000)
        transaction = Transaction(
            account=account,
            push=push,
            plan=plan,
            reference=reference,
            checkout_request_id=self._checkout_request_id(push.phone, now),
            merchant_request_id=f"{1000 + merchant_high}-{10_000_000 + merchant_low}-1",
            receipt="S" + _code(rng, 9),
            created_at=now,
        )
        self.transactions[reference] = transaction
        self._by_account[account].append(transaction)
        if push.external_reference is not None:
            self._by_external.setdefault((account, push.external_reference), []).append(transaction)
        self.queued += 1
        inflight = self._inflight.get(push.phone, 0) + 1
        self._inflight[push.phone] = inflight
        self.inflight_max_per_phone = max(self.inflight_max_per_phone, inflight)
        return transaction

    def record_other_channel_failures(self, account: str, count: int, phone: str | None, outcome: str) -> int:
        """Pushes the merchant made without stkpush (payment buttons, the dashboard) that failed just now.

        They count against the account's abuse rules and appear in the transactions list like any push, with no
        external reference and no callback: stkpush can learn of them only by reading the list. With no `phone`,
        each goes to a number of its own. Returns how many abuse rules they triggered."""
        now, before = self.clock.now(), sum(self.rule_triggers.values())
        for _ in range(count):
            number = phone or "2547" + "".join(self._ids_rng.choices(string.digits, k=8))
            push = PushInput(amount=1, phone=number, channel_id=1)
            transaction = self._store(account, push, OutcomePlan(outcome), now)
            self._apply_outcome(transaction, now)
        self.other_channel_failures[account] += count
        return sum(self.rule_triggers.values()) - before

    def _checkout_request_id(self, phone: str, now: float) -> str:
        # ws_CO_<DDMMYYYYHHMMSSmmm><national number>, as in the documented examples.
        while True:
            second = int(now)
            if second != self._stamp_second:  # formatting a date costs more than the rest of a push
                self._stamp_second = second
                self._stamp = f"ws_CO_{datetime.fromtimestamp(second, _NAIROBI):%d%m%Y%H%M%S}"
            candidate = f"{self._stamp}{int((now - second) * 1000):03d}{phone[3:]}"
            if candidate not in self._checkout_ids:
                self._checkout_ids.add(candidate)
                return candidate
            now += 0.001

    # ---- outcomes and callbacks ---------------------------------------------------------------------------
    def _schedule(self, due: float, action: int, transaction: Transaction) -> None:
        if not self._events or due < self._events[0][0]:
            self._wake.set()
        heapq.heappush(self._events, (due, next(self._event_ids), action, transaction))

    def settle_due(self) -> None:
        """Apply every outcome and send every callback whose time has come, each at its own due time."""
        events, now = self._events, self.clock.now()
        while events and events[0][0] <= now:
            due, _, action, transaction = heapq.heappop(events)
            if action == _OUTCOME:
                self._apply_outcome(transaction, due)
            else:
                self._send_callback(transaction)

    def _apply_outcome(self, transaction: Transaction, at: float) -> None:
        kind = OUTCOMES[transaction.plan.outcome]
        failed = kind.result_code != 0
        transaction.status = "FAILED" if failed else "SUCCESS"
        self.outcomes[kind.name] += 1
        self.queued -= 1
        phone = transaction.push.phone
        self._inflight[phone] -= 1
        if not self._inflight[phone]:
            del self._inflight[phone]
        for rule in self.rules[transaction.account].record_outcome(phone, failed, at):
            self.rule_triggers[rule] += 1
            self.rule_triggers_by_account[transaction.account][rule] += 1
            log.warning(
                "abuse rule %s triggered on %s by %s (outcome %s)",
                rule,
                transaction.account,
                mask_phone(phone),
                kind.name,
            )
        if not kind.sends_callback or not transaction.push.callback_url:
            return
        if transaction.plan.drop:
            self.callbacks_dropped += 1
            return
        if transaction.plan.late:
            self._schedule(at + self.late_delay_s, _CALLBACK, transaction)
        else:
            self._send_callback(transaction)

    def _send_callback(self, transaction: Transaction) -> None:
        url = transaction.push.callback_url
        assert url is not None
        copies = 2 if transaction.plan.duplicate else 1
        task = asyncio.get_running_loop().create_task(self._deliver(url, transaction.callback_body(), copies))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, body: bytes, copies: int) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.config.callback_timeout_s, follow_redirects=False)
        for _ in range(copies):
            try:
                response = await self._http.post(
                    url, content=body, headers={"Content-Type": "application/json"}
                )
            except Exception as error:  # a receiver that is down or malformed must never stop the sandbox
                self.callbacks_failed += 1
                # The URL's path carries the payment's signature: only the host is logged.
                log.warning("callback to %s not delivered: %s", _host(url), type(error).__name__)
                continue
            if response.is_success:
                self.callbacks_sent += 1
            else:
                self.callbacks_failed += 1
                log.warning("callback to %s answered HTTP %s", _host(url), response.status_code)

    # ---- the scheduler task -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(self._run_scheduler())

    async def stop(self) -> None:
        tasks = [*self._deliveries, *([self._scheduler] if self._scheduler else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduler = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def wake(self) -> None:
        self._wake.set()

    async def _run_scheduler(self) -> None:
        while True:
            try:
                self.settle_due()
            except Exception:
                log.exception("sandbox scheduler: an event failed and was dropped")
            timeout = None
            if self._events:
                timeout = max(self._events[0][0] - self.clock.now(), SCHEDULER_TICK_S)
            self._wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    # ---- reading ------------------------------------------------------------------------------------------
    def lookup(self, account: str, reference: str) -> Transaction | None:
        transaction = self.transactions.get(reference)
        return transaction if transaction is not None and transaction.account == account else None

    def page(self, account: str, page: int, per: int, external_reference: str | None) -> dict[str, Any]:
        """Newest first; `page` counts from 1."""
        if external_reference is None:
            rows = self._by_account[account]
        else:
            rows = self._by_external.get((account, external_reference), [])
        lag = self.scenario.list_lag_s
        if lag > 0:
            # Rows are in the order recorded: the newest ones not yet listed are a tail of the list.
            horizon = self.clock.now() - lag
            listed = len(rows)
            while listed and rows[listed - 1].created_at > horizon:
                listed -= 1
            rows = rows[:listed]
        end = max(len(rows) - (page - 1) * per, 0)
        chosen = rows[max(end - per, 0) : end]
        return {
            "data": [row.item() for row in reversed(chosen)],
            "page": page,
            "per": per,
            "total": len(rows),
        }

    def stats(self) -> dict[str, Any]:
        now = self.clock.now()
        blocked = {
            mask_phone(phone)
            for rules in self.rules.values()
            for phone, until in rules.phone_blocked_until.items()
            if until > now
        }
        restricted = {label: rules.restriction_end(now) for label, rules in self.rules.items()}
        return {
            "clock": iso(now),
            "pushes_total": self.pushes_total,
            "pushes_by_reference": dict(self.pushes_by_reference),
            "rule_triggers": dict(self.rule_triggers),
            "rule_triggers_total": sum(self.rule_triggers.values()),
            "rule_triggers_by_account": {
                label: dict(rules) for label, rules in self.rule_triggers_by_account.items()
            },
            "pushes_by_account": dict(self.pushes_by_account),
            "blocked_numbers": sorted(blocked),
            "account_restricted_until": {
                label: None if until is None else iso(until) for label, until in restricted.items()
            },
            "failures_in_window": {
                label: rules.failures_in_window(now) for label, rules in self.rules.items()
            },
            "outcomes": dict(self.outcomes),
            "outcomes_pending": self.queued,
            "callbacks_sent": self.callbacks_sent,
            "callbacks_failed": self.callbacks_failed,
            "callbacks_dropped": self.callbacks_dropped,
            "callbacks_pending": len(self._deliveries)
            + sum(1 for event in self._events if event[2] == _CALLBACK),
            "requests_refused": dict(self.refused),
            "faults": dict(self.faults),
            "inflight_max_per_phone": self.inflight_max_per_phone,
            "other_channel_failures": dict(self.other_channel_failures),
        }


def _code(rng: random.Random, length: int) -> str:
    """`length` characters of A-Z0-9 from one draw (random.choices costs a draw per character)."""
    number, characters = rng.randrange(36**length), []
    for _ in range(length):
        number, digit = divmod(number, 36)
        characters.append(_ALPHABET[digit])
    return "".join(characters)


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc or "?"
    except ValueError:
        return "?"
