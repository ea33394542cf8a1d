"""A seed replays a scenario identically: references, outcomes, duplicates and faults."""

from __future__ import annotations

from typing import Any

from tests.sandbox.conftest import RunningSandbox, StartSandbox

MIXED = {
    "default": {
        "outcomes": {"success": 0.5, "cancelled": 0.2, "timeout": 0.2, "wrong_pin": 0.1},
        "duplicate": 0.3,
        "drop": 0.2,
    },
    "faults": {"error_5xx_rate": 0.2, "rate_limit_rate": 0.1},
    "callback_delay_s": 10,
}


def run(sandbox: RunningSandbox) -> list[tuple[Any, ...]]:
    """30 pushes, then every outcome; what a client could observe, minus timestamps."""
    answers = []
    for index in range(30):
        response = sandbox.push(f"07220000{index:02d}", external_reference=f"INV-{index}")
        reference = response.json()["reference"] if response.status_code == 201 else None
        answers.append((index, response.status_code, reference))
    sandbox.advance(10)
    items = sandbox.client.get("/api/v2/transactions", params={"per": 100}).json()["data"]
    outcomes = sorted(
        (item["external_reference"], item["status"], item["provider_reference"]) for item in items
    )
    stats = sandbox.stats()
    return [*answers, *outcomes, (stats["outcomes"], stats["faults"])]


def test_the_same_seed_replays_identically_after_a_reset(start_sandbox: StartSandbox) -> None:
    sandbox = start_sandbox(MIXED, seed=42)
    first = run(sandbox)
    sandbox.reset()
    assert run(sandbox) == first
    # And the run was not trivial: faults and several outcomes happened
    codes = {answer[1] for answer in first[:30]}
    assert {201, 429} <= codes
    assert codes & {500, 502, 503}


def test_a_fresh_sandbox_with_the_same_seed_replays_identically(start_sandbox: StartSandbox) -> None:
    first = run(start_sandbox(MIXED, seed=42))
    second = run(start_sandbox(MIXED, seed=42, late_delay_s=30.0))  # a dedicated server of its own
    assert second == first


def test_another_seed_plays_differently(start_sandbox: StartSandbox) -> None:
    first = run(start_sandbox(MIXED, seed=42))
    assert run(start_sandbox(MIXED, seed=43)) != first
