"""Scenarios are checked whole when loaded, and can be replaced while the sandbox runs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.conftest import StartSandbox
from worker.sandbox.app import SandboxClock, SandboxConfig, Scenario, ScenarioError, load_scenario


@pytest.mark.parametrize(
    ("scenario", "named"),
    [
        ({"defaults": "success"}, "defaults"),
        ({"default": "bankrupt"}, "bankrupt"),
        ({"default": {"outcome": "success", "outcomes": {"success": 1}}}, "exactly one"),
        ({"default": {"sequence": ["success"]}}, "sequence"),
        ({"phones": {"0712345678": {"sequence": []}}}, "sequence"),
        ({"phones": {"0712345678": {"sequence": [{"sequence": ["success"]}]}}}, "sequence"),
        ({"phones": {"12345": "success"}}, "phones"),
        ({"phones": {"0712345678": "success", "254712345678": "cancelled"}}, "same number"),
        ({"default": {"outcomes": {"success": -1}}}, "non-negative"),
        ({"default": {"outcomes": {"success": 0}}}, "zero"),
        ({"default": {"outcome": "success", "duplicate": 1.5}}, "duplicate"),
        ({"default": {"outcome": "success", "drop": "yes"}}, "drop"),
        ({"phones": {"0712345678": {"sequence": ["success"], "drop": True}}}, "drop"),
        ({"default": {"outcome": "success", "colour": "red"}}, "colour"),
        ({"faults": {"error_5xx_rate": 0.6, "reset_rate": 0.6}}, "<= 1"),
        ({"faults": {"hang_rate": -0.1}}, "hang_rate"),
        ({"faults": {"endpoints": ["refunds"]}}, "refunds"),
        ({"faults": {"retry_after_s": 1.5}}, "retry_after_s"),
        ({"faults": {"resets": 1}}, "resets"),
        ({"seed": "7"}, "seed"),
        ({"callback_delay_s": -1}, "callback_delay_s"),
        ({"channels": []}, "channels"),
        ({"channels": [2133, "2134"]}, "channels"),
        ([], "object"),
    ],
)
def test_an_invalid_scenario_is_refused_naming_the_problem(scenario: Any, named: str) -> None:
    with pytest.raises(ScenarioError, match=named.replace("*", r"\*")):
        Scenario.from_json(scenario)


def test_a_phone_key_in_any_form_selects_that_number() -> None:
    scenario = Scenario.from_json({"phones": {"+254 712 345 678": "cancelled"}})
    assert scenario.rule_for("254712345678").plan(random.Random(0)).outcome == "cancelled"
    assert scenario.rule_for("254712345679").plan(random.Random(0)).outcome == "success"


def test_a_scenario_loads_from_a_file_or_inline(tmp_path: Path) -> None:
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps({"default": "timeout", "seed": 5}))
    assert load_scenario(str(path)).seed == 5
    assert load_scenario('{"default": "timeout", "seed": 6}').seed == 6
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(str(tmp_path / "missing.json"))
    with pytest.raises(ScenarioError, match="not valid JSON"):
        load_scenario("{nope")


def test_the_config_refuses_bad_tokens_without_repeating_them() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        SandboxConfig(tokens=())
    with pytest.raises(ValueError, match="not one string"):
        SandboxConfig(tokens="secret-token")
    with pytest.raises(ValueError) as error:
        SandboxConfig(tokens=("has a space",))
    assert "has a space" not in str(error.value)
    with pytest.raises(ValueError, match="distinct"):
        SandboxConfig(tokens=("a", "a"))


def test_the_clock_only_moves_forward() -> None:
    clock = SandboxClock()
    before = clock.now()
    clock.advance(3600)
    assert clock.now() - before >= 3600
    for bad in (-1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError):
            clock.advance(bad)


def test_the_scenario_can_be_replaced_at_run_time(start_sandbox: StartSandbox) -> None:
    # Given a sandbox where everybody pays
    sandbox = start_sandbox()
    phone = "0712345678"
    first = sandbox.push(phone).json()["reference"]
    # When the scenario is replaced with one where that number cancels
    replacement = {"phones": {phone: "cancelled"}, "description": "cancel"}
    answer = sandbox.put_scenario(replacement)
    assert answer.status_code == 200
    assert sandbox.client.get("/sandbox/scenario").json() == replacement
    # Then the next push to it fails, and the earlier one is unchanged
    second = sandbox.push(phone).json()["reference"]
    assert sandbox.status(first).json()["status"] == "SUCCESS"
    assert sandbox.status(second).json()["status"] == "FAILED"
    # And an invalid replacement is refused, keeping the scenario in force
    assert sandbox.put_scenario({"default": "bankrupt"}).status_code == 400
    assert sandbox.client.get("/sandbox/scenario").json() == replacement


def test_reset_forgets_pushes_blocks_and_counters(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox({"default": "cancelled"})
    for _ in range(11):
        sandbox.push("0712345678")
    assert sandbox.stats()["blocked_numbers"]
    sandbox.reset()
    stats = sandbox.stats()
    assert stats["pushes_total"] == 0
    assert stats["blocked_numbers"] == []
    assert stats["rule_triggers_total"] == 0
    assert sandbox.client.get("/api/v2/transactions").json()["total"] == 0
    assert sandbox.push("0712345678").status_code == 201


def test_the_clock_endpoint_reports_the_advanced_time(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox()
    before = sandbox.client.get("/sandbox/clock").json()
    answer = sandbox.client.post("/sandbox/clock/advance", json={"seconds": 7200}).json()
    assert answer["offset_s"] - before["offset_s"] == 7200
    assert answer["now_epoch_s"] - before["now_epoch_s"] >= 7200
