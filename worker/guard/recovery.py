"""The guard's state as a whole: written from an image the ledger implies (rebuild), read back for comparison (dump).

The rebuild marker (field `e` of the state hash) says "this state descends from a rebuild and was kept since";
admit refuses while it is missing (lib.lua). Both directions use the state's own encoding, so a rebuilt state is
indistinguishable from one built up by admits and resolves. docs/guard.md, "Rebuild and verify".
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import redis

from worker.guard.guard import Guard, GuardUnavailable, _text

__all__ = [
    "GuardImage",
    "LiveState",
    "PhoneImage",
    "dump",
    "forget",
    "has_state",
    "now_ms",
    "rebuild",
    "start_empty",
]


@dataclass(frozen=True, slots=True)
class PhoneImage:
    streak: int
    in_flight: int
    last_failure_ms: int  # 0 without a streak
    run_seq: int  # sequence number of the streak's first failure (revert uses it)


@dataclass(frozen=True, slots=True)
class Reservation:
    token: str
    phone: str
    lane: str  # the payment's queue: "bulk" reservations also count in the bulk lane's in-flight ('nb')


@dataclass(frozen=True, slots=True)
class Failure:
    at_ms: int
    seq: int
    phone: str
    token: str


@dataclass
class GuardImage:
    """What the ledger says the guard's state should be. Times are guard-clock milliseconds."""

    reservations: list[Reservation] = field(default_factory=list)
    phones: dict[str, PhoneImage] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)  # the window's entries (older ones are not needed)
    seq: int = 0  # the account's failure sequence number so far
    restricted_until_ms: int = 0
    restriction_reason: str = ""
    blocks: dict[str, int] = field(default_factory=dict)  # phone -> provider block end ms

    def to_json(self) -> str:
        return json.dumps(
            {
                "reservations": [[r.token, r.phone, r.lane] for r in self.reservations],
                "phones": [
                    [phone, p.streak, p.in_flight, p.last_failure_ms, p.run_seq]
                    for phone, p in self.phones.items()
                    if p.streak or p.in_flight
                ],
                "failures": [[f.at_ms, f.seq, f.phone, f.token] for f in self.failures],
                "seq": self.seq,
                "restricted_until": self.restricted_until_ms,
                "restriction_reason": self.restriction_reason,
                "blocks": [[phone, until] for phone, until in self.blocks.items()],
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class LiveState:
    """The state as Redis holds it, raw (the time rules are the reader's to apply)."""

    now_ms: int
    marker: str | None
    in_flight: int
    reservations: dict[str, str]  # token -> phone
    phones: dict[str, PhoneImage]
    failures: list[Failure]  # inside the window
    restricted_until_ms: int
    blocks: dict[str, int]


def now_ms(guard: Guard) -> int:
    """The guard's clock: the injected one, or Redis TIME (the clock every script reads)."""
    if guard._clock is not None:
        return round(guard._clock() * 1000)
    try:
        seconds, micros = guard._redis.time()
    except (redis.RedisError, OSError) as error:
        raise GuardUnavailable(f"guard for account {guard.account} unavailable") from error
    return int(seconds) * 1000 + int(micros) // 1000


def has_state(guard: Guard) -> bool:
    """True while the rebuild marker is there, i.e. admits are allowed to trust the state."""
    try:
        return bool(guard._redis.hexists(guard._keys[0], "e"))
    except (redis.RedisError, OSError) as error:
        raise GuardUnavailable(f"guard for account {guard.account} unavailable") from error


def forget(guard: Guard) -> None:
    """Drop the marker: admits refuse until the next rebuild (an operator's forced rebuild starts here)."""
    try:
        guard._redis.hdel(guard._keys[0], "e")
    except (redis.RedisError, OSError) as error:
        raise GuardUnavailable(f"guard for account {guard.account} unavailable") from error


def rebuild(guard: Guard, image: GuardImage, epoch: str) -> bool:
    """Replace the state with `image` and set the marker; False (nothing changed) if the marker is there."""
    answer = guard._call(guard._rebuild_script, guard._keys, (guard._head(), epoch, image.to_json()))
    return bool(answer == 1)


def dump(guard: Guard) -> LiveState:
    now, flat, window = guard._call(guard._dump_script, guard._keys, (guard._head(),))
    fields = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}
    reservations: dict[str, str] = {}
    phones: dict[str, PhoneImage] = {}
    blocks: dict[str, int] = {}
    for name, value in fields.items():
        if name.startswith("t:"):
            held = _text(value)  # a bulk reservation holds "b" + phone (admit.lua)
            reservations[name[2:]] = held[1:] if held.startswith("b") else held
        elif name.isdigit():
            streak, in_flight, last_failure, run_seq = struct.unpack(">HHdI", value)
            phones[name] = PhoneImage(streak, in_flight, int(last_failure), run_seq)
    for entry in _text(fields.get("bl", b"")).split(";"):
        if ":" in entry:
            phone, until = entry.split(":", 1)
            blocks[phone] = int(until)
    failures = []
    for i in range(0, len(window), 2):
        seq, phone, token = _text(window[i]).split("|", 2)
        failures.append(Failure(int(float(window[i + 1])), int(seq), phone, token))
    return LiveState(
        now_ms=int(now),
        marker=_text(fields["e"]) if "e" in fields else None,
        in_flight=int(_text(fields.get("n", b"0"))),
        reservations=reservations,
        phones=phones,
        failures=failures,
        restricted_until_ms=int(_text(fields.get("ru", b"0"))),
        blocks=blocks,
    )


def start_empty(guard: Guard) -> bool:
    """A rebuild from an empty ledger: an account with no history (tests, benchmarks, a fresh install)."""
    return rebuild(guard, GuardImage(), "empty")
