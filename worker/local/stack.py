"""A whole stkpush stack on this machine, as real processes: Redis, the sandbox, the web app, workers, beat.

`stkpush demo` and the integration tests both use it. Everything it starts it stops; the only Redis keys it
writes live under its own prefix (or in a Redis it started), and it deletes them when it stops.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx
import redis

from worker.local.embedded_redis import EmbeddedRedis, free_port, redis_answers

SANDBOX_CHANNEL_ID = 2133


def wait_http(
    url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None, log_path: Path | None = None
) -> None:
    """Until `url` answers below 500; fails early if `process` exits, quoting `log_path` when given."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            log = f":\n{log_path.read_text(errors='replace')}" if log_path is not None else ""
            raise RuntimeError(
                f"process for {url} exited with code {process.returncode} before answering{log}"
            )
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    log = f":\n{log_path.read_text(errors='replace')}" if log_path is not None else ""
    raise RuntimeError(f"{url} did not answer within {timeout_s}s{log}")


def _reconfigure() -> None:
    """Rebuild this process's settings-derived resources and the Celery app's broker configuration."""
    from worker import runtime
    from worker.celery_app import app, celery_config
    from worker.settings import SettingsError

    runtime.reset()
    try:
        app.conf.update(celery_config(runtime.settings()))
    except SettingsError:
        return  # the restored environment has no stkpush settings: nothing to point at
    app.close()  # drop connections pooled for the previous broker URL
    app.amqp._producer_pool = None  # close() keeps the producer pool, which still points at the old broker


@dataclass
class Stack:
    """Start with `with Stack(...) as stack:`; `stack.env` is the environment every part runs with."""

    redis_url: str | None = None  # use this Redis (under a private key prefix) instead of starting one
    database_url: str | None = None  # default: a SQLite file in workdir
    scenario: str = '{"default": {"outcomes": {"success": 1.0}}}'
    sandbox_args: tuple[str, ...] = ()
    extra_env: dict[str, str] = field(default_factory=dict)
    log_to: Path | None = None  # keep logs, ledger and scenario here (default: a temporary folder, deleted)
    workers: int = 1  # `celery worker` processes started by `with Stack(...)`
    token: str = field(default_factory=lambda: "sbx_" + secrets.token_urlsafe(18))
    account: str = field(default_factory=lambda: "acct-" + secrets.token_hex(4))
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    embedded: EmbeddedRedis | None = None
    key_prefix: str = ""
    env: dict[str, str] = field(default_factory=dict)
    sandbox_url: str = ""
    web_url: str = ""
    _logs: list[IO[bytes]] = field(default_factory=list)
    _saved_environ: dict[str, str] | None = None
    workdir: Path = field(init=False)

    def __post_init__(self) -> None:
        if self.log_to is not None:
            self.log_to.mkdir(parents=True, exist_ok=True)
            self.workdir = self.log_to
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="stkpush-"))

    # ---- start -----------------------------------------------------------------------------------------
    def start(self, *, web: bool = True, workers: int | None = None, beat: bool = True) -> Stack:
        try:
            self._start_redis()
            self._write_env()
            self._start_sandbox()
            from worker.ledger import make_engine
            from worker.migrations import upgrade

            engine = make_engine(self.env["DATABASE_URL"])
            upgrade(engine)
            engine.dispose()
            if web:
                self.start_web()
            for index in range(self.workers if workers is None else workers):
                self.start_worker(f"worker{index + 1}")
            if beat:
                self.start_beat()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self) -> None:
        if self.redis_url and redis_answers(self.redis_url):
            # A Redis we did not create: keep to our own key prefix and delete only those keys at the end.
            self.key_prefix = f"stkpush-{self.account}:"
            return
        self.embedded = EmbeddedRedis().start()
        self.redis_url = self.embedded.url

    def _write_env(self) -> None:
        sandbox_port, web_port = free_port(), free_port()
        self.sandbox_url = f"http://127.0.0.1:{sandbox_port}"
        self.web_url = f"http://127.0.0.1:{web_port}"
        database_url = self.database_url or f"sqlite:///{self.workdir / 'stkpush.db'}"
        assert self.redis_url is not None
        self.env = {
            "UPESIPAY_BASE_URL": self.sandbox_url,
            "UPESIPAY_AUTH_TOKEN": self.token,
            "UPESIPAY_CHANNEL_ID": str(SANDBOX_CHANNEL_ID),
            "UPESIPAY_ACCOUNT": self.account,
            "UPESIPAY_READ_TIMEOUT_S": "3",
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": self.key_prefix,
            "DATABASE_URL": database_url,
            "CALLBACK_BASE_URL": self.web_url,
            "CALLBACK_SECRET": secrets.token_urlsafe(24),
            "API_KEYS": "key_" + secrets.token_urlsafe(18),
            "DISPATCH_INTERVAL_S": "0.5",
            "SETTLE_AFTER_S": "5",
            "SETTLE_UNKNOWN_AFTER_S": "2",
            "SETTLE_POLL_S": "2",
            "BATCH_DIR": str(self.workdir / "batches"),
            "SEND_BACKOFF_BASE_S": "0.5",
            "SEND_BACKOFF_CAP_S": "5",
            "STUCK_SENDING_AFTER_S": "20",
            **self.extra_env,
        }
        self.sandbox_port, self.web_port = sandbox_port, web_port

    def child_env(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UPESIPAY_", "CALLBACK_"))}
        env.update(self.env)
        env.update(overrides or {})
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _spawn(
        self, name: str, argv: list[str], overrides: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "ab")
        self._logs.append(log_file)
        process = subprocess.Popen(
            argv,
            env=self.child_env(overrides),
            cwd=self.workdir,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def _start_sandbox(self) -> None:
        scenario_file = self.workdir / "scenario.json"
        scenario_file.write_text(self.scenario)
        process = self._spawn(
            "sandbox",
            [
                sys.executable,
                "-m",
                "worker.sandbox.cli",
                "--port",
                str(self.sandbox_port),
                "--token",
                self.token,
                "--scenario",
                str(scenario_file),
                *self.sandbox_args,
            ],
        )
        wait_http(f"{self.sandbox_url}/sandbox/stats", 20, process)

    def start_web(self) -> None:
        process = self._spawn(
            "web",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "worker.web.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.web_port),
                "--log-level",
                "warning",
            ],
        )
        wait_http(f"{self.web_url}/healthz", 30, process)

    def start_worker(
        self, name: str = "worker1", concurrency: int = 2, overrides: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A `celery worker` process; `overrides` changes its environment only (a wrong token, a fail-point)."""
        log_path = self.workdir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        process = self._spawn(
            name,
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "-Q",
                "maintenance,single,bulk,webhooks",
                "-c",
                str(concurrency),
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
                "-l",
                "info",
            ],
            overrides,
        )
        self._wait_worker_ready(log_path, offset, process)
        return process

    def _wait_worker_ready(
        self, log_path: Path, offset: int, process: subprocess.Popen[bytes], timeout_s: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"worker exited with code {process.returncode}: see {log_path}")
            if log_path.exists() and b" ready." in log_path.read_bytes()[offset:]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"worker not ready within {timeout_s}s: see {log_path}")

    def start_beat(self) -> None:
        self._spawn(
            "beat",
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "beat",
                "-s",
                str(self.workdir / "beat-schedule"),
                "-l",
                "info",
            ],
        )

    # ---- stop ------------------------------------------------------------------------------------------
    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 15) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        self.deactivate()
        for name in list(self.processes):
            self.stop_process(name)
        for log_file in self._logs:
            log_file.close()
        self._logs.clear()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        elif self.redis_url and self.key_prefix:
            self._delete_own_keys()
        if self.log_to is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _delete_own_keys(self) -> None:
        assert self.redis_url is not None
        client = redis.Redis.from_url(self.redis_url)
        try:
            for pattern in (f"{self.key_prefix}*", f"stkpush:{{{self.account}}}:*"):
                batch = list(client.scan_iter(match=pattern, count=500))
                for start in range(0, len(batch), 500):
                    client.delete(*batch[start : start + 500])
        finally:
            client.close()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- use ---------------------------------------------------------------------------------------------
    def activate(self) -> None:
        """Point this process's settings at the stack (producers, ledger reads, guard snapshots)."""
        self._saved_environ = dict(os.environ)
        os.environ.update(self.env)
        _reconfigure()

    def deactivate(self) -> None:
        """Give this process back the environment it had before activate()."""
        if self._saved_environ is None:
            return
        os.environ.clear()
        os.environ.update(self._saved_environ)
        self._saved_environ = None
        _reconfigure()

    def sandbox_stats(self) -> dict[str, object]:
        response = httpx.get(f"{self.sandbox_url}/sandbox/stats", timeout=5)
        response.raise_for_status()
        data: dict[str, object] = response.json()
        return data

    def log_text(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
