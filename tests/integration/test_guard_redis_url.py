"""GUARD_REDIS_URL: the guard of every account on a real three-master Redis Cluster (started here, stopped after),
while REDIS_URL (the broker) is another server entirely (here: none at all). Admits rebuild each account's state
from the ledger on the cluster and keep each account's rules on its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import reconcile, runtime
from worker.accounts import add_account
from worker.guard import Lane, RefusalReason
from worker.ledger import create_schema
from worker.local.redis_cluster import EmbeddedRedisCluster
from worker.secrets_box import generate_key

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
    for name, value in {
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
        "UPESIPAY_AUTH_TOKEN": "tok_env_account_value",
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": "acct-env",
        "CALLBACK_BASE_URL": "http://127.0.0.1:9",
        "CALLBACK_SECRET": "s" * 32,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "REDIS_URL": "redis://127.0.0.1:9/0",  # nothing listens: the guard must not need it
        "GUARD_REDIS_URL": f"redis+cluster://{host}:{port}",
        "ACCOUNT_TOKEN_KEY": generate_key(),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    runtime.reset()
    create_schema(runtime.engine())
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
    runtime.engine().dispose()
    runtime.reset()


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
