"""The abuse guard: one per UpesiPay account, shared by every worker through Redis (docs/ARCHITECTURE.md, "The guard").

It keeps four rules true: a number never reaches more than `phone_streak_limit` successive failures, at most
`phone_max_inflight` prompts are in flight per number, failures in the sliding window never exceed
`account_failure_limit`, and a restricted account sends nothing. Sends in flight count as possible failures.
Every admit names its lane: bulk sends stop `interactive_reserve` short of the budget and at their own in-flight
cap, so a customer at a checkout is never refused because a batch used the budget up.

Every decision is one Lua script (worker/guard/*.lua) run atomically by Redis in one round trip, so workers on any
number of machines see one consistent state; the clock is Redis TIME unless a clock is injected. docs/guard.md
has the key layout, the scripts and the exact semantics.

Over 400 lines because the limits' validation, the packed script arguments and the snapshots all belong to the
one contract with the Lua scripts; split, a reader would have to hold three files to check one rule.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from worker.phones import mask_phone

if TYPE_CHECKING:
    from worker.settings import Settings


log = logging.getLogger(__name__)

HOUR_S = 3600
DAY_S = 24 * HOUR_S
# UpesiPay's documented account restrictions: more than 50 / 500 / 1000 failures in the window restrict the
# account for 4 / 24 / 72 hours.
DEFAULT_RESTRICTION_TIERS: tuple[tuple[int, float], ...] = ((50, 4 * HOUR_S), (500, DAY_S), (1000, 3 * DAY_S))
# A number at its streak limit is held: its rest is this long, which no account lives to see end, so only a success
# on it or an operator's release (release_phone) frees it. UpesiPay documents no expiry for a streak (docs/guard.md).
HOLD_S = 100 * 365 * DAY_S
# How long a streak below the limit is remembered after the number's last failure. The provider documents no
# expiry for a streak, so this is long; it exists so that memory per account stays bounded.
DEFAULT_PHONE_MEMORY_S = 30 * DAY_S
# Dead number fields (a rest that ended, a forgotten streak) are collected only once the state hash holds more
# fields than this: below it, Redis keeps the hash as a compact listpack and the dead fields it may hold are few.
GC_MIN_FIELDS = 256
# Random fields examined (and deleted when dead) per failure: only failures leave fields that die by time alone, so
# dead fields settle at about 1/GC_SAMPLE of the hash (memory within ~1.5x of the live state). The scripts do it
# on every fourth failure, four failures' worth at once (lib.lua).
GC_SAMPLE = 3
# Account names become part of a Redis Cluster hash tag, so braces are not allowed (same rule as Settings).
_ACCOUNT = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_TOKEN_LEN = 200
_MAX_REASON_LEN = 120
# A restriction reason is stored and shown to operators; long digit runs could be phone numbers.
_DIGIT_RUN = re.compile(r"[0-9]{7,}")


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # failed or cancelled: the customer was prompted and did not pay
    RELEASED = "released"  # nothing was sent


class Lane(StrEnum):
    """Who is waiting for a send: a customer at a checkout may use the whole budget, a batch row only the bulk lane."""

    INTERACTIVE = "interactive"
    BULK = "bulk"


class RefusalReason(StrEnum):
    PHONE_BLOCKED = "phone_blocked"  # provider block, or resting at the streak limit: retry_after is exact
    PHONE_BUSY = "phone_busy"  # in-flight sends hold the number: retry_after is a poll hint
    ACCOUNT_BUDGET = "account_budget"  # window + in flight reach the limit
    ACCOUNT_RESTRICTED = "account_restricted"  # retry_after is exact
    GUARD_UNAVAILABLE = "guard_unavailable"  # Redis could not answer: fail closed
    BULK_LANE_FULL = (
        "bulk_lane_full"  # bulk only: the interactive reserve or the bulk in-flight cap is reached
    )
    GUARD_REBUILDING = "guard_rebuilding"  # the state is gone (no marker) until rebuilt from the ledger


_REASON_BY_CODE = {
    1: RefusalReason.PHONE_BLOCKED,
    2: RefusalReason.PHONE_BUSY,
    3: RefusalReason.ACCOUNT_BUDGET,
    4: RefusalReason.ACCOUNT_RESTRICTED,
    5: RefusalReason.BULK_LANE_FULL,
    6: RefusalReason.GUARD_REBUILDING,
}
# Retry hint while the state is being rebuilt: beat rebuilds within a dispatch interval or two.
REBUILD_POLL_S = 2.0


class GuardUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error; the caller retries later."""


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    reason: RefusalReason | None
    retry_after: float  # seconds; 0 when admitted


ADMITTED = Decision(admitted=True, reason=None, retry_after=0.0)


@dataclass(frozen=True, slots=True)
class PhoneSnapshot:
    phone: str  # masked
    streak: int
    in_flight: int
    blocked_until: float | None  # epoch seconds (guard clock), provider block or rest at the streak limit
    held: bool = (
        False  # at its streak limit and held until a success or a release (blocked_until is far away)
    )


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    account: str
    failures_in_window: int
    in_flight: int
    restricted_until: float | None  # epoch seconds (guard clock)
    restriction_reason: str | None
    headroom: int  # interactive admits the budget allows now: limit - failures - in flight, floor 0
    blocked_numbers: int  # numbers under a provider block (block_phone) that has not ended
    bulk_in_flight: int = 0  # of in_flight, the bulk lane's
    bulk_headroom: int = (
        0  # bulk admits allowed now: within limit - reserve and the bulk in-flight cap, floor 0
    )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _positive_int(name: str, value: object, most: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1")
    if most is not None and value > most:
        raise ValueError(f"{name} must be at most {most}")


def _duration(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds")
    if _ms(value) < 1:
        raise ValueError(f"{name} must be at least 0.001 seconds")


@dataclass(frozen=True, slots=True)
class GuardLimits:
    """The guard's rules; defaults are UpesiPay's documented limits. Durations are seconds (millisecond grain)."""

    phone_streak_limit: int = 10  # the provider blocks a number on the 11th successive failure
    # A number at its limit rests this long after its last failure; HOLD_S holds it until a success or a release
    # (GuardLimits.from_settings uses HOLD_S unless PHONE_AT_LIMIT=rest).
    phone_cooldown_s: float = DAY_S
    phone_max_inflight: int = 1  # one prompt at a time per number
    account_failure_limit: int = 50  # failures + in flight must stay below this in the window
    account_window_s: float = 6 * HOUR_S
    restriction_tiers: tuple[tuple[int, float], ...] = DEFAULT_RESTRICTION_TIERS
    busy_poll_s: float = 30.0  # retry hint when only in-flight sends hold a refusal
    phone_memory_s: float = DEFAULT_PHONE_MEMORY_S
    # Lanes: bulk admits stop while failures + in flight reach account_failure_limit - interactive_reserve, or
    # bulk sends in flight reach bulk_max_inflight (None: no cap of its own). The defaults here keep one lane
    # (the guard alone); the settings give the deployed defaults (10 and 20).
    interactive_reserve: int = 0
    bulk_max_inflight: int | None = None

    def __post_init__(self) -> None:
        # Both are stored in 16 bits per number (lib.lua).
        _positive_int("phone_streak_limit", self.phone_streak_limit, 65_535)
        _positive_int("phone_max_inflight", self.phone_max_inflight, 65_535)
        _positive_int("account_failure_limit", self.account_failure_limit)
        for name in ("phone_cooldown_s", "account_window_s", "busy_poll_s", "phone_memory_s"):
            _duration(name, getattr(self, name))
        reserve = self.interactive_reserve
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ValueError("interactive_reserve must be an integer >= 0")
        if reserve >= self.account_failure_limit:
            raise ValueError(
                "interactive_reserve must be below account_failure_limit (the bulk lane needs room)"
            )
        if self.bulk_max_inflight is not None:
            _positive_int("bulk_max_inflight", self.bulk_max_inflight)
        if self.phone_memory_s < self.phone_cooldown_s and not self.holds_at_limit:
            raise ValueError("phone_memory_s must be at least phone_cooldown_s")
        if not isinstance(self.restriction_tiers, tuple):
            raise ValueError("restriction_tiers must be a tuple of (threshold, seconds) pairs")
        previous = 0
        for tier in self.restriction_tiers:
            if not isinstance(tier, tuple) or len(tier) != 2:
                raise ValueError("restriction_tiers must be a tuple of (threshold, seconds) pairs")
            threshold, seconds = tier
            _positive_int("restriction_tiers threshold", threshold)
            _duration("restriction_tiers duration", seconds)
            if threshold <= previous:
                raise ValueError("restriction_tiers thresholds must be strictly increasing")
            previous = threshold

    @property
    def holds_at_limit(self) -> bool:
        """True when a number at its limit waits for a success or a release, not for time."""
        return self.phone_cooldown_s >= HOLD_S

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardLimits:
        rests = settings.phone_at_limit == "rest"
        return cls(
            phone_streak_limit=settings.phone_streak_limit,
            phone_cooldown_s=settings.phone_cooldown_s if rests else HOLD_S,
            phone_max_inflight=settings.phone_max_inflight,
            account_failure_limit=settings.account_failure_limit,
            account_window_s=settings.account_window_s,
            phone_memory_s=max(DEFAULT_PHONE_MEMORY_S, settings.phone_cooldown_s if rests else 0),
            interactive_reserve=settings.interactive_reserve,
            bulk_max_inflight=settings.bulk_max_inflight,
        )

    @property
    def bulk_budget(self) -> int:
        """Failures + in flight below which the bulk lane admits."""
        return self.account_failure_limit - self.interactive_reserve


@cache
def _script_text(name: str) -> str:
    folder = Path(__file__).parent
    return (folder / "lib.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_phone(phone: str) -> None:
    # The canonical form (worker.phones.normalise_phone: 2547XXXXXXXX) only: one number must map to one field,
    # the state hash tells numbers from other fields by their digits, and '|' separates a window entry's parts.
    if not isinstance(phone, str) or not (6 <= len(phone) <= 20 and phone.isascii() and phone.isdigit()):
        raise ValueError("phone must be in canonical form (digits only, as normalise_phone returns)")


def _check_token(token: str) -> None:
    if not isinstance(token, str) or not token or len(token) > _MAX_TOKEN_LEN:
        raise ValueError(f"token must be a non-empty string of at most {_MAX_TOKEN_LEN} characters")


class Guard:
    """The guard of one UpesiPay account. Cheap to build; safe to share between threads (redis-py pools)."""

    def __init__(
        self,
        redis: redis.Redis,
        account: str,
        limits: GuardLimits,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(account, str) or not _ACCOUNT.fullmatch(account):
            raise ValueError("account must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '-'")
        self.account = account
        self.limits = limits
        self._redis = redis
        self._clock = clock
        # The hash tag puts every key of the account in one Redis Cluster slot, so the scripts stay legal there.
        # Keys are kept encoded: they go out on every call. Every script gets the same two (lib.lua).
        prefix = f"stkpush:{{{account}}}:".encode()
        self._keys = (prefix + b"s", prefix + b"w")
        self._rules = self._time_and_rules = b""
        self._collect_above(GC_MIN_FIELDS)

        self._admit_script = redis.register_script(_script_text("admit"))
        self._resolve_script = redis.register_script(_script_text("resolve"))
        self._revert_script = redis.register_script(_script_text("revert"))
        self._restrict_script = redis.register_script(_script_text("restrict"))
        self._block_script = redis.register_script(_script_text("block"))
        self._release_script = redis.register_script(_script_text("release"))
        self._external_script = redis.register_script(_script_text("external"))
        self._snapshot_script = redis.register_script(_script_text("snapshot"))
        self._rebuild_script = redis.register_script(_script_text("rebuild"))
        self._dump_script = redis.register_script(_script_text("dump"))

    # -- the two hot paths -------------------------------------------------------------------------------------

    def admit(self, phone: str, token: str, lane: Lane = Lane.INTERACTIVE) -> Decision:
        """Decide whether a push to `phone` may be sent now in `lane` and, if so, reserve it under `token`.

        `token` names one send attempt (a fresh one per attempt): admitting it again while it is held returns
        admitted without counting twice. Never raises for Redis trouble: the guard fails closed.
        """
        _check_phone(phone)
        _check_token(token)
        try:
            answer = self._evalsha(self._admit_script, self._keys, self._admit_args(phone, token, Lane(lane)))
        except (redis.RedisError, OSError) as error:
            log.warning(
                "guard for account %s unavailable (%s): refusing to send", self.account, type(error).__name__
            )
            return Decision(False, RefusalReason.GUARD_UNAVAILABLE, self.limits.busy_poll_s)
        if answer == 0:
            return ADMITTED
        if answer == -1:
            raise ValueError("token already holds a reservation for another number")
        retry_plus_one, code = divmod(answer, 8)
        retry_after = self.limits.busy_poll_s if retry_plus_one == 0 else (retry_plus_one - 1) / 1000
        if code == 6:
            retry_after = min(REBUILD_POLL_S, self.limits.busy_poll_s)
        return Decision(False, _REASON_BY_CODE[code], retry_after)

    def resolve(self, token: str, outcome: Outcome) -> bool:
        """Settle the reservation held under `token`. False (and no change) for an unknown or settled token."""
        _check_token(token)
        args = (self._head(), token, Outcome(outcome).value)
        return bool(self._call(self._resolve_script, self._keys, args) == 1)

    # -- provider answers and late callbacks -------------------------------------------------------------------

    def restrict_account(self, seconds: float, reason: str) -> None:
        """The provider restricted the account (429 or an abuse answer): admit nothing for `seconds`."""
        _duration("seconds", seconds)
        text = _DIGIT_RUN.sub("****", str(reason))[:_MAX_REASON_LEN] or "restricted by the provider"
        args = (self._head(), _ms(seconds), text)
        self._call(self._restrict_script, self._keys, args)

    def block_phone(self, phone: str, seconds: float) -> None:
        """The provider blocked this number for this account: admit nothing to it for `seconds`."""
        _check_phone(phone)
        _duration("seconds", seconds)
        self._call(self._block_script, self._keys, (self._head(), phone, _ms(seconds)))

    def count_external_failure(self, reference: str, failed_at: float) -> bool:
        """A push the account made through another channel failed at `failed_at` (epoch seconds): count it in the
        window once per provider `reference`. False when it was counted before or has slid out of the window."""
        _check_token(reference)
        if not math.isfinite(failed_at):
            raise ValueError("failed_at must be a finite time")
        return bool(self._call(self._external_script, self._keys, (self._head(), reference, _ms(failed_at))))

    def release_phone(self, phone: str) -> bool:
        """An operator releases a number held at its streak limit: its streak starts afresh at 0.

        Sends in flight and provider blocks are untouched (UpesiPay's own block still runs). Returns False when the
        number had no streak. The caller records the release in the ledger (who, when), so a rebuild keeps it."""
        _check_phone(phone)
        return bool(self._call(self._release_script, self._keys, (self._head(), phone)))

    def revert_failure(self, token: str) -> bool:
        """A late success for `token` takes back the latest failure recorded under it (docs/guard.md).

        While that failure is still in the window its entry is removed; if it also still belongs to the number's
        current streak, the streak goes down by one. Returns False (and changes nothing) otherwise.
        """
        _check_token(token)
        return bool(self._call(self._revert_script, self._keys, (self._head(), token)))

    # -- views -------------------------------------------------------------------------------------------------

    def phone_snapshot(self, phone: str) -> PhoneSnapshot:
        _check_phone(phone)
        answer = self._call(self._snapshot_script, self._keys, (self._head(), phone))
        streak, in_flight, blocked_ms = answer
        return PhoneSnapshot(
            phone=mask_phone(phone),
            streak=int(streak),
            in_flight=int(in_flight),
            blocked_until=blocked_ms / 1000 if blocked_ms else None,
            held=self.limits.holds_at_limit and int(streak) >= self.limits.phone_streak_limit,
        )

    def account_snapshot(self) -> AccountSnapshot:
        answer = self._call(self._snapshot_script, self._keys, (self._head(), ""))
        failures, in_flight, restricted_ms, reason, blocked, bulk_in_flight = answer
        lim = self.limits
        bulk_headroom = lim.bulk_budget - int(failures) - int(in_flight)
        if lim.bulk_max_inflight is not None:
            bulk_headroom = min(bulk_headroom, lim.bulk_max_inflight - int(bulk_in_flight))
        return AccountSnapshot(
            account=self.account,
            failures_in_window=int(failures),
            in_flight=int(in_flight),
            restricted_until=restricted_ms / 1000 if restricted_ms else None,
            restriction_reason=_text(reason) if restricted_ms else None,
            headroom=max(self.limits.account_failure_limit - int(failures) - int(in_flight), 0),
            blocked_numbers=int(blocked),
            bulk_in_flight=int(bulk_in_flight),
            bulk_headroom=max(bulk_headroom, 0),
        )

    # -- plumbing (the argument builders are also used by bench/guard.py to pipeline) --------------------------
    # The hot paths pass keys and arguments pre-encoded and as few as possible: redis-py packs each one per call.

    def _head(self) -> bytes:
        """ARGV[1] of every script: the clock (negative: Redis TIME), then the packed limits (lib.lua)."""
        if self._clock is None:
            return self._time_and_rules
        return struct.pack(">d", _ms(self._clock())) + self._rules

    def _collect_above(self, fields: int) -> None:
        """Collect dead number fields once the state hash holds more than `fields` (tests use 0)."""
        lim = self.limits
        # The state hash lives at least this long after the account's last admit or failure (docs/guard.md).
        # A held number does not stretch it: should the hash expire, the rebuild restores held numbers from the
        # ledger, where their failures are recorded.
        rest_s = 0.0 if lim.holds_at_limit else lim.phone_cooldown_s
        idle_s = max(lim.phone_memory_s, lim.account_window_s, rest_s)
        rules = (
            lim.phone_streak_limit,
            _ms(lim.phone_cooldown_s),
            _ms(lim.phone_memory_s),
            lim.phone_max_inflight,
            lim.account_failure_limit,
            _ms(lim.account_window_s),
            _ms(idle_s),
            fields,
            GC_SAMPLE * 4,  # every fourth failure samples four failures' worth (lib.lua)
        )
        tiers = "".join(f";{threshold}:{_ms(seconds)}" for threshold, seconds in lim.restriction_tiers)
        # Packed once, read with struct.unpack by every script (lib.lua): one argument instead of eleven.
        self._rules = struct.pack(">9d", *rules) + tiers.encode()
        self._time_and_rules = struct.pack(">d", -1) + self._rules
        # The bulk lane's own limits ride in admit's ARGV[4] (admit.lua); 2**53: no cap, exactly representable.
        bulk_cap = lim.bulk_max_inflight if lim.bulk_max_inflight is not None else 2**53
        self._lanes = {Lane.INTERACTIVE: b"", Lane.BULK: struct.pack(">dd", lim.bulk_budget, bulk_cap)}

    def _admit_args(self, phone: str, token: str, lane: Lane = Lane.INTERACTIVE) -> tuple[str | bytes, ...]:
        return (self._head(), phone, token, self._lanes[lane])

    def _resolve_args(self, token: str, outcome: Outcome) -> tuple[str | bytes, ...]:
        return (self._head(), token, outcome.value)

    def _evalsha(self, script: Script, keys: Sequence[bytes], args: Sequence[str | bytes | int]) -> Any:
        # What redis-py's Script.__call__ does, with less per-call work: this is the hot path.
        try:
            return self._redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            # A restarted or different server: load the script, as Script.__call__ would.
            script.sha = self._redis.script_load(script.script)
            return self._redis.evalsha(script.sha, len(keys), *keys, *args)

    def _call(self, script: Script, keys: Sequence[bytes], args: Sequence[str | bytes | int]) -> Any:
        try:
            return self._evalsha(script, keys, args)
        except (redis.RedisError, OSError) as error:
            log.warning("guard for account %s unavailable (%s)", self.account, type(error).__name__)
            raise GuardUnavailable(f"guard for account {self.account} unavailable") from error
