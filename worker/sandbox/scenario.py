"""Sandbox scenarios: which outcome each STK push gets, and which faults the sandbox's API shows.

A scenario is JSON (docs/sandbox.md and `stkpush sandbox --help` describe it). It is checked whole when it is
loaded: an unknown key, an unknown outcome or a rate out of range raises ScenarioError then, never halfway
through a run.
"""

from __future__ import annotations

import functools
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from worker.phones import PhoneNumberError, mask_phone, normalise_phone


class ScenarioError(ValueError):
    """The scenario JSON is not valid; the message names the offending key."""


@dataclass(frozen=True)
class OutcomeKind:
    """How the customer (or M-Pesa) answered a prompt, as UpesiPay's callback reports it."""

    name: str
    result_code: int
    result_desc: str
    callback_status: str  # the callback's `response.Status`
    sends_callback: bool = True


# ResultCodes and descriptions are M-Pesa's (reference/upesipay-api.md, "Payment callback").
OUTCOMES: Mapping[str, OutcomeKind] = {
    kind.name: kind
    for kind in (
        OutcomeKind("success", 0, "The service request is processed successfully.", "Success"),
        OutcomeKind("cancelled", 1032, "Request cancelled by user", "Cancelled"),
        OutcomeKind("timeout", 1037, "DS timeout user cannot be reached", "Failed"),
        OutcomeKind("insufficient", 1, "The balance is insufficient for the transaction.", "Failed"),
        OutcomeKind("wrong_pin", 2001, "The initiator information is invalid.", "Failed"),
        OutcomeKind(
            "in_progress",
            1001,
            "Unable to lock subscriber, a transaction is already in process for the current subscriber",
            "Failed",
        ),
        # The prompt timed out at the provider (transaction-status says FAILED) but no callback ever comes.
        OutcomeKind("no_callback", 1037, "DS timeout user cannot be reached", "Failed", sends_callback=False),
    )
}
# Not an outcome of a prompt: UpesiPay refuses the push itself with 400 and nobody is prompted.
REJECT = "reject"
OUTCOME_NAMES = (*OUTCOMES, REJECT)

FAULT_ENDPOINTS = frozenset({"payments", "transaction-status", "transactions"})


class FaultKind(StrEnum):
    NONE = "none"
    RATE_LIMIT = "rate_limit"
    ERROR_5XX = "error_5xx"
    HANG = "hang"
    RESET = "reset"


# The exclusive shares a request's one fault draw is split into, in this order.
_RATES = {
    "rate_limit_rate": FaultKind.RATE_LIMIT,
    "error_5xx_rate": FaultKind.ERROR_5XX,
    "hang_rate": FaultKind.HANG,
    "reset_rate": FaultKind.RESET,
}


@dataclass(frozen=True)
class OutcomePlan:
    """What will happen to one push: decided when it is recorded, so a seed replays it exactly."""

    outcome: str
    duplicate: bool = False
    late: bool = False
    drop: bool = False  # the outcome happens at the provider, but its callback is lost


@dataclass(frozen=True)
class OutcomeRule:
    """One scenario entry: a fixed outcome, weighted outcomes, or a sequence of entries (one per push)."""

    weights: tuple[tuple[str, float], ...] = (("success", 1.0),)
    duplicate: float = 0.0  # probability that the callback is sent twice
    late: float = 0.0  # probability that the callback is sent late_delay_s after the outcome
    drop: float = 0.0  # probability that the callback is never sent (the outcome still happens)
    sequence: tuple[OutcomeRule, ...] = ()

    def plan(self, rng: random.Random) -> OutcomePlan:
        """Draw from `rng` only what is uncertain, so fixed entries cost nothing."""
        if len(self.weights) == 1:
            outcome = self.weights[0][0]
        else:
            names = [name for name, _ in self.weights]
            outcome = rng.choices(names, weights=[weight for _, weight in self.weights])[0]
        return OutcomePlan(
            outcome, _chance(self.duplicate, rng), _chance(self.late, rng), _chance(self.drop, rng)
        )


def _chance(probability: float, rng: random.Random) -> bool:
    if probability <= 0.0:
        return False
    return probability >= 1.0 or rng.random() < probability


@dataclass(frozen=True)
class Faults:
    """Faults the sandbox's API shows on the endpoints listed in `endpoints`; the rates are exclusive shares."""

    latency_s: float = 0.0  # added before every answer
    latency_jitter_s: float = 0.0  # plus a uniform 0..jitter, seeded
    error_5xx_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 30.0
    reset_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after_s: int = 5
    endpoints: frozenset[str] = frozenset({"payments"})

    def __post_init__(self) -> None:
        for name in ("latency_s", "latency_jitter_s", "hang_s"):
            _non_negative(f"faults.{name}", getattr(self, name))
        rates = {name: getattr(self, name) for name in _RATES}
        for name, rate in rates.items():
            _probability(f"faults.{name}", rate)
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ScenarioError(f"faults: {' + '.join(_RATES)} must be <= 1")
        if (
            isinstance(self.retry_after_s, bool)
            or not isinstance(self.retry_after_s, int)
            or self.retry_after_s < 0
        ):
            raise ScenarioError("faults.retry_after_s must be a non-negative integer")
        unknown = set(self.endpoints) - FAULT_ENDPOINTS
        if unknown:
            raise ScenarioError(
                f"faults.endpoints: unknown {sorted(unknown)}; known {sorted(FAULT_ENDPOINTS)}"
            )

    @functools.cached_property
    def _shares(self) -> tuple[tuple[FaultKind, float], ...]:
        return tuple((kind, getattr(self, name)) for name, kind in _RATES.items() if getattr(self, name) > 0)

    def roll(self, rng: random.Random) -> FaultKind:
        """One draw per request decides its fault (or none)."""
        if not self._shares:
            return FaultKind.NONE
        draw = rng.random()
        for kind, rate in self._shares:
            if draw < rate:
                return kind
            draw -= rate
        return FaultKind.NONE

    def latency(self, rng: random.Random) -> float:
        if self.latency_jitter_s > 0.0:
            return self.latency_s + rng.uniform(0.0, self.latency_jitter_s)
        return self.latency_s


@dataclass(frozen=True)
class Scenario:
    """Outcomes per phone (canonical 2547... keys) or by the default entry, faults, and optional run settings."""

    default: OutcomeRule = OutcomeRule()
    phones: Mapping[str, OutcomeRule] = field(default_factory=dict)
    faults: Faults = field(default_factory=Faults)
    seed: int | None = None  # overrides SandboxConfig.seed
    callback_delay_s: float | None = None  # overrides SandboxConfig.callback_delay_s
    late_delay_s: float | None = None  # overrides SandboxConfig.late_delay_s
    # How a block or restriction is answered (UpesiPay documents no body or header for it): with Retry-After and
    # "until <time>" in the message, one of the two, or neither.
    abuse_answer: str = "retry_after_and_until"
    # A push appears in the transactions list only this long after it was recorded (0: at once).
    list_lag_s: float = 0.0
    # The account's channel ids: a push naming another is answered 400 (None: every channel is the account's).
    channels: frozenset[int] | None = None
    source: Mapping[str, Any] = field(default_factory=dict)  # the JSON as given, for GET /sandbox/scenario

    def rule_for(self, phone: str) -> OutcomeRule:
        return self.phones.get(phone, self.default)

    @classmethod
    def from_json(cls, data: Any) -> Scenario:
        if not isinstance(data, dict):
            raise ScenarioError("a scenario must be a JSON object")
        _only_keys("scenario", data, _SCENARIO_KEYS)
        seed = data.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ScenarioError("seed must be an integer")
        phones: dict[str, OutcomeRule] = {}
        raw_phones = data.get("phones", {})
        if not isinstance(raw_phones, dict):
            raise ScenarioError("phones must be an object mapping phone numbers to outcome entries")
        for raw, entry in raw_phones.items():
            try:
                phone = normalise_phone(raw)
            except PhoneNumberError:
                # The message never repeats the key: it is a customer's phone number.
                raise ScenarioError("phones: a key is not a Kenyan mobile number") from None
            if phone in phones:
                raise ScenarioError("phones: two keys name the same number")
            phones[phone] = _rule(entry, f"phones[{mask_phone(phone)}]", allow_sequence=True)
        return cls(
            default=_rule(data.get("default", "success"), "default", allow_sequence=False),
            phones=phones,
            faults=_faults(data.get("faults", {})),
            seed=seed,
            callback_delay_s=_optional_seconds(data, "callback_delay_s"),
            late_delay_s=_optional_seconds(data, "late_delay_s"),
            abuse_answer=_abuse_answer(data.get("abuse_answer", "retry_after_and_until")),
            list_lag_s=_optional_seconds(data, "list_lag_s") or 0.0,
            channels=_channels(data.get("channels")),
            source=data,
        )


def _channels(value: Any) -> frozenset[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ScenarioError("channels must be a non-empty list of channel ids")
    for channel in value:
        if isinstance(channel, bool) or not isinstance(channel, int) or channel < 1:
            raise ScenarioError("channels: every channel id must be a positive integer")
    return frozenset(value)


def load_scenario(text: str) -> Scenario:
    """A scenario from inline JSON (text starting with `{`) or from the JSON file at the path `text`."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        try:
            stripped = Path(stripped).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ScenarioError(f"cannot read scenario file: {type(error).__name__}") from None
    try:
        data = json.loads(stripped)
    except (ValueError, RecursionError) as error:
        raise ScenarioError(f"scenario is not valid JSON: {error}") from None
    return Scenario.from_json(data)


_SCENARIO_KEYS = {
    "description",
    "seed",
    "callback_delay_s",
    "late_delay_s",
    "default",
    "phones",
    "faults",
    "abuse_answer",
    "list_lag_s",
    "channels",
}
ABUSE_ANSWERS = ("retry_after_and_until", "retry_after", "until", "bare")
_RULE_KEYS = {"outcome", "outcomes", "sequence", "duplicate", "late", "drop"}


def _only_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")


def _rule(entry: Any, where: str, *, allow_sequence: bool) -> OutcomeRule:
    if isinstance(entry, str):
        return OutcomeRule(weights=((_outcome_name(entry, where), 1.0),))
    if not isinstance(entry, dict):
        raise ScenarioError(f"{where}: an entry is an outcome name or an object")
    _only_keys(where, entry, _RULE_KEYS)
    chosen = [key for key in ("outcome", "outcomes", "sequence") if key in entry]
    if len(chosen) != 1:
        raise ScenarioError(f"{where}: give exactly one of outcome, outcomes, sequence")
    if chosen[0] == "sequence":
        if not allow_sequence:
            raise ScenarioError(
                f"{where}: sequence is allowed only for a phone number, not nested or as default"
            )
        items = entry["sequence"]
        if not isinstance(items, list) or not items:
            raise ScenarioError(f"{where}.sequence must be a non-empty list of entries")
        if {"duplicate", "late", "drop"} & set(entry):
            raise ScenarioError(f"{where}: put duplicate/late/drop on the sequence's entries")
        steps = tuple(
            _rule(item, f"{where}.sequence[{i}]", allow_sequence=False) for i, item in enumerate(items)
        )
        return OutcomeRule(sequence=steps)
    if chosen[0] == "outcome":
        weights: tuple[tuple[str, float], ...] = ((_outcome_name(entry["outcome"], where), 1.0),)
    else:
        raw = entry["outcomes"]
        if not isinstance(raw, dict) or not raw:
            raise ScenarioError(f"{where}.outcomes must be a non-empty object of outcome: weight")
        weights = tuple(
            (_outcome_name(name, where), _weight(value, f"{where}.outcomes.{name}"))
            for name, value in raw.items()
        )
        if sum(weight for _, weight in weights) <= 0.0:
            raise ScenarioError(f"{where}.outcomes: the weights must not all be zero")
        weights = tuple((name, weight) for name, weight in weights if weight > 0.0)
    return OutcomeRule(
        weights=weights,
        duplicate=_flag_or_probability(entry.get("duplicate", False), f"{where}.duplicate"),
        late=_flag_or_probability(entry.get("late", False), f"{where}.late"),
        drop=_flag_or_probability(entry.get("drop", False), f"{where}.drop"),
    )


def _outcome_name(name: Any, where: str) -> str:
    if name not in OUTCOME_NAMES:
        raise ScenarioError(f"{where}: unknown outcome {name!r}; known {list(OUTCOME_NAMES)}")
    return str(name)


def _weight(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ScenarioError(f"{where} must be a non-negative number")
    return float(value)


def _flag_or_probability(value: Any, where: str) -> float:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    _probability(where, value)
    return float(value)


def _probability(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ScenarioError(f"{where} must be a number from 0 to 1")


def _non_negative(where: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ScenarioError(f"{where} must be a non-negative number of seconds")


def _abuse_answer(value: Any) -> str:
    if value not in ABUSE_ANSWERS:
        raise ScenarioError("abuse_answer must be one of " + ", ".join(ABUSE_ANSWERS))
    return str(value)


def _optional_seconds(data: Mapping[str, Any], key: str) -> float | None:
    if data.get(key) is None:
        return None
    _non_negative(key, data[key])
    return float(data[key])


def _faults(data: Any) -> Faults:
    if not isinstance(data, dict):
        raise ScenarioError("faults must be an object")
    known = {name for name in Faults.__dataclass_fields__}
    _only_keys("faults", data, known)
    values = dict(data)
    if "endpoints" in values:
        endpoints = values["endpoints"]
        if not isinstance(endpoints, list) or not all(isinstance(item, str) for item in endpoints):
            raise ScenarioError("faults.endpoints must be a list of endpoint names")
        values["endpoints"] = frozenset(endpoints)
    return Faults(**values)
