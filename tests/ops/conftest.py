"""Operations fixtures: a web app over seeded data, and the whole Procfile run by honcho.

Both start real processes in their own process groups and stop the whole group when the last test of this folder
is done (package scope). Redis is always the suite's private server (tests/conftest.py), here its databases 3 and
5; nothing touches the machine's shared Redis.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from worker.guard import Decision, Guard, GuardLimits, Outcome, RefusalReason, recovery
from worker.ledger import Batch, BatchState, Payment, PaymentState, make_engine, session_scope, utcnow
from worker.local.embedded_redis import EmbeddedRedis, free_port
from worker.local.stack import wait_http
from worker.metrics import CALLBACKS, SETTLEMENTS, SharedMetrics
from worker.migrations import upgrade
from worker.pause import CredentialsPause
from worker.phones import mask_phone
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Databases of the suite's private Redis no other test folder uses (integration 1, reliability 2 and 4).
OPS_REDIS_DB = 3
PROCFILE_REDIS_DB = 5


def clean_environ() -> dict[str, str]:
    """This process's environment without any stkpush or Flower setting, so a child reads only what we give it."""
    settings_names = {name.upper() for name in Settings.model_fields}
    env = {
        key: value
        for key, value in os.environ.items()
        if key.upper() not in settings_names and not key.upper().startswith("FLOWER_")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(argv: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(process: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    """SIGTERM the process group the child leads, then SIGKILL it if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def ops_redis_url(redis_server: EmbeddedRedis) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{OPS_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


def settings_env(*, redis_url: str, database_url: str, account: str, web_url: str) -> dict[str, str]:
    return {
        "UPESIPAY_BASE_URL": "http://127.0.0.1:9",
        "UPESIPAY_AUTH_TOKEN": "sbx_" + secrets.token_urlsafe(18),
        "UPESIPAY_CHANNEL_ID": "2133",
        "UPESIPAY_ACCOUNT": account,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "CALLBACK_BASE_URL": web_url,
        "CALLBACK_SECRET": secrets.token_urlsafe(24),
        "API_KEYS": "key_" + secrets.token_urlsafe(18),
    }


# ---- a web app over known data ----------------------------------------------------------------------------------

PHONE_STREAK = "254700300001"  # three failures: resting at the streak limit
PHONE_TWO_FAILURES = "254700300002"  # two failures: not blocked
PHONE_PROVIDER_BLOCK = "254700300003"  # blocked by UpesiPay (a 429 naming the number)
PHONE_IN_FLIGHT = "254700300004"
PHONE_OTHER = "254700300005"
STREAK_LIMIT = 3
FAILURE_LIMIT = 40
BATCH_NAME = "invoices-november.csv"


@dataclass
class SeededWeb:
    url: str
    account: str
    redis_url: str
    env: dict[str, str]
    by_state: dict[str, int]
    failures_in_window: int
    in_flight: int
    headroom: int
    blocked_masked: list[str]
    batch_id: str
    batch_done: int
    batch_payments: int
    deferred_due: int
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _payment(state: PaymentState, phone: str, account: str, **fields: Any) -> Payment:
    return Payment(
        account=account,
        external_reference="OPS-" + secrets.token_hex(5).upper(),
        phone=phone,
        amount=100,
        channel_id=2133,
        state=state,
        **fields,
    )


def seed(engine: Any, client: redis.Redis, account: str) -> dict[str, Any]:
    """Ledger rows and guard state whose dashboard and metrics numbers are known in advance."""
    now = utcnow()
    past, future = now - timedelta(minutes=5), now + timedelta(hours=2)
    batch = Batch(
        account=account, source_name=BATCH_NAME, state=BatchState.INGESTED, rows_total=4, rows_recorded=4
    )
    finished = Batch(account=account, source_name="done.csv", state=BatchState.INGESTED, rows_total=1)
    rows = [
        *(_payment(PaymentState.SUCCEEDED, PHONE_OTHER, account=account) for _ in range(3)),
        *(_payment(PaymentState.FAILED, PHONE_STREAK, account=account) for _ in range(3)),
        _payment(PaymentState.FAILED, PHONE_TWO_FAILURES, account=account),
        _payment(PaymentState.CANCELLED, PHONE_TWO_FAILURES, account=account),
        _payment(PaymentState.REJECTED, PHONE_OTHER, account=account),
        _payment(PaymentState.AWAITING_CALLBACK, PHONE_IN_FLIGHT, account=account),
        _payment(PaymentState.DEFERRED, PHONE_PROVIDER_BLOCK, account=account, next_attempt_at=future),
        _payment(PaymentState.DEFERRED, PHONE_STREAK, account=account, next_attempt_at=future),
        _payment(PaymentState.DEFERRED, PHONE_OTHER, account=account, next_attempt_at=past),
        _payment(PaymentState.PENDING, PHONE_OTHER, account=account),
        # The running batch: 2 of 4 settled.
        _payment(PaymentState.SUCCEEDED, PHONE_OTHER, account=account, batch_id=batch.id),
        _payment(PaymentState.FAILED, PHONE_OTHER, account=account, batch_id=batch.id),
        _payment(PaymentState.AWAITING_CALLBACK, PHONE_OTHER, account=account, batch_id=batch.id),
        _payment(
            PaymentState.DEFERRED, PHONE_OTHER, account=account, batch_id=batch.id, next_attempt_at=past
        ),
        # A finished batch is not shown.
        _payment(PaymentState.SUCCEEDED, PHONE_OTHER, account=account, batch_id=finished.id),
        # Another account's payment counts nowhere.
        _payment(PaymentState.SUCCEEDED, PHONE_OTHER, account=account + "-other"),
    ]
    with session_scope(engine) as session:
        session.add_all([batch, finished, *rows])
        session.commit()

    guard = Guard(
        client, account, GuardLimits(phone_streak_limit=STREAK_LIMIT, account_failure_limit=FAILURE_LIMIT)
    )
    recovery.start_empty(guard)
    for phone, failures in ((PHONE_STREAK, 3), (PHONE_TWO_FAILURES, 2)):
        for _ in range(failures):
            token = secrets.token_hex(8)
            assert guard.admit(phone, token).admitted
            guard.resolve(token, Outcome.FAILURE)
    assert guard.admit(PHONE_IN_FLIGHT, secrets.token_hex(8)).admitted
    guard.block_phone(PHONE_PROVIDER_BLOCK, 3600)
    guard.restrict_account(900, "provider: abuse restriction")
    CredentialsPause(client, account).pause(600)

    shared = SharedMetrics(client, account)
    for _ in range(3):
        shared.push("accepted", 0.2)
    shared.push("rejected", 0.7)
    shared.push("ambiguous", 31.0)
    for _ in range(4):
        shared.decision(Decision(True, None, 0.0))
    for _ in range(2):
        shared.decision(Decision(False, RefusalReason.PHONE_BUSY, 30.0))
    shared.inc(CALLBACKS, "0", "applied")
    shared.inc(CALLBACKS, "0", "applied")
    shared.inc(CALLBACKS, "1032", "duplicate")
    shared.inc(SETTLEMENTS, "succeeded")

    by_state = {state.value: 0 for state in PaymentState}
    for row in rows[:-1]:
        by_state[row.state.value] += 1
    return {
        "by_state": by_state,
        "failures_in_window": 5,
        "in_flight": 1,
        "headroom": FAILURE_LIMIT - 5 - 1,
        "blocked_masked": sorted([mask_phone(PHONE_STREAK), mask_phone(PHONE_PROVIDER_BLOCK)]),
        "batch_id": batch.id,
        "batch_done": 2,
        "batch_payments": 4,
        "deferred_due": 2,
    }


@pytest.fixture(scope="package")
def seeded_web(ops_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeededWeb]:
    workdir = tmp_path_factory.mktemp("seeded-web")
    database_url = f"sqlite:///{workdir / 'ledger.db'}"
    account = "ops-" + secrets.token_hex(4)
    engine = make_engine(database_url)
    upgrade(engine)
    client = redis.Redis.from_url(ops_redis_url)
    expected = seed(engine, client, account)
    engine.dispose()
    client.close()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **clean_environ(),
        **settings_env(redis_url=ops_redis_url, database_url=database_url, account=account, web_url=url),
        "PHONE_STREAK_LIMIT": str(STREAK_LIMIT),
        "ACCOUNT_FAILURE_LIMIT": str(FAILURE_LIMIT),
    }
    log_path = workdir / "web.log"
    argv = [sys.executable, "-m", "uvicorn", "worker.web.app:create_app", "--factory", "--port", str(port)]
    process = spawn(argv, env, workdir, log_path)
    try:
        wait_http(f"{url}/healthz", 30, process, log_path)
        yield SeededWeb(
            url=url, account=account, redis_url=ops_redis_url, env=env, log_path=log_path, **expected
        )
    finally:
        stop_group(process)


# ---- the Procfile under honcho ----------------------------------------------------------------------------------

# Outcomes by number in the sandbox for the honcho run (the sandbox's scenario names).
RUN_PHONES = {
    "0700200001": "success",
    "0700200002": "cancelled",
    "0700200003": "insufficient",
    "0700200004": "reject",
    "0700200005": "no_callback",
    "0700200006": "success",
}
RUN_NAMES = (
    "Achieng Otieno",
    "Wanjiru Kamau",
    "Kiprono Langat",
    "Mwikali Mutua",
    "Baraka Odhiambo",
    "Njeri Maina",
)
EXPECTED_STATES = {
    "0700200001": "SUCCEEDED",
    "0700200002": "CANCELLED",
    "0700200003": "FAILED",
    "0700200004": "REJECTED",
    "0700200005": "FAILED",
    "0700200006": "SUCCEEDED",
}
_STARTED = re.compile(r"\| (\S+) started \(pid=(\d+)\)")


@dataclass
class ProcfileRun:
    workdir: Path
    env: dict[str, str]  # the .env file's variables
    child_env: dict[str, str]
    web_url: str
    flower_url: str
    flower_user: str
    flower_password: str
    honcho: subprocess.Popen[bytes]
    output: Path
    sandbox_log: Path
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)  # by reference: id, phone, name, view

    def output_text(self) -> str:
        return self.output.read_text(errors="replace")

    def api(self, path: str) -> httpx.Response:
        return httpx.get(self.web_url + path, headers={"X-API-Key": self.env["API_KEYS"]}, timeout=10)

    def run(self, *argv: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """A command in the run's folder, where `.env` configures it exactly as it configures honcho's processes."""
        return subprocess.run(
            list(argv),
            cwd=self.workdir,
            env=self.child_env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def wait_settled(self, references: list[str], timeout_s: float = 60) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        views: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            for reference in references:
                if views.get(reference, {}).get("settled_at"):
                    continue
                response = self.api(f"/payments/{reference}")
                if response.status_code == 200:
                    views[reference] = response.json()
            if all(views.get(reference, {}).get("settled_at") for reference in references):
                return views
            time.sleep(0.5)
        states = {reference: views.get(reference, {}).get("state") for reference in references}
        raise AssertionError(f"not settled within {timeout_s}s: {states}\n{self.output_text()[-4000:]}")

    def started_pids(self) -> list[int]:
        return [int(pid) for _name, pid in _STARTED.findall(self.output_text())]


def _free_base_port() -> int:
    """A port P such that P and P + 100, + 200, + 300 (honcho's PORT per process type) look free."""
    import socket

    for _ in range(50):
        base = free_port()
        if base + 300 > 65535:
            continue
        ok = True
        for port in (base + 100, base + 200, base + 300):
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return base
    raise RuntimeError("no free port range for honcho")


def _stop_honcho(run: ProcfileRun) -> None:
    # honcho stops its children (each in its own process group) on SIGTERM; whatever it leaves, we kill by group.
    pids = run.started_pids()
    if run.honcho.poll() is None:
        os.kill(run.honcho.pid, signal.SIGTERM)
        try:
            run.honcho.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(run.honcho.pid, signal.SIGKILL)
            run.honcho.wait()
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="package")
def procfile_run(ops_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcfileRun]:
    """`honcho start` with the repository's Procfile, configured by a `.env` file, against the sandbox; a mixed
    set of payments pushed through it and settled before the tests look."""
    workdir = tmp_path_factory.mktemp("procfile-run")
    base = _free_base_port()
    web_url = f"http://127.0.0.1:{base}"
    flower_port = free_port()
    sandbox_port = free_port()
    redis_url = ops_redis_url.rsplit("/", 1)[0] + f"/{PROCFILE_REDIS_DB}"
    flower_user, flower_password = "ops", "fl_" + secrets.token_urlsafe(12)
    env = settings_env(
        redis_url=redis_url,
        database_url=f"sqlite:///{workdir / 'stkpush.db'}",
        account="run-" + secrets.token_hex(4),
        web_url=web_url,
    )
    env.update(
        UPESIPAY_BASE_URL=f"http://127.0.0.1:{sandbox_port}",
        UPESIPAY_READ_TIMEOUT_S="3",
        DISPATCH_INTERVAL_S="0.5",
        SETTLE_AFTER_S="3",
        SETTLE_UNKNOWN_AFTER_S="2",
        WORKER_CONCURRENCY="2",
        BEAT_SCHEDULE_FILE=str(workdir / "beat-schedule"),
        FLOWER_PORT=str(flower_port),
        FLOWER_BASIC_AUTH=f"{flower_user}:{flower_password}",
    )
    (workdir / ".env").write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()

    child_env = clean_environ()
    sandbox_log = workdir / "sandbox.log"
    scenario = {"seed": 3, "callback_delay_s": 0.3, "default": "success", "phones": RUN_PHONES}
    sandbox = spawn(
        [
            sys.executable,
            "-m",
            "worker.sandbox.cli",
            "--port",
            str(sandbox_port),
            "--token",
            env["UPESIPAY_AUTH_TOKEN"],
            "--scenario",
            json.dumps(scenario),
        ],
        child_env,
        workdir,
        sandbox_log,
    )
    output = workdir / "honcho.log"
    honcho: subprocess.Popen[bytes] | None = None
    run: ProcfileRun | None = None
    try:
        wait_http(f"http://127.0.0.1:{sandbox_port}/sandbox/stats", 20, sandbox, sandbox_log)
        migrated = subprocess.run(
            [str(BIN / "stkpush"), "db", "upgrade"],
            cwd=workdir,
            env=child_env,
            capture_output=True,
            text=True,
        )
        assert migrated.returncode == 0, migrated.stderr
        honcho = spawn(
            [
                str(BIN / "honcho"),
                "start",
                "-f",
                str(REPO / "Procfile"),
                "-e",
                ".env",
                "-d",
                str(workdir),
                "-p",
                str(base),
            ],
            child_env,
            workdir,
            output,
        )
        run = ProcfileRun(
            workdir=workdir,
            env=env,
            child_env=child_env,
            web_url=web_url,
            flower_url=f"http://127.0.0.1:{flower_port}",
            flower_user=flower_user,
            flower_password=flower_password,
            honcho=honcho,
            output=output,
            sandbox_log=sandbox_log,
        )
        wait_http(f"{web_url}/healthz", 60, honcho, output)
        wait_http(f"{run.flower_url}/healthcheck", 60, honcho, output)
        _wait_for(lambda: " ready." in run.output_text(), 60, "the worker to be ready", run)
        _push_payments(run)
        yield run
    finally:
        if run is not None:
            _stop_honcho(run)
        elif honcho is not None:
            stop_group(honcho)
        stop_group(sandbox)


def _wait_for(condition: Any, timeout_s: float, what: str, run: ProcfileRun) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if run.honcho.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{run.output_text()[-4000:]}")


def _push_payments(run: ProcfileRun) -> None:
    """One payment through the command line, the rest through producers.enqueue_payment, then wait for all."""
    first_phone, *others = RUN_PHONES
    first = run.run(
        str(BIN / "stkpush"),
        "enqueue",
        "--amount",
        "10",
        "--phone",
        first_phone,
        "--reference",
        "RUN-CLI-1",
        "--name",
        RUN_NAMES[0],
    )
    assert first.returncode == 0, first.stderr
    handle = json.loads(first.stdout)
    run.payments["RUN-CLI-1"] = {"id": handle["id"], "phone": first_phone, "name": RUN_NAMES[0]}
    requests: list[dict[str, Any]] = [
        {
            "amount": 20 + index,
            "phone_number": phone,
            "external_reference": f"RUN-{index}",
            "customer_name": name,
        }
        for index, (phone, name) in enumerate(zip(others, RUN_NAMES[1:], strict=True), start=2)
    ]
    script = (
        "import json, sys\n"
        "from producers import enqueue_payment\n"
        "print(json.dumps([enqueue_payment(**r).id for r in json.loads(sys.argv[1])]))\n"
    )
    result = run.run(sys.executable, "-c", script, json.dumps(requests))
    assert result.returncode == 0, result.stderr
    for request, payment_id in zip(requests, json.loads(result.stdout.strip().splitlines()[-1]), strict=True):
        run.payments[request["external_reference"]] = {
            "id": payment_id,
            "phone": request["phone_number"],
            "name": request["customer_name"],
        }
    views = run.wait_settled(list(run.payments))
    for reference, view in views.items():
        run.payments[reference]["view"] = view
