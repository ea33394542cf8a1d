"""GUARD_REDIS_URL: the guard of every account on a real three-master Redis Cluster (started here, stopped after),
while REDIS_URL (the broker) is another server entirely (here: none at all). Admits rebuild each account's state
from the ledger on the cluster and keep each account's rules on its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import account_ledger
from worker import reconcile, runtime
from worker.accounts import add_account
from worker.guard import Lane, RefusalReason
from worker.local.redis_cluster import EmbeddedRedisCluster

ACCOUNTS = [f"merchant-{index}" for index in range(12)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedRedisCluster]:
    with EmbeddedRedisCluster(masters=3) as running:
        yield running


@pytest.fixture
def on_cluster(
    cluster: EmbeddedRedisCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    host, port = cluster.startup_nodes[0]
    # REDIS_URL: nothing listens, the guard must not need it.
    for _ in account_ledger(tmp_path, monkeypatch, GUARD_REDIS_URL=f"redis+cluster://{host}:{port}"):
        for name in ACCOUNTS:
            add_account(
                runtime.engine(),
                runtime.settings(),
                name,
                [7001],
                f"tok_{name}",
                {"account_failure_limit": 3, "interactive_reserve": 1},
            )
        yield
        for client in cluster.node_clients():
            for key in client.scan_iter(match="stkpush:*"):
                client.delete(key)


@pytest.mark.usefixtures("on_cluster")
def test_every_accounts_guard_lives_on_the_cluster_and_keeps_its_own_budget(
    cluster: EmbeddedRedisCluster,
) -> None:
    for index, name in enumerate(ACCOUNTS):
        # The first admit finds no state, rebuilds it from the (empty) ledger on the cluster, and admits.
        for n in range(3):
            decision = reconcile.admit(f"2547{index:02d}00000{n}", f"{name}.{n}", Lane.INTERACTIVE, name)
            assert decision.admitted, (name, n, decision)
        # The account's budget of 3 sends in flight is used up; the next account's is untouched.
        refused = reconcile.admit(f"2547{index:02d}000009", f"{name}.x", Lane.INTERACTIVE, name)
        assert refused.reason == RefusalReason.ACCOUNT_BUDGET
    holding = [
        {key.decode().split("}", 1)[0] + "}" for key in client.scan_iter(match="stkpush:*")}
        for client in cluster.node_clients()
    ]
    assert set().union(*holding) == {f"stkpush:{{{name}}}" for name in ACCOUNTS}
    assert sum(1 for keys in holding if keys) >= 2, "the accounts' hash tags should spread over the masters"
    assert runtime.guard_of(ACCOUNTS[0]).account_snapshot().in_flight == 3
