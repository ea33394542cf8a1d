"""What the processes themselves do with hostile input: the web server's access log, a malformed REDIS_URL at
start-up, an unmigrated database under `enqueue_payment`, and the dashboard's Content-Security-Policy."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from producers.enqueue import enqueue_payment
from tests.hostile.conftest import PHONE, PHONE_ANYWHERE, ledger_state, reference
from worker import runtime
from worker.local.embedded_redis import free_port
from worker.local.stack import Stack, wait_http
from worker.migrations import NOT_MIGRATED, DatabaseNotMigrated

BAD_REDIS_URL = "redis://:hunter2pw@127.0.0.1:notaport/0"


def test_the_access_log_masks_phone_numbers_hidden_by_url_encoding(
    hostile_stack: Stack, tmp_path: Path
) -> None:
    # `stkpush web` as production runs it (access log on), beside the stack's own web process.
    port = free_port()
    log_path = tmp_path / "web-info.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "web", "--port", str(port)],
            env=hostile_stack.child_env(),
            cwd=tmp_path,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/healthz", 30, process, log_path)
            headers = {"X-API-Key": hostile_stack.env["API_KEYS"]}
            paths = [
                "/payments/%2B254733445566",
                "/payments/0733%20445%20566",
                "/payments/%252B254733445566",
                "/payments/x?phone=0733+445+566",
                "/payments/0733-445-566",
            ]
            answers = [httpx.get(base + path, headers=headers, timeout=5) for path in paths]
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
    assert [answer.status_code for answer in answers] == [404] * len(paths)
    log = log_path.read_text(errors="replace")
    access_lines = [line for line in log.splitlines() if "GET /payments/" in line]
    assert len(access_lines) == len(paths), log[
        -3000:
    ]  # the access log is on, so the check below means something
    assert not PHONE_ANYWHERE.search(log), [line for line in access_lines if PHONE_ANYWHERE.search(line)]
    assert all("****566" in line for line in access_lines), access_lines


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "worker.cli", "web", "--port", "1"],
        ["-m", "celery", "-A", "worker", "worker", "--pool", "solo"],
    ],
    ids=["web", "worker"],
)
def test_a_malformed_redis_url_stops_start_up_naming_the_variable_not_the_password(
    hostile_stack: Stack, tmp_path: Path, argv: list[str]
) -> None:
    done = subprocess.run(
        [sys.executable, *argv],
        env=hostile_stack.child_env({"REDIS_URL": BAD_REDIS_URL}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "REDIS_URL" in output and "port" in output, output[-2000:]
    assert "hunter2pw" not in output and "Traceback" not in output, output[-2000:]


def test_enqueue_payment_on_an_unmigrated_database_says_run_db_upgrade(
    hostile_stack: Stack, tmp_path: Path
) -> None:
    queued_before = ledger_state(hostile_stack).single_queue
    database = tmp_path / "never-migrated.db"
    saved = os.environ["DATABASE_URL"]
    os.environ["DATABASE_URL"] = f"sqlite:///{database}"
    runtime.reset()
    try:
        with pytest.raises(DatabaseNotMigrated) as caught:
            enqueue_payment(amount=10, phone_number=PHONE, external_reference=reference())
    finally:
        os.environ["DATABASE_URL"] = saved
        runtime.reset()
    assert NOT_MIGRATED in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not PHONE_ANYWHERE.search(str(caught.value))
    assert ledger_state(hostile_stack).single_queue == queued_before


def test_the_dashboard_allows_only_its_own_inline_script_and_styles(hostile_stack: Stack) -> None:
    pages = [httpx.get(f"{hostile_stack.web_url}/dashboard", timeout=10) for _ in range(2)]
    nonces = []
    for page in pages:
        assert page.status_code == 200
        policy = page.headers["Content-Security-Policy"]
        found = re.fullmatch(
            r"default-src 'none'; script-src 'nonce-([A-Za-z0-9_-]{20,})'; style-src 'nonce-\1'; "
            r"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            policy,
        )
        assert found, policy
        nonce = found.group(1)
        # Every script and style element carries this response's nonce; nothing is allowed by 'unsafe-inline'.
        assert re.findall(r"<script[^>]*>", page.text) == [f'<script nonce="{nonce}">']
        assert re.findall(r"<style[^>]*>", page.text) == [f'<style nonce="{nonce}">']
        # Inline attributes (style=, onclick=) would need 'unsafe-inline': the page has none.
        assert not re.search(r"<[^>]+\s(?:style|on[a-z]+)=", page.text)
        nonces.append(nonce)
    assert nonces[0] != nonces[1]
