"""The guard's Lua scripts against a plain-Python model of its four rules and the lanes (docs/guard.md), by
hypothesis.

A ledger (SQLite) records every admitted attempt and its outcome as the real system does. Two operations test
the guard's recovery: "a resolve is lost" (the ledger records the outcome, the guard is not told; paid later as
beat would) and "Redis forgets" (the state is deleted: admits must refuse, then the state is rebuilt from the
ledger, and the model from its own plain replay of the same ledger). The comparison goes on after either.

Both see the same injected clock (integer milliseconds). After every step the real guard and the model must agree
on the decision (reason and retry_after included), the resolve and revert answers, and every snapshot. Small limits
make the boundaries (streak limit, in-flight limit, budget, restriction tiers) come up often; time jumps land on
and around the exact instants where a rest, a block, a restriction or a window entry ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from worker.guard import Decision, Guard, GuardLimits, Lane, Outcome, RefusalReason, recovery
from worker.guard_ledger import implied_image
from worker.ledger import (
    AttemptOutcome,
    GuardBlock,
    GuardBlockKind,
    Payment,
    SendAttempt,
    create_schema,
    make_engine,
    session_scope,
)
from worker.phones import mask_phone

HOUR_MS = 3_600_000
START_MS = 1_700_000_000_000
PHONES = ("254700000001", "254700000002", "254711111113")

LIMIT_VARIANTS = [
    GuardLimits(),
    GuardLimits(
        phone_streak_limit=3,
        phone_cooldown_s=2 * 3600,
        account_failure_limit=5,
        account_window_s=3600,
        # Thresholds below the budget stand in for other traffic pushing the window over a tier.
        restriction_tiers=((4, 3600), (6, 3 * 3600), (8, 10 * 3600)),
        busy_poll_s=5,
        phone_memory_s=5 * 3600,
        interactive_reserve=2,
        bulk_max_inflight=2,
    ),
    GuardLimits(
        phone_streak_limit=2,
        phone_cooldown_s=3600,
        phone_max_inflight=2,
        account_failure_limit=4,
        account_window_s=1800,
        restriction_tiers=((3, 2 * 3600),),
        busy_poll_s=1.5,
        phone_memory_s=3600,
    ),
    GuardLimits(
        phone_streak_limit=10,
        account_failure_limit=8,
        restriction_tiers=((5, 4 * 3600), (6, 24 * 3600), (7, 72 * 3600)),
        phone_max_inflight=3,
        interactive_reserve=3,
    ),
]


def ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass
class PhoneModel:
    streak: int = 0
    in_flight: int = 0
    last_failure: int = 0
    run_start: int = 0  # sequence number of the first failure of the current streak


@dataclass(frozen=True)
class FailureModel:
    at: int
    seq: int
    token: str
    phone: str


@dataclass
class GuardModel:
    """The guard's rules, written plainly, with no Redis and no shared code with the scripts."""

    limits: GuardLimits
    phones: dict[str, PhoneModel] = field(default_factory=dict)
    held: dict[str, str] = field(default_factory=dict)
    bulk_held: set[str] = field(default_factory=set)  # of held, the bulk lane's tokens
    failures: list[FailureModel] = field(default_factory=list)
    restricted_until: int = 0
    restriction_reason: str = ""
    blocks: dict[str, int] = field(default_factory=dict)
    seq: int = 0

    def phone(self, phone: str, now: int) -> PhoneModel:
        state = self.phones.setdefault(phone, PhoneModel())
        limit = self.limits.phone_streak_limit
        rest = ms(self.limits.phone_cooldown_s if state.streak >= limit else self.limits.phone_memory_s)
        if state.streak and now >= state.last_failure + rest:
            state.streak, state.last_failure, state.run_start = 0, 0, 0
        return state

    def window(self, now: int) -> list[FailureModel]:
        return [f for f in self.failures if f.at > now - ms(self.limits.account_window_s)]

    def admit(
        self, phone: str, token: str, now: int, guard: GuardLimits, lane: Lane = Lane.INTERACTIVE
    ) -> Decision:
        """`guard` is the admitting guard's limits (a second integration may have another budget)."""
        lim = self.limits
        if token in self.held:
            assert self.held[token] == phone
            return Decision(True, None, 0.0)
        if now < self.restricted_until:
            return Decision(False, RefusalReason.ACCOUNT_RESTRICTED, (self.restricted_until - now) / 1000)
        if now < self.blocks.get(phone, 0):
            return Decision(False, RefusalReason.PHONE_BLOCKED, (self.blocks[phone] - now) / 1000)
        state = self.phone(phone, now)
        if state.streak >= lim.phone_streak_limit:
            rest_end = state.last_failure + ms(lim.phone_cooldown_s)
            return Decision(False, RefusalReason.PHONE_BLOCKED, (rest_end - now) / 1000)
        if (
            state.in_flight >= lim.phone_max_inflight
            or state.streak + state.in_flight >= lim.phone_streak_limit
        ):
            return Decision(False, RefusalReason.PHONE_BUSY, lim.busy_poll_s)
        window = sorted(f.at for f in self.window(now))

        def over(limit: int, reason: RefusalReason) -> Decision | None:
            must_leave = len(window) + len(self.held) - limit + 1
            if must_leave <= 0:
                return None
            if must_leave <= len(window):
                leaves_at = window[must_leave - 1] + ms(lim.account_window_s)
                return Decision(False, reason, (leaves_at - now) / 1000)
            return Decision(False, reason, lim.busy_poll_s)

        refused = over(guard.account_failure_limit, RefusalReason.ACCOUNT_BUDGET)
        if refused is not None:
            return refused
        if lane is Lane.BULK:
            cap = guard.bulk_max_inflight
            if cap is not None and len(self.bulk_held) >= cap:
                return Decision(False, RefusalReason.BULK_LANE_FULL, lim.busy_poll_s)
            refused = over(
                guard.account_failure_limit - guard.interactive_reserve, RefusalReason.BULK_LANE_FULL
            )
            if refused is not None:
                return refused
            self.bulk_held.add(token)
        self.held[token] = phone
        state.in_flight += 1
        return Decision(True, None, 0.0)

    def resolve(self, token: str, outcome: Outcome, now: int) -> bool:
        if token not in self.held:
            return False
        phone = self.held.pop(token)
        self.bulk_held.discard(token)
        state = self.phone(phone, now)
        state.in_flight = max(state.in_flight - 1, 0)
        if outcome is Outcome.SUCCESS:
            state.streak, state.last_failure, state.run_start = 0, 0, 0
        elif outcome is Outcome.FAILURE:
            self.seq += 1
            if state.streak == 0:
                state.run_start = self.seq
            state.streak += 1
            state.last_failure = now
            self.failures.append(FailureModel(now, self.seq, token, phone))
            count = len(self.window(now))
            for threshold, seconds in self.limits.restriction_tiers:
                if count == threshold + 1:
                    self.restrict(now + ms(seconds), f"more than {threshold} failures in the window")
        return True

    def revert(self, token: str, now: int) -> bool:
        mine = [f for f in self.window(now) if f.token == token]
        if not mine:
            return False
        latest = max(mine, key=lambda f: f.seq)
        self.failures.remove(latest)
        state = self.phone(latest.phone, now)
        if state.streak > 0 and latest.seq >= state.run_start:
            state.streak -= 1
            if state.streak == 0:
                state.last_failure, state.run_start = 0, 0
        return True

    def restrict(self, until: int, reason: str) -> None:
        if until > self.restricted_until:
            self.restricted_until, self.restriction_reason = until, reason

    def block(self, phone: str, until: int) -> None:
        self.blocks[phone] = max(self.blocks.get(phone, 0), until)

    def blocked_until(self, phone: str, now: int) -> float | None:
        state = self.phone(phone, now)
        ends = [self.blocks.get(phone, 0)]
        if state.streak >= self.limits.phone_streak_limit:
            ends.append(state.last_failure + ms(self.limits.phone_cooldown_s))
        end = max(ends)
        return end / 1000 if end > now else None

    def boundaries(self) -> list[int]:
        """Instants at which some refusal ends or some state changes by itself."""
        lim = self.limits
        times = [self.restricted_until, *self.blocks.values()]
        times += [f.at + ms(lim.account_window_s) for f in self.failures]
        for state in self.phones.values():
            if state.streak:
                times += [
                    state.last_failure + ms(lim.phone_cooldown_s),
                    state.last_failure + ms(lim.phone_memory_s),
                ]
        return times


@dataclass(frozen=True)
class LedgerEntry:
    token: str
    phone: str
    outcome: Outcome | None = None  # None: in flight
    at: int = 0
    reverted: bool = False
    bulk: bool = False  # admitted in the bulk lane


def replay(
    limits: GuardLimits, entries: list[LedgerEntry], blocks: list[tuple[str | None, int, str]]
) -> GuardModel:
    """The model a ledger implies, written plainly: outcomes in time order through the model's own rules."""
    model = GuardModel(limits)
    window = ms(limits.account_window_s)
    counted: list[int] = []  # failures as they happened (reverted ones too: the guard saw them)
    ended = sorted(
        (e for e in entries if e.outcome in (Outcome.SUCCESS, Outcome.FAILURE)), key=lambda e: (e.at, e.token)
    )
    for entry in ended:
        state = model.phone(entry.phone, entry.at)
        if entry.outcome is Outcome.SUCCESS:
            state.streak, state.last_failure, state.run_start = 0, 0, 0
            continue
        model.seq += 1
        counted.append(entry.at)
        if not entry.reverted:
            if state.streak == 0:
                state.run_start = model.seq
            state.streak += 1
            state.last_failure = entry.at
            model.failures.append(FailureModel(entry.at, model.seq, entry.token, entry.phone))
        count = sum(1 for at in counted if at > entry.at - window)
        for threshold, seconds in limits.restriction_tiers:
            if count == threshold + 1:
                model.restrict(entry.at + ms(seconds), f"more than {threshold} failures in the window")
    for entry in entries:
        if entry.outcome is None:
            model.held[entry.token] = entry.phone
            if entry.bulk:
                model.bulk_held.add(entry.token)
            model.phones.setdefault(entry.phone, PhoneModel()).in_flight += 1
    for phone, until, reason in blocks:
        if phone is None:
            model.restrict(until, reason)
        else:
            model.block(phone, until)
    return model


ADMIT = st.tuples(st.just("admit"), st.sampled_from(PHONES), st.integers(0, 1))
BULK_ADMIT = st.tuples(st.just("bulk"), st.sampled_from(PHONES), st.integers(0, 1))
# Failures weigh double: they drive every limit. The pick mostly lands on a held token.
RESOLVE = st.tuples(
    st.just("resolve"),
    st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.FAILURE, Outcome.RELEASED]),
    st.integers(0, 9),
)
TICK = st.tuples(st.just("tick"), st.integers(0, 120_000), st.just(0))
# A late success callback: takes back one of the recent failures (or tries a token that never failed).
REVERT = st.tuples(st.just("revert"), st.just(""), st.integers(0, 8))
# A new attempt that reuses a settled token (so one token can own two failures in the window).
REUSE = st.tuples(st.just("reuse"), st.sampled_from(PHONES), st.integers(0, 3))
TRAFFIC = st.lists(
    st.one_of(ADMIT, ADMIT, BULK_ADMIT, BULK_ADMIT, RESOLVE, RESOLVE, RESOLVE, TICK, REVERT, REUSE),
    min_size=4,
    max_size=24,
)


class GuardMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.client = redis.Redis.from_url(self.url)
        self.client.flushdb()
        self.now = START_MS
        self.tokens = 0
        self.settled: list[str] = []
        self.failed: list[str] = []
        # The ledger: what the real system records (attempts and their outcomes, provider blocks).
        self.engine = make_engine("sqlite://")
        create_schema(self.engine)
        self.ledger: dict[str, LedgerEntry] = {}
        self.blocks: list[tuple[str | None, int, str]] = []
        self.owed: list[tuple[str, Outcome]] = []
        self.reused = False  # a reused token has no ledger of its own: recovery operations stop then

    def clock(self) -> float:
        return self.now / 1000

    @initialize(limits=st.sampled_from(LIMIT_VARIANTS), collect_small_hashes=st.booleans())
    def build(self, limits: GuardLimits, collect_small_hashes: bool) -> None:
        # Two guards on one account stand for two workers. The second has a larger budget: it stands for other
        # traffic on the account, so the window can pass the first guard's budget and the restriction tiers.
        self.guards = [
            Guard(self.client, "acct", limits, clock=self.clock),
            Guard(
                self.client,
                "acct",
                replace(limits, account_failure_limit=limits.account_failure_limit + 3),
                clock=self.clock,
            ),
        ]
        assert recovery.start_empty(self.guards[0])  # a new account: its empty ledger is the starting state
        if collect_small_hashes:
            # Collecting dead number fields (every fourth failure, even in a small hash) must never change a
            # decision.
            for guard in self.guards:
                guard._collect_above(0)
        self.model = GuardModel(limits)

    def teardown(self) -> None:
        self.client.close()
        self.engine.dispose()

    def moment(self) -> datetime:
        return datetime.fromtimestamp(self.now / 1000, UTC)

    def record_attempt(self, token: str, phone: str, lane: Lane = Lane.INTERACTIVE) -> None:
        self.ledger[token] = LedgerEntry(token, phone, bulk=lane is Lane.BULK)
        with session_scope(self.engine) as session:
            session.add(
                Payment(
                    id=f"p-{token}",
                    account="acct",
                    external_reference=token,
                    phone=phone,
                    amount=1,
                    channel_id=1,
                    queue="bulk" if lane is Lane.BULK else "single",
                )
            )
            session.flush()
            session.add(
                SendAttempt(
                    id=token,
                    payment_id=f"p-{token}",
                    account="acct",
                    number=1,
                    lane="bulk" if lane is Lane.BULK else "single",
                    created_at=self.moment(),
                )
            )
            session.commit()

    def record_outcome(self, token: str, outcome: Outcome) -> None:
        entry = self.ledger.get(token)
        if entry is None or entry.outcome is not None:
            return
        self.ledger[token] = replace(entry, outcome=outcome, at=self.now)
        with session_scope(self.engine) as session:
            attempt = session.get(SendAttempt, token)
            assert attempt is not None
            attempt.outcome = AttemptOutcome(outcome.value)
            attempt.outcome_at = self.moment()
            session.add(attempt)
            session.commit()

    def admit(self, worker: int, phone: str, token: str, lane: Lane = Lane.INTERACTIVE) -> None:
        guard = self.guards[worker]
        fresh = token not in self.model.held
        expected = self.model.admit(phone, token, self.now, guard.limits, lane)
        assert guard.admit(phone, token, lane) == expected
        if expected.admitted and fresh and token != "probe":
            if token in self.ledger:
                self.reused = True
            else:
                self.record_attempt(token, phone, lane)

    def resolve(self, worker: int, token: str, outcome: Outcome) -> None:
        changed = self.guards[worker].resolve(token, outcome)
        assert changed == self.model.resolve(token, outcome, self.now)
        if changed:
            self.record_outcome(token, outcome)
            self.settled.append(token)
            if outcome is Outcome.FAILURE:
                self.failed.append(token)

    def revert(self, token: str) -> None:
        reverted = self.guards[1].revert_failure(token)
        assert reverted == self.model.revert(token, self.now)
        entry = self.ledger.get(token)
        if reverted and entry is not None and entry.outcome is Outcome.FAILURE and not entry.reverted:
            self.ledger[token] = replace(entry, reverted=True)
            with session_scope(self.engine) as session:
                attempt = session.get(SendAttempt, token)
                assert attempt is not None
                attempt.outcome = AttemptOutcome.REVERTED
                session.add(attempt)
                session.commit()

    @rule(data=st.data(), outcome=st.sampled_from([Outcome.SUCCESS, Outcome.FAILURE, Outcome.RELEASED]))
    def a_resolve_is_lost(self, data: st.DataObject, outcome: Outcome) -> None:
        """The ledger records how an attempt ended; the guard never hears of it (Redis away, worker killed)."""
        open_tokens = sorted(
            t for t in self.model.held if t in self.ledger and self.ledger[t].outcome is None
        )
        if self.reused or not open_tokens:
            return
        token = data.draw(st.sampled_from(open_tokens))
        self.record_outcome(token, outcome)
        self.owed.append((token, outcome))

    @rule()
    def beat_pays_what_is_owed(self) -> None:
        """Beat resolves from the ledger what the guard was not told (a no-op for a token it does not hold)."""
        for token, outcome in self.owed:
            changed = self.guards[0].resolve(token, outcome)
            assert changed == self.model.resolve(token, outcome, self.now)
            if changed:
                self.settled.append(token)
                if outcome is Outcome.FAILURE:
                    self.failed.append(token)
        self.owed.clear()

    @rule()
    def redis_forgets(self) -> None:
        """Redis loses the account's state: every admit refuses until it is rebuilt from the ledger alone."""
        if self.reused or not hasattr(self, "model"):
            return
        self.client.delete("stkpush:{acct}:s", "stkpush:{acct}:w")
        for guard in self.guards:
            refused = guard.admit(PHONES[0], "after-forgetting")
            assert (refused.admitted, refused.reason) == (False, RefusalReason.GUARD_REBUILDING)
        limits = self.model.limits
        image = implied_image(self.engine, "acct", limits, self.now).image
        assert recovery.rebuild(self.guards[0], image, "test")
        assert not recovery.rebuild(self.guards[1], image, "again")  # a second rebuild changes nothing
        # A released attempt left nothing behind: the ledger's replay skips it.
        entries = [e for e in self.ledger.values() if e.outcome is not Outcome.RELEASED]
        self.model = replay(limits, entries, self.blocks)
        # Failures older than the window are gone from the rebuilt window, and so from what a revert can find.
        self.failed = [t for t in self.failed if any(f.token == t for f in self.model.window(self.now))]

    @rule(actions=TRAFFIC)
    def traffic(self, actions: list[tuple[str, object, int]]) -> None:
        """Admits on fresh tokens, resolves of held (or settled, or unknown) tokens, seconds passing."""
        for kind, what, pick in actions:
            if kind in ("admit", "bulk"):
                self.tokens += 1
                lane = Lane.BULK if kind == "bulk" else Lane.INTERACTIVE
                self.admit(pick, str(what), f"t{self.tokens}", lane)
            elif kind == "resolve":
                held = sorted(self.model.held)
                if held and pick < 8:
                    token = held[pick % len(held)]
                else:
                    token = self.settled[-1] if self.settled and pick == 8 else "unknown"
                self.resolve(pick % 2, token, Outcome(str(what)))
            elif kind == "revert":
                choices = [*self.failed[-8:], self.settled[-1] if self.settled else "unknown"]
                self.revert(choices[pick % len(choices)])
            elif kind == "reuse":
                settled = [t for t in self.settled[-4:] if t not in self.model.held]
                if settled:
                    self.admit(pick % 2, str(what), settled[pick % len(settled)])
            else:
                self.now += int(str(what))

    @rule(data=st.data())
    def admit_again(self, data: st.DataObject) -> None:
        """A redelivered task: its token is still held."""
        if self.model.held:
            token = data.draw(st.sampled_from(sorted(self.model.held)))
            self.admit(data.draw(st.integers(0, 1)), self.model.held[token], token)

    @rule(
        phone=st.sampled_from(PHONES),
        seconds=st.sampled_from([0.5, 5, 60, 600, 24 * 3600]),
        account_wide=st.booleans(),
        reason=st.sampled_from(["HTTP 429", "abuse"]),
    )
    def provider_answers(self, phone: str, seconds: float, account_wide: bool, reason: str) -> None:
        """The provider restricts the account, or blocks one number."""
        if account_wide:
            seconds = min(seconds, 600)
            self.guards[0].restrict_account(seconds, reason)
            self.model.restrict(self.now + ms(seconds), reason)
        else:
            self.guards[0].block_phone(phone, seconds)
            self.model.block(phone, self.now + ms(seconds))
        # Recorded in the ledger as the send path does, so a rebuilt guard still honours it.
        until = self.now + ms(seconds)
        self.blocks.append((None if account_wide else phone, until, reason))
        with session_scope(self.engine) as session:
            session.add(
                GuardBlock(
                    account="acct",
                    kind=GuardBlockKind.ACCOUNT if account_wide else GuardBlockKind.PHONE,
                    phone=None if account_wide else phone,
                    until=datetime.fromtimestamp(until / 1000, UTC),
                    reason=reason,
                )
            )
            session.commit()

    @rule(step=st.one_of(st.integers(0, HOUR_MS), st.integers(HOUR_MS, 30 * HOUR_MS)))
    def time_passes(self, step: int) -> None:
        self.now += step

    @rule(data=st.data(), offset=st.sampled_from([-1, 0, 1]))
    def time_reaches_a_boundary(self, data: st.DataObject, offset: int) -> None:
        ahead = sorted({t + offset for t in self.model.boundaries() if t + offset > self.now})
        if ahead:
            self.now = data.draw(st.sampled_from(ahead))

    @invariant()
    def snapshots_agree(self) -> None:
        if not hasattr(self, "model"):
            return
        model = self.model
        window = len(model.window(self.now))
        restricted = model.restricted_until > self.now
        for guard in self.guards:
            lim = guard.limits
            bulk_headroom = lim.account_failure_limit - lim.interactive_reserve - window - len(model.held)
            if lim.bulk_max_inflight is not None:
                bulk_headroom = min(bulk_headroom, lim.bulk_max_inflight - len(model.bulk_held))
            expected = (
                window,
                len(model.held),
                model.restricted_until / 1000 if restricted else None,
                model.restriction_reason if restricted else None,
                max(lim.account_failure_limit - window - len(model.held), 0),
                sum(1 for until in model.blocks.values() if until > self.now),
                len(model.bulk_held),
                max(bulk_headroom, 0),
            )
            got = guard.account_snapshot()
            actual = (
                got.failures_in_window,
                got.in_flight,
                got.restricted_until,
                got.restriction_reason,
                got.headroom,
                got.blocked_numbers,
                got.bulk_in_flight,
                got.bulk_headroom,
            )
            assert actual == expected
        for phone in PHONES:
            state = model.phone(phone, self.now)
            snapshot = self.guards[1].phone_snapshot(phone)
            assert snapshot.phone == mask_phone(phone)
            assert (snapshot.streak, snapshot.in_flight, snapshot.blocked_until) == (
                state.streak,
                state.in_flight,
                model.blocked_until(phone, self.now),
            )

    @invariant()
    def decisions_agree_for_every_number(self) -> None:
        """Ask both guards about every number now (then release): a refusal's reason and retry_after too.

        A release after an admit leaves the rules' state as it was, so this probes the decision at every instant
        the machine reaches, the exact ends of rests, blocks, restrictions and window entries included.
        """
        if not hasattr(self, "model"):
            return
        for worker in (0, 1):
            for phone in PHONES:
                for lane in Lane:
                    self.admit(worker, phone, "probe", lane)
                    if "probe" in self.model.held:
                        self.resolve(worker, "probe", Outcome.RELEASED)
                        self.settled.pop()

    @invariant()
    def rules_hold(self) -> None:
        """The rules themselves, on the model the guard has just agreed with."""
        if not hasattr(self, "model"):
            return
        lim = self.model.limits
        for phone in PHONES:
            state = self.model.phone(phone, self.now)
            assert state.streak + state.in_flight <= lim.phone_streak_limit
            assert state.in_flight <= lim.phone_max_inflight
        # The larger of the two budgets: the traffic of both guards never takes window + in flight past it.
        budget = self.guards[1].limits.account_failure_limit
        assert len(self.model.window(self.now)) + len(self.model.held) <= budget
        if lim.bulk_max_inflight is not None:
            assert len(self.model.bulk_held) <= lim.bulk_max_inflight


def test_guard_scripts_agree_with_the_model(redis_url: str) -> None:
    GuardMachine.url = redis_url
    run_state_machine_as_test(
        GuardMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=50,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


@pytest.mark.parametrize("limits", LIMIT_VARIANTS[1:2])
def test_model_refuses_the_eleventh_failure_like_the_provider(limits: GuardLimits) -> None:
    """The model itself is checked: without it the comparison above could agree on a wrong rule."""
    model = GuardModel(limits)
    for i in range(limits.phone_streak_limit):
        assert model.admit(PHONES[0], f"t{i}", START_MS, limits).admitted
        model.resolve(f"t{i}", Outcome.FAILURE, START_MS)
    refused = model.admit(PHONES[0], "next", START_MS, limits)
    assert refused.reason is RefusalReason.PHONE_BLOCKED
    assert refused.retry_after == limits.phone_cooldown_s


def test_model_keeps_the_interactive_reserve_from_bulk() -> None:
    """The model's lanes are checked too: bulk stops at the limit minus the reserve, interactive goes on."""
    limits = LIMIT_VARIANTS[1]  # limit 5, reserve 2, bulk cap 2
    model = GuardModel(limits)
    assert model.admit(PHONES[0], "b0", START_MS, limits, Lane.BULK).admitted
    assert model.admit(PHONES[1], "b1", START_MS, limits, Lane.BULK).admitted
    assert model.admit(PHONES[2], "b2", START_MS, limits, Lane.BULK).reason is RefusalReason.BULK_LANE_FULL
    model.resolve("b0", Outcome.FAILURE, START_MS)
    model.resolve("b1", Outcome.FAILURE, START_MS)
    assert model.admit(PHONES[2], "i2", START_MS, limits).admitted
    refused = model.admit(PHONES[1], "b3", START_MS, limits, Lane.BULK)
    assert refused == Decision(False, RefusalReason.BULK_LANE_FULL, limits.account_window_s)
