"""Bad input to the sandbox itself gets a 4xx, never a 500 or a crash."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.sandbox.conftest import TOKEN, RunningSandbox, push_body

HEADERS = {"Authorization": f"Basic {TOKEN}", "Content-Type": "application/json"}


def post_raw(
    sandbox: RunningSandbox, content: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return sandbox.client.post("/api/v2/payments", content=content, headers=headers or HEADERS)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"{'amount': 100}",
        b'{"amount": 100,}',
        b"\xff\xfe\x00{}",
        b"NaN",
        b"[" * 30_000 + b"]" * 30_000,  # deeper than the JSON parser recurses
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
    ids=[
        "empty",
        "truncated",
        "single-quotes",
        "trailing-comma",
        "bad-utf8",
        "nan",
        "deep-list",
        "deep-object",
    ],
)
def test_malformed_json_is_400(sandbox: RunningSandbox, content: bytes) -> None:
    response = post_raw(sandbox, content)
    assert response.status_code == 400
    assert response.json()["error_message"].startswith("Invalid request")


@pytest.mark.parametrize("value", [[], [push_body()], "a string", 42, None, True])
def test_json_that_is_not_an_object_is_400(sandbox: RunningSandbox, value: Any) -> None:
    response = post_raw(sandbox, json.dumps(value).encode())
    assert response.status_code == 400
    assert "object" in response.json()["error_message"] or "required" in response.json()["error_message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "json"])
def test_a_body_that_is_not_declared_json_is_415(sandbox: RunningSandbox, content_type: str | None) -> None:
    headers = {"Authorization": f"Basic {TOKEN}"} | ({"Content-Type": content_type} if content_type else {})
    response = post_raw(sandbox, json.dumps(push_body()).encode(), headers)
    assert response.status_code == 415
    assert "Content-Type" in response.json()["error_message"]


def test_json_with_a_charset_parameter_is_accepted(sandbox: RunningSandbox) -> None:
    headers = HEADERS | {"Content-Type": "application/json; charset=utf-8"}
    assert post_raw(sandbox, json.dumps(push_body()).encode(), headers).status_code == 201


@pytest.mark.parametrize("size", [64 * 1024 + 1, 1024 * 1024])
def test_a_body_over_64_kib_is_413(sandbox: RunningSandbox, size: int) -> None:
    padding = "x" * (size - len(json.dumps(push_body(note=""))))
    content = json.dumps(push_body(note=padding)).encode()
    assert len(content) == size
    response = post_raw(sandbox, content)
    assert response.status_code == 413
    assert sandbox.stats()["pushes_total"] == 0


def test_a_chunked_body_over_64_kib_is_413(sandbox: RunningSandbox) -> None:
    def chunks() -> Any:
        yield b'{"note": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = sandbox.client.post("/api/v2/payments", content=chunks(), headers=HEADERS)
    assert response.status_code == 413


def test_a_body_just_under_64_kib_is_read(sandbox: RunningSandbox) -> None:
    padding = "x" * (64 * 1024 - len(json.dumps(push_body(note=""))))
    content = json.dumps(push_body(note=padding)).encode()
    assert post_raw(sandbox, content).status_code == 201


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/sandbox/clock/advance", b"{}"),
        ("POST", "/sandbox/clock/advance", b'{"seconds": -1}'),
        ("POST", "/sandbox/clock/advance", b'{"seconds": "ten"}'),
        ("POST", "/sandbox/clock/advance", b'{"seconds": NaN}'),
        ("POST", "/sandbox/clock/advance", b'{"seconds": Infinity}'),
        ("POST", "/sandbox/clock/advance", b'{"seconds": true}'),
        ("POST", "/sandbox/clock/advance", b'{"seconds": 1, "extra": 2}'),
        ("POST", "/sandbox/clock/advance", b"[1]"),
        ("POST", "/sandbox/clock/advance", b"not json"),
        ("PUT", "/sandbox/scenario", b"[]"),
        ("PUT", "/sandbox/scenario", b'{"default": "bankrupt"}'),
        ("PUT", "/sandbox/scenario", b'{"faults": {"hang_rate": 2}}'),
        ("PUT", "/sandbox/scenario", b"{"),
    ],
)
def test_bad_control_requests_are_400(sandbox: RunningSandbox, method: str, path: str, body: bytes) -> None:
    response = sandbox.client.request(
        method, path, content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error_message"]
    # Control mistakes are not API refusals
    assert sandbox.stats()["requests_refused"]["invalid"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v2/payments", 405),
        ("DELETE", "/sandbox/stats", 405),
        ("GET", "/api/v3/payments", 404),
        ("GET", "/", 404),
    ],
)
def test_unknown_paths_and_methods_are_4xx_with_an_error_message(
    sandbox: RunningSandbox, method: str, path: str, status: int
) -> None:
    response = sandbox.client.request(method, path)
    assert response.status_code == status
    assert response.json()["error_message"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "amount",
        "phone_number",
        "channel_id",
        "provider",
        "external_reference",
        "customer_name",
        "callback_url",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(FIELDS, JSON_VALUES, max_size=4), raw=st.binary(max_size=200))
def test_arbitrary_bodies_never_get_a_5xx(
    sandbox: RunningSandbox, changes: dict[str, Any], raw: bytes
) -> None:
    # Given any values in the documented fields, and any bytes at all
    structured = post_raw(sandbox, json.dumps(push_body() | changes).encode())
    unstructured = post_raw(sandbox, raw)
    # Then the answers are a 201 or a 4xx with an error_message, never a 5xx
    assert structured.status_code in {201, 400}
    assert unstructured.status_code in {201, 400}
    for response in (structured, unstructured):
        if response.status_code == 400:
            assert response.json()["error_message"].startswith("Invalid request")
