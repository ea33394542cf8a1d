"""UpesiPay's abuse protection as the sandbox enforces it, per account, on the sandbox's own clock.

The provider's words (reference/000_758c95509b731bf0.txt): more than 10 successive failed or cancelled requests
to one number block that number for 24 h; over 50 failed requests in a sliding 6 h window restrict the account
for 4 h, 500 for 24 h, 1000 for 72 h; failed and cancelled both count. Where the page is silent the sandbox
chooses, and docs/sandbox.md says what it chose:

- an outcome counts when it happens (callback time), whether or not a callback is sent; every non-zero
  ResultCode is a failure; requests the sandbox refuses (400, 401, 429) are not outcomes and never count;
- the 11th successive failure blocks the number until that outcome + 24 h and the streak starts afresh;
- a tier triggers on the failure that puts the window above its limit while the account is not already
  restricted by that tier; the restriction runs from that failure.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

HOUR = 3600.0


class SandboxClock:
    """Epoch seconds as the sandbox sees them: real (monotonic) time plus an offset that only moves forward.

    Tests cross a 6 h window or a 24 h block by advancing it, through POST /sandbox/clock/advance or by calling
    advance() on the clock they gave SandboxConfig.
    """

    def __init__(self, *, offset_s: float = 0.0) -> None:
        self._wall_at_start = time.time()
        self._monotonic_at_start = time.monotonic()
        self._offset_s = 0.0
        self.advance(offset_s)

    @property
    def offset_s(self) -> float:
        return self._offset_s

    def now(self) -> float:
        return self._wall_at_start + (time.monotonic() - self._monotonic_at_start) + self._offset_s

    def advance(self, seconds: float) -> None:
        # Never backwards: blocks, windows and scheduled callbacks all assume time only grows.
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise ValueError("seconds must be a number")
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("seconds must be a finite number >= 0")
        self._offset_s += float(seconds)


@dataclass(frozen=True)
class AccountTier:
    """`name` is the key under which /sandbox/stats counts its triggers."""

    name: str
    failures: int  # the window must hold more than this many failures
    restrict_s: float


DEFAULT_TIERS = (
    AccountTier("account_4h", 50, 4 * HOUR),
    AccountTier("account_24h", 500, 24 * HOUR),
    AccountTier("account_72h", 1000, 72 * HOUR),
)
PHONE_BLOCK = "phone_block"


@dataclass(frozen=True)
class AbuseLimits:
    """The documented limits by default; tests may shrink them, and test the defaults too."""

    phone_streak_limit: int = 10
    phone_block_s: float = 24 * HOUR
    window_s: float = 6 * HOUR
    tiers: tuple[AccountTier, ...] = DEFAULT_TIERS

    def __post_init__(self) -> None:
        if isinstance(self.phone_streak_limit, bool) or self.phone_streak_limit < 1:
            raise ValueError("phone_streak_limit must be an integer >= 1")
        for name in ("phone_block_s", "window_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds")
        names = [tier.name for tier in self.tiers]
        if len(set(names)) != len(names) or PHONE_BLOCK in names:
            raise ValueError("tier names must be unique and not 'phone_block'")
        for tier in self.tiers:
            if tier.failures < 1 or not math.isfinite(tier.restrict_s) or tier.restrict_s <= 0:
                raise ValueError(f"tier {tier.name}: failures >= 1 and a positive restrict_s are required")

    @property
    def rule_names(self) -> tuple[str, ...]:
        return (PHONE_BLOCK, *(tier.name for tier in self.tiers))


@dataclass
class AccountRules:
    """One account's abuse state: streaks and blocks per number, the failure window, restrictions per tier."""

    limits: AbuseLimits
    streaks: dict[str, int] = field(default_factory=dict)
    phone_blocked_until: dict[str, float] = field(default_factory=dict)
    failures: deque[float] = field(default_factory=deque)
    tier_until: dict[str, float] = field(default_factory=dict)

    def phone_block_end(self, phone: str, now: float) -> float | None:
        until = self.phone_blocked_until.get(phone)
        if until is None:
            return None
        if until <= now:
            del self.phone_blocked_until[phone]
            return None
        return until

    def restriction_end(self, now: float) -> float | None:
        ends = [until for until in self.tier_until.values() if until > now]
        return max(ends) if ends else None

    def failures_in_window(self, now: float) -> int:
        self._slide(now)
        return len(self.failures)

    def record_outcome(self, phone: str, failed: bool, at: float) -> list[str]:
        """Apply one outcome that happened at `at`; returns the rules it triggered."""
        if not failed:
            self.streaks.pop(phone, None)
            return []
        triggered: list[str] = []
        streak = self.streaks.get(phone, 0) + 1
        if streak > self.limits.phone_streak_limit:
            self.phone_blocked_until[phone] = at + self.limits.phone_block_s
            triggered.append(PHONE_BLOCK)
            self.streaks.pop(phone, None)  # the number starts afresh once the block ends
        else:
            self.streaks[phone] = streak
        self.failures.append(at)
        self._slide(at)
        for tier in self.limits.tiers:
            if len(self.failures) > tier.failures and self.tier_until.get(tier.name, -math.inf) <= at:
                self.tier_until[tier.name] = at + tier.restrict_s
                triggered.append(tier.name)
        return triggered

    def _slide(self, now: float) -> None:
        horizon = now - self.limits.window_s
        while self.failures and self.failures[0] <= horizon:
            self.failures.popleft()
