"""The integration stack: real Redis, the sandbox over HTTP, the web app over HTTP, real `celery worker` and
`celery beat` processes, a SQLite ledger in a temporary folder. One per session; every process stopped after."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests import support
from tests.support import running_stack
from worker.ledger import Payment
from worker.local.embedded_redis import EmbeddedRedis
from worker.local.stack import Stack

# Phones with a fixed outcome in the integration scenario (the sandbox's names).
PHONE_SUCCESS = "0700100001"
PHONE_CANCELLED = "0700100002"
PHONE_INSUFFICIENT = "0700100003"
PHONE_REJECTED = "0700100004"
PHONE_NO_CALLBACK = "0700100005"
PHONE_WRONG_PIN = "0700100006"

SCENARIO = {
    "seed": 11,
    "callback_delay_s": 0.2,
    "default": "success",
    "phones": {
        PHONE_SUCCESS: "success",
        PHONE_CANCELLED: "cancelled",
        PHONE_INSUFFICIENT: "insufficient",
        PHONE_REJECTED: "reject",
        PHONE_NO_CALLBACK: "no_callback",
        PHONE_WRONG_PIN: "wrong_pin",
    },
}


@pytest.fixture(scope="session")
def stack(redis_server: EmbeddedRedis) -> Iterator[Stack]:
    # Database 1 of the suite's private Redis, under a private key prefix: other tests flush database 0.
    with running_stack(redis_server, 1, scenario=SCENARIO) as running:
        yield running


@pytest.fixture
def wait_for_state() -> Callable[..., Payment]:
    return support.wait_for_state
