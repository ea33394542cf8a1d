"""The abuse guard: one per UpesiPay account, its state in Redis, every decision one Lua script beside this file.

`guard.py` holds the Python side; `lib.lua` is prepended to each script (`admit.lua`, `resolve.lua`, ...).
docs/ARCHITECTURE.md and docs/guard.md describe the keys and the rules.
"""

from worker.guard.guard import (
    AccountSnapshot,
    Decision,
    Guard,
    GuardLimits,
    GuardUnavailable,
    Lane,
    Outcome,
    PhoneSnapshot,
    RefusalReason,
)

__all__ = [
    "AccountSnapshot",
    "Decision",
    "Guard",
    "GuardLimits",
    "GuardUnavailable",
    "Lane",
    "Outcome",
    "PhoneSnapshot",
    "RefusalReason",
]
