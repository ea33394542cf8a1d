"""The guard's admit rate on a three-master Redis Cluster against a single Redis, in one run.

    .venv/bin/python bench/guard_cluster.py [--reps 5] [--ops 3000] [--accounts 200]

Both servers are private (started here, stopped after). Each admit is for a number not seen before, spread over
`--accounts` accounts in turn, so on the cluster the calls go to every master through redis-py's cluster client
(it routes each script by its keys' hash tag). Prints the median rate of each and the ratio cluster / single; the
ratio is what one client pays for routing (the cluster's gain is capacity across masters, not one client's
speed). Exits non-zero only when an admit is refused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.guard import Guard, GuardLimits, recovery
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.redis_cluster import EmbeddedRedisCluster

LIMITS = GuardLimits(account_failure_limit=10**9, restriction_tiers=())


def admit_rate(client: redis.Redis | RedisCluster, rep: int, ops: int, accounts: int) -> float:
    guards = [Guard(client, f"bench{rep}-{index}", LIMITS) for index in range(accounts)]  # type: ignore[arg-type]
    for guard in guards:
        # A new account: its (empty) state is marked as rebuilt, else every admit waits for a rebuild.
        recovery.start_empty(guard)
    started = time.perf_counter()
    for i in range(ops):
        if not guards[i % accounts].admit(f"2547{rep % 10}{i:07d}", f"t{i}").admitted:
            raise RuntimeError("an admit was refused that the limits allow")
    return ops / (time.perf_counter() - started)


def compare(reps: int, ops: int, accounts: int, verbose: bool = False) -> tuple[float, float, list[int]]:
    """Median admit rates on a private single Redis and a private 3-master cluster, measured in turn in one run,
    and the keys per master after; bench/accounts.py prints the same comparison."""
    with EmbeddedRedis() as single_server, EmbeddedRedisCluster(masters=3) as cluster_server:
        single = redis.Redis.from_url(single_server.url)
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster_server.startup_nodes])
        admit_rate(single, 99, 300, accounts)  # warm up: script loading, connections
        admit_rate(cluster, 99, 300, accounts)
        single_rates, cluster_rates = [], []
        for rep in range(reps):
            single_rates.append(admit_rate(single, rep, ops, accounts))
            cluster_rates.append(admit_rate(cluster, rep, ops, accounts))
            if verbose:
                print(f"rep {rep + 1}: single {single_rates[-1]:8.0f}/s  cluster {cluster_rates[-1]:8.0f}/s")
        spread = [node.dbsize() for node in cluster_server.node_clients()]
        single.close()
        cluster.close()
    return statistics.median(single_rates), statistics.median(cluster_rates), spread


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--accounts", type=int, default=200)
    args = parser.parse_args()
    one, many, spread = compare(args.reps, args.ops, args.accounts, verbose=True)
    print(f"\nmedians over {args.reps} reps of {args.ops} admits over {args.accounts} accounts")
    print(f"  guard.admit on one Redis            {one:9.0f}/s")
    print(f"  guard.admit on a 3-master cluster   {many:9.0f}/s   ratio cluster / single {many / one:.2f}")
    print(f"  keys per master: {spread}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
