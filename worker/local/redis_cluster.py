"""A private Redis Cluster of three masters on loopback ports, for the tests and benchmarks of the guard on a
cluster (the guard's keys of one account share a hash tag, so its scripts are legal there).

Built without redis-cli: each node gets a third of the 16384 slots (CLUSTER ADDSLOTS), then the nodes meet
(CLUSTER MEET) and the cluster is used once every node says `cluster_state:ok`. Only the processes it started
are stopped, and their folders removed.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from worker.local.embedded_redis import redis_answers, redis_server_binary

SLOTS = 16384
# A cluster node also listens on its port + 10000 (the cluster bus; redis-server 6 has no option to move it), so
# both must be free and below 65536: ports are drawn from this range, not from the kernel's ephemeral ones.
PORT_RANGE = (20000, 40000)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port(taken: set[int]) -> int:
    """A port that is free, and whose cluster-bus port (+10000) is free too."""
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        if port not in taken and _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _cluster(client: redis.Redis, *args: object) -> object:
    """One CLUSTER subcommand on one node (redis-py types no generic command)."""
    return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call]


@dataclass
class EmbeddedRedisCluster:
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    workdir: Path | None = None

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", port) for port in self.ports]

    def start(self, timeout_s: float = 20.0) -> EmbeddedRedisCluster:
        self.workdir = Path(tempfile.mkdtemp(prefix="stkpush-cluster-"))
        try:
            for _ in range(self.masters):
                self.ports.append(free_cluster_port(set(self.ports)))
            for port in self.ports:
                self.processes.append(self._start_node(port))
            self._wait(lambda port: redis_answers(f"redis://127.0.0.1:{port}/0", 0.2), timeout_s, "answer")
            self._assign_slots()
            first = self._client(self.ports[0])
            for port in self.ports[1:]:
                _cluster(first, "MEET", "127.0.0.1", port)
            self._wait(self._cluster_ok, timeout_s, "agree on the cluster")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_node(self, port: int) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        folder = self.workdir / str(port)
        folder.mkdir()
        argv = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(folder / "nodes.conf"),
            "--cluster-node-timeout",
            "5000",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ]
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _assign_slots(self) -> None:
        share = SLOTS // self.masters
        for index, port in enumerate(self.ports):
            first = index * share
            last = SLOTS if index == self.masters - 1 else first + share
            _cluster(self._client(port), "ADDSLOTS", *range(first, last))

    def _cluster_ok(self, port: int) -> bool:
        info = _cluster(self._client(port), "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and f"cluster_known_nodes:{self.masters}" in text

    def _wait(self, ready: Callable[[int], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(process.poll() is not None for process in self.processes):
                raise RuntimeError(
                    "a cluster node exited at start (does this redis-server support cluster mode?)"
                )
            if all(ready(port) for port in self.ports):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the cluster's nodes did not {what} within {timeout_s}s")

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def node_clients(self) -> list[redis.Redis]:
        """One plain client per master, to look at what each holds."""
        return [self._client(port) for port in self.ports]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes, self.ports = [], []
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> EmbeddedRedisCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
