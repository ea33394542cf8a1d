"""`honcho start` runs the Procfile's four processes against the sandbox, and payments go through them.

The processes are the production commands (Procfile), configured only by a `.env` file in their folder, with a
private Redis and a SQLite ledger; the fixture pushes one payment per outcome and waits until all are settled.
"""

from __future__ import annotations

import httpx

from tests.ops.conftest import EXPECTED_STATES, ProcfileRun


def test_every_procfile_process_is_running(procfile_run: ProcfileRun) -> None:
    output = procfile_run.output_text()
    assert len(procfile_run.started_pids()) == 4, output[-3000:]
    for name in ("web", "worker", "beat", "flower"):
        assert f"{name}.1 started (pid=" in output, output[-3000:]
    assert procfile_run.honcho.poll() is None, output[-3000:]


def test_a_payment_goes_through_the_procfile_stack(procfile_run: ProcfileRun) -> None:
    payment = procfile_run.payments["RUN-CLI-1"]
    view = payment["view"]
    assert view["state"] == "SUCCEEDED"
    assert view["receipt"] and view["result_code"] == 0
    status = procfile_run.run("stkpush", "status", "RUN-CLI-1", "--json")
    assert status.returncode == 0, status.stderr
    assert '"SUCCEEDED"' in status.stdout


def test_each_outcome_ends_in_its_state(procfile_run: ProcfileRun) -> None:
    states = {payment["phone"]: payment["view"]["state"] for payment in procfile_run.payments.values()}
    assert states == EXPECTED_STATES


def test_flower_requires_basic_auth(procfile_run: ProcfileRun) -> None:
    assert httpx.get(procfile_run.flower_url + "/", timeout=10).status_code == 401
    assert httpx.get(procfile_run.flower_url + "/api/workers", timeout=10).status_code == 401
    wrong = httpx.get(procfile_run.flower_url + "/", auth=(procfile_run.flower_user, "wrong"), timeout=10)
    assert wrong.status_code == 401
    right = httpx.get(
        procfile_run.flower_url + "/",
        auth=(procfile_run.flower_user, procfile_run.flower_password),
        timeout=10,
    )
    assert right.status_code == 200


def test_flowers_api_cannot_start_tasks_or_control_workers(procfile_run: ProcfileRun) -> None:
    auth = (procfile_run.flower_user, procfile_run.flower_password)
    payment_id = procfile_run.payments["RUN-CLI-1"]["id"]
    for path in (
        "/api/task/async-apply/stkpush.stk_push",
        "/api/task/send-task/stkpush.stk_push",
        "/api/task/apply/stkpush.stk_push",
        "/api/task/revoke/" + payment_id,
        "/api/worker/shutdown/celery@localhost",
        "/api/worker/pool/grow/celery@localhost",
    ):
        response = httpx.post(
            procfile_run.flower_url + path, json={"args": [payment_id]}, auth=auth, timeout=10
        )
        assert response.status_code == 403, (path, response.status_code, response.text[:200])
    # Reading still works.
    assert httpx.get(procfile_run.flower_url + "/api/workers", auth=auth, timeout=15).status_code == 200


def test_flowers_own_metrics_stay_available(procfile_run: ProcfileRun) -> None:
    response = httpx.get(procfile_run.flower_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert "flower_events_total" in response.text
