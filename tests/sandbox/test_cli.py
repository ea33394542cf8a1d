"""`python -m worker.sandbox.cli` (registered as `stkpush sandbox`): its help, and a real run as a subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from click.testing import CliRunner

from worker.local.embedded_redis import free_port
from worker.sandbox.cli import sandbox_command
from worker.sandbox.scenario import OUTCOME_NAMES

ROOT = Path(__file__).resolve().parents[2]


def test_help_documents_the_scenario_format_errors_and_control_endpoints() -> None:
    result = CliRunner().invoke(sandbox_command, ["--help"], terminal_width=120)
    assert result.exit_code == 0
    text = result.output
    for needle in (
        *OUTCOME_NAMES,
        *("seed", "callback_delay_s", "late_delay_s", "default", "phones", "faults", "sequence"),
        *("duplicate", "late", "drop", "outcomes"),
        *(
            "latency_s",
            "error_5xx_rate",
            "hang_rate",
            "hang_s",
            "reset_rate",
            "rate_limit_rate",
            "retry_after_s",
        ),
        "endpoints",
        "STK push blocked for this phone number by abuse protection until <ISO time>",
        "Account restricted from STK push by abuse protection until <ISO time>",
        "Retry-After",
        *("/sandbox/stats", "/sandbox/scenario", "/sandbox/clock/advance", "/sandbox/reset"),
        "UPESIPAY_BASE_URL",
        "UPESIPAY_AUTH_TOKEN",
    ):
        assert needle in text, needle


def test_a_bad_scenario_stops_the_command_before_it_serves() -> None:
    result = CliRunner().invoke(sandbox_command, ["--token", "t", "--scenario", '{"default": "bankrupt"}'])
    assert result.exit_code == 2
    assert "bankrupt" in result.output


def test_the_command_serves_the_sandbox_and_logs_no_phone_number_or_token(tmp_path: Path) -> None:
    # Given the sandbox started as a subprocess, as the demo and the benchmark start it
    port, token, phone = free_port(), "sbx_cli_secret_token", "0712345678"
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"phones": {phone: "cancelled"}, "callback_delay_s": 0}))
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.sandbox.cli", "--port", str(port), "--token", token,
         "--scenario", str(scenario), "--log-level", "info"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                if httpx.get(url + "/sandbox/stats", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the sandbox did not answer within 20 s"
                time.sleep(0.1)
        # When a number is pushed until the abuse rule triggers (which is logged)
        with httpx.Client(base_url=url, headers={"Authorization": f"Basic {token}"}) as client:
            body = {"amount": 5, "phone_number": phone, "channel_id": 2133, "provider": "m-pesa"}
            codes = [client.post("/api/v2/payments", json=body).status_code for _ in range(12)]
        assert codes == [201] * 11 + [429]
        assert httpx.get(url + "/sandbox/stats").json()["rule_triggers"]["phone_block"] == 1
    finally:
        # Then it stops on SIGTERM
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert process.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in output
    # And its log masks the number and never shows the token
    assert "2547****678" in output
    assert "712345678" not in output
    assert token not in output
