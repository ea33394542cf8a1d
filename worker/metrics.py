"""Prometheus metrics, served by the web app at `/metrics`.

stkpush runs as many processes (web, Celery prefork children, beat) on many machines, so no process's memory
holds the whole truth. Two kinds of numbers, two honest sources:

- State, read at scrape time: payments by state and the deferred backlog from the ledger (the source of truth),
  the failure budget, headroom, restriction and blocked numbers from the guard. Nothing to keep in sync.
- Events, counted in Redis: pushes by outcome, provider latency, guard decisions and refusals, callbacks by
  M-Pesa result code, settlements. Each increment is one pipelined round trip (HINCRBY into a hash per metric,
  under the account's guard hash tag, with a TTL refreshed on write); any process's `/metrics` reads the same
  totals, so scrape one web instance. Counters survive process restarts; losing Redis resets them, which
  Prometheus' rate() treats as a counter reset. While Redis is away increments are dropped (nothing is sent then
  anyway: the guard fails closed). A metric never fails a send or a callback.

Flower keeps its own task metrics at its own `/metrics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from worker import runtime
from worker.guard import Decision
from worker.upesipay import PushOutcome, PushResult

__all__ = [
    "SharedMetrics",
    "record_callback",
    "record_guard_decision",
    "record_push",
    "record_settlement",
    "record_webhook_endpoint_disabled",
]

log = logging.getLogger("stkpush.metrics")

# A counter hash untouched this long expires (every Redis key of the project has a TTL); Prometheus sees a reset.
COUNTER_TTL_S = 35 * 24 * 3600
# Provider latency buckets: UpesiPay answers a push in well under a second when healthy; the read timeout is 30 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Label values are joined with this in a hash field; none of our label values can contain it.
_SEP = "|"


@dataclass(frozen=True)
class CounterSpec:
    name: str  # exposed with a `_total` suffix
    documentation: str
    labels: tuple[str, ...]


PUSHES = CounterSpec(
    "stkpush_pushes", "STK push requests made to UpesiPay, by what the answer proved.", ("outcome",)
)
GUARD_DECISIONS = CounterSpec("stkpush_guard_decisions", "Guard admit decisions.", ("decision",))
GUARD_REFUSALS = CounterSpec("stkpush_guard_refusals", "Guard refusals, by reason.", ("reason",))
CALLBACKS = CounterSpec(
    "stkpush_callbacks",
    "Valid UpesiPay callbacks, by M-Pesa ResultCode and whether they changed the ledger.",
    ("result_code", "effect"),
)
SETTLEMENTS = CounterSpec(
    "stkpush_settlements", "Payments settled by asking UpesiPay (transaction-status), by result.", ("result",)
)
WEBHOOK_ENDPOINTS_DISABLED = CounterSpec(
    "stkpush_webhook_endpoint_disablings",
    "Times a webhook endpoint was disabled automatically after failing for WEBHOOK_DISABLE_AFTER_S.",
    ("reason",),
)
COUNTERS = (
    PUSHES,
    GUARD_DECISIONS,
    GUARD_REFUSALS,
    CALLBACKS,
    SETTLEMENTS,
    WEBHOOK_ENDPOINTS_DISABLED,
)
LATENCY_NAME = "stkpush_provider_latency_seconds"
LATENCY_DOC = "Time UpesiPay took to answer a push request (connection failures excluded)."


class SharedMetrics:
    """Event counters of one UpesiPay account, kept in Redis so that every process adds to the same totals."""

    def __init__(self, client: redis.Redis, account: str) -> None:
        self._redis = client
        self._prefix = f"stkpush:{{{account}}}:m:"

    def key(self, name: str) -> str:
        return self._prefix + name

    def _add(self, pipe: redis.client.Pipeline, spec: CounterSpec, values: tuple[str, ...]) -> None:
        if len(values) != len(spec.labels):
            raise ValueError(f"{spec.name} takes labels {spec.labels}")
        field = _SEP.join(value.replace(_SEP, "/") for value in values)
        pipe.hincrby(self.key(spec.name), field, 1)
        pipe.expire(self.key(spec.name), COUNTER_TTL_S)

    def inc(self, spec: CounterSpec, *values: str) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self._add(pipe, spec, values)
        pipe.execute()

    def push(self, outcome: str, latency_s: float | None) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self._add(pipe, PUSHES, (outcome,))
        if latency_s is not None and math.isfinite(latency_s) and latency_s >= 0:
            key = self.key(LATENCY_NAME)
            bucket = next((str(b) for b in LATENCY_BUCKETS if latency_s <= b), "+Inf")
            # One bucket per observation; the scrape adds them up into Prometheus' cumulative buckets.
            pipe.hincrby(key, bucket, 1)
            pipe.hincrbyfloat(key, "sum", latency_s)
            pipe.expire(key, COUNTER_TTL_S)
        pipe.execute()

    def decision(self, decision: Decision) -> None:
        pipe = self._redis.pipeline(transaction=False)
        self._add(pipe, GUARD_DECISIONS, ("admitted" if decision.admitted else "refused",))
        if not decision.admitted:
            self._add(pipe, GUARD_REFUSALS, (decision.reason.value if decision.reason else "unknown",))
        pipe.execute()

    def collect(self) -> Iterator[Metric]:
        pipe = self._redis.pipeline(transaction=False)
        for spec in COUNTERS:
            pipe.hgetall(self.key(spec.name))
        pipe.hgetall(self.key(LATENCY_NAME))
        *counters, latency = pipe.execute()
        for spec, stored in zip(COUNTERS, counters, strict=True):
            family = CounterMetricFamily(spec.name, spec.documentation, labels=list(spec.labels))
            for field, value in sorted(stored.items()):
                family.add_metric(_text(field).split(_SEP), float(value))
            yield family
        yield _latency_family({_text(k): _text(v) for k, v in latency.items()})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _latency_family(stored: dict[str, str]) -> HistogramMetricFamily:
    cumulative, buckets = 0.0, []
    for bound in (*(str(b) for b in LATENCY_BUCKETS), "+Inf"):
        cumulative += float(stored.get(bound, 0))
        buckets.append((bound, cumulative))
    family = HistogramMetricFamily(LATENCY_NAME, LATENCY_DOC)
    family.add_metric([], buckets, sum_value=float(stored.get("sum", 0)))
    return family


def shared() -> SharedMetrics:
    return SharedMetrics(runtime.redis_client(), runtime.settings().upesipay_account)


# ---- one-line hooks for the code that makes the events ----------------------------------------------------------


def record_push(result: PushResult) -> None:
    # A connection failure times our own connect, not UpesiPay: it would drag the latency buckets down.
    latency = None if result.outcome == PushOutcome.NOT_SENT else result.latency_s
    _safely(lambda: shared().push(result.outcome.value, latency))


def record_guard_decision(decision: Decision) -> None:
    _safely(lambda: shared().decision(decision))


def record_callback(result_code: int, applied: bool) -> None:
    _safely(lambda: shared().inc(CALLBACKS, str(result_code), "applied" if applied else "duplicate"))


def record_settlement(result: str) -> None:
    _safely(lambda: shared().inc(SETTLEMENTS, result))


def record_webhook_endpoint_disabled() -> None:
    _safely(lambda: shared().inc(WEBHOOK_ENDPOINTS_DISABLED, "failing"))


def _safely(increment: Callable[[], None]) -> None:
    try:
        increment()
    except Exception as error:  # a lost increment must never fail a send or a callback
        log.debug("metric not recorded (%s)", type(error).__name__)
