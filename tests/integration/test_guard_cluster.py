"""The guard on a real Redis Cluster: three masters on loopback ports, started here and stopped after, reached
through redis-py's cluster client. Each account's keys share a hash tag, so every script touches one slot; many
accounts spread over every master, and each account's rules hold exactly as on a single Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis.cluster import ClusterNode, RedisCluster

from tests.unit.test_guard import Clock, fail
from worker.guard import Guard, GuardLimits, Outcome, RefusalReason, recovery
from worker.local.redis_cluster import EmbeddedRedisCluster

ACCOUNTS = 60
HOUR = 3600.0
LIMITS = GuardLimits(
    phone_streak_limit=3,
    account_failure_limit=5,
    account_window_s=HOUR,
    restriction_tiers=((5, 4 * HOUR),),
    phone_memory_s=10 * HOUR,
    phone_cooldown_s=2 * HOUR,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedRedisCluster]:
    with EmbeddedRedisCluster(masters=3) as running:
        yield running


@pytest.fixture(scope="module")
def client(cluster: EmbeddedRedisCluster) -> Iterator[RedisCluster]:
    connection = RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in cluster.startup_nodes])
    yield connection
    connection.close()


def guard_for(client: RedisCluster, account: str, clock: Clock) -> Guard:
    guard = Guard(client, account, LIMITS, clock=clock)  # type: ignore[arg-type]
    recovery.start_empty(
        guard
    )  # a new account: the ledger has nothing for it (once; later calls change nothing)
    return guard


def number(account_index: int, phone_index: int) -> str:
    return f"2547{account_index:04d}{phone_index:04d}"


def test_each_accounts_rules_hold_on_the_cluster(client: RedisCluster) -> None:
    clock = Clock()
    for index in range(ACCOUNTS):
        guard = guard_for(client, f"merchant-{index}", clock)
        streaked = number(index, 0)
        # Phone streak: the limit's worth of failures, then the number is refused
        for attempt in range(LIMITS.phone_streak_limit):
            fail(guard, streaked, f"s{attempt}")
        refused = guard.admit(streaked, "s-next")
        assert not refused.admitted and refused.reason == RefusalReason.PHONE_BLOCKED
        # One prompt at a time per number
        other = number(index, 1)
        assert guard.admit(other, "live").admitted
        busy = guard.admit(other, "second")
        assert not busy.admitted and busy.reason == RefusalReason.PHONE_BUSY
        # Account budget: failures plus sends in flight stay below the limit
        fail(guard, number(index, 2), "b1")
        refused = guard.admit(number(index, 3), "b2")
        assert not refused.admitted and refused.reason == RefusalReason.ACCOUNT_BUDGET
        # A success frees the in-flight slot and keeps the window
        assert guard.resolve("live", Outcome.SUCCESS)
        snapshot = guard.account_snapshot()
        assert (snapshot.failures_in_window, snapshot.in_flight, snapshot.headroom) == (4, 0, 1)
        # Accounts never see each other: the next account starts empty
        assert guard_for(client, f"merchant-{index + 1}", clock).account_snapshot().failures_in_window == 0


def test_a_restriction_and_the_window_slide_per_account_on_the_cluster(client: RedisCluster) -> None:
    clock = Clock()
    restricted, calm = guard_for(client, "restricted-one", clock), guard_for(client, "calm-one", clock)
    for index in range(LIMITS.restriction_tiers[0][0] + 1):
        assert restricted.count_external_failure(f"ext-{index}", clock.now)
    decision = restricted.admit(number(9000, 1), "after")
    assert not decision.admitted and decision.reason == RefusalReason.ACCOUNT_RESTRICTED
    assert calm.admit(number(9001, 1), "calm").admitted
    clock.advance(HOUR + 1)
    assert restricted.account_snapshot().failures_in_window == 0


def test_accounts_spread_over_every_master_and_each_stays_in_one_slot(
    cluster: EmbeddedRedisCluster, client: RedisCluster
) -> None:
    clock = Clock()
    for index in range(ACCOUNTS):
        fail(guard_for(client, f"spread-{index}", clock), number(index, 5), "one")
    keys_per_master = []
    for node in cluster.node_clients():
        keys = [key.decode() for key in node.scan_iter(match="stkpush:{spread-*", count=1000)]
        keys_per_master.append(keys)
        node.close()
    assert all(keys_per_master), [len(keys) for keys in keys_per_master]
    accounts_per_master = [{key.split("}")[0] for key in keys} for keys in keys_per_master]
    # No account is split across masters: its state hash and its window live on one node
    for one, other in ((0, 1), (0, 2), (1, 2)):
        assert not accounts_per_master[one] & accounts_per_master[other]
    assert sum(len(accounts) for accounts in accounts_per_master) >= ACCOUNTS
