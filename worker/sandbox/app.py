"""The UpesiPay sandbox: a local provider speaking the documented API, abuse rules and faults included.

UpesiPay has no public sandbox, so the demo, the integration tests and the benchmarks run against this one
(docs/ARCHITECTURE.md, "The sandbox"; docs/sandbox.md for all it chooses where UpesiPay's documentation is silent).
`create_app(SandboxConfig(...))` builds the FastAPI app; `python -m worker.sandbox.cli` serves it.

API (as documented): POST /api/v2/payments, GET /api/v2/transaction-status, GET /api/v2/transactions.
Control (sandbox only): GET /sandbox/stats, GET|PUT /sandbox/scenario, GET /sandbox/clock,
POST /sandbox/clock/advance, POST /sandbox/reset, POST /sandbox/other-channel.

One class (`_Api`) a little over 400 lines holds every route on purpose: the handlers share the same steps
(latency, token, due outcomes, body reading, faults), and what they act on lives in provider.py and rules.py.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.phones import PhoneNumberError, normalise_phone
from worker.sandbox.config import SandboxConfig
from worker.sandbox.provider import PushInput, SandboxProvider, iso
from worker.sandbox.responses import (
    AnswerNow,
    ConnectionReset,
    DelayedAnswer,
    SandboxApp,
    answer_now,
    json_response,
)
from worker.sandbox.rules import AbuseLimits, AccountTier, SandboxClock
from worker.sandbox.scenario import (
    OUTCOMES,
    REJECT,
    FaultKind,
    Faults,
    Scenario,
    ScenarioError,
    load_scenario,
)

__all__ = [
    "OUTCOMES",
    "AbuseLimits",
    "AccountTier",
    "Faults",
    "SandboxClock",
    "SandboxConfig",
    "Scenario",
    "ScenarioError",
    "create_app",
    "load_scenario",
]

CONTROL_MAX_BODY_BYTES = 1024 * 1024  # a scenario may list thousands of numbers
# A body over the limit is still read (and dropped) up to this size, so the client sees its 413 instead of a
# reset while it is still writing; beyond it the connection is closed after the 413.
DRAIN_MAX_BYTES = 16 * 1024 * 1024
MAX_AMOUNT = 250_000  # M-Pesa's per-transaction limit in shillings
MAX_PER_PAGE = 100
MAX_OTHER_CHANNEL = 1000  # failed pushes one control call may record
TEXT_LIMITS = {"external_reference": 64, "customer_name": 100, "callback_url": 2048, "credential_id": 64}


@functools.lru_cache(maxsize=65_536)
def _canonical_phone(raw: str) -> str | None:
    # libphonenumber is the slowest step of a push; callers reuse numbers.
    try:
        return normalise_phone(raw)
    except PhoneNumberError:
        return None


class _Api:
    """The request handlers; one per app, sharing the provider state."""

    def __init__(self, config: SandboxConfig, provider: SandboxProvider) -> None:
        self.config = config
        self.provider = provider
        self.accounts = [(label, token.encode()) for label, token in config.accounts.items()]

    # ---- the documented API -------------------------------------------------------------------------------
    async def create_payment(self, request: Request) -> Response:
        provider = self.provider
        account = await self._enter(request, "payments")
        push = self._push_input(await self._read_json(request, self.config.max_body_bytes, api=True))
        fault = self._roll("payments")
        answer_now, fail_after_recording = self._fault_before(fault)
        if answer_now is not None:
            return answer_now
        refusal = provider.refusal(account, push.phone)
        if refusal is not None:
            return self._abuse_refusal(*refusal)
        channels = provider.scenario.channels
        if channels is not None and push.channel_id not in channels:
            # Not the account's channel: UpesiPay refuses the request itself (its one documented error body).
            provider.refused["rejected"] += 1
            return json_response(400, {"error_message": "Invalid request"})
        plan = provider.plan_for(push.phone)
        if plan.outcome == REJECT:
            provider.refused["rejected"] += 1
            return json_response(400, {"error_message": "Invalid request"})  # the documented error body
        transaction = provider.record(account, push, plan)
        created = json_response(
            201,
            {
                "success": True,
                "status": "QUEUED",
                "reference": transaction.reference,
                "CheckoutRequestID": transaction.checkout_request_id,
            },
        )
        return self._fault_after(fault, fail_after_recording, created)

    async def transaction_status(self, request: Request) -> Response:
        account = await self._enter(request, "transaction-status")
        fault = self._roll("transaction-status")
        answer_now, fail_after = self._fault_before(fault)
        if answer_now is not None:
            return answer_now
        reference = request.query_params.get("reference")
        if not reference:
            raise self._invalid("reference is required")
        transaction = self.provider.lookup(account, reference)
        if transaction is None:
            answer = json_response(404, {"error_message": "Transaction not found"})
        else:
            answer = json_response(200, transaction.item())
        return self._fault_after(fault, fail_after, answer)

    async def transactions(self, request: Request) -> Response:
        account = await self._enter(request, "transactions")
        fault = self._roll("transactions")
        answer_now, fail_after = self._fault_before(fault)
        if answer_now is not None:
            return answer_now
        query = request.query_params
        page = self._int_param(query.get("page"), "page", 1, 1, 10**9)
        per = self._int_param(query.get("per"), "per", 20, 1, MAX_PER_PAGE)
        external_reference = query.get("external_reference") or None
        answer = json_response(200, self.provider.page(account, page, per, external_reference))
        return self._fault_after(fault, fail_after, answer)

    # ---- control ------------------------------------------------------------------------------------------
    async def stats(self, request: Request) -> Response:
        self.provider.settle_due()
        return json_response(200, self.provider.stats())

    async def get_scenario(self, request: Request) -> Response:
        return json_response(200, dict(self.provider.scenario.source))

    async def put_scenario(self, request: Request) -> Response:
        data = await self._read_json(request, CONTROL_MAX_BODY_BYTES, api=False)
        try:
            scenario = Scenario.from_json(data)
        except ScenarioError as error:
            raise answer_now(400, f"Invalid scenario: {error}") from None
        self.provider.settle_due()
        self.provider.replace_scenario(scenario)
        return json_response(200, {"scenario": dict(scenario.source)})

    async def get_clock(self, request: Request) -> Response:
        return self._clock_answer()

    async def advance_clock(self, request: Request) -> Response:
        data = await self._read_json(request, CONTROL_MAX_BODY_BYTES, api=False)
        if not isinstance(data, dict) or set(data) != {"seconds"}:
            raise answer_now(400, 'Invalid request: the body must be {"seconds": N}')
        try:
            self.provider.clock.advance(data["seconds"])
        except ValueError as error:
            raise answer_now(400, f"Invalid request: {error}") from None
        self.provider.settle_due()
        self.provider.wake()
        return self._clock_answer()

    async def other_channel(self, request: Request) -> Response:
        """Failed pushes the merchant made without stkpush: they fill the account's window (see provider)."""
        data = await self._read_json(request, CONTROL_MAX_BODY_BYTES, api=False)
        if not isinstance(data, dict) or not set(data) <= {"account", "count", "phone", "outcome"}:
            raise answer_now(400, "Invalid request: the body takes account, count, phone and outcome")
        account = data.get("account", "account-1")
        if account not in self.config.accounts:
            raise answer_now(400, "Invalid request: account must be a label such as account-1")
        count = data.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_OTHER_CHANNEL:
            raise answer_now(400, f"Invalid request: count must be an integer from 1 to {MAX_OTHER_CHANNEL}")
        outcome = data.get("outcome", "cancelled")
        if outcome not in OUTCOMES or OUTCOMES[outcome].result_code == 0:
            raise answer_now(
                400, "Invalid request: outcome must be a failed outcome (cancelled, timeout, ...)"
            )
        phone = None
        if data.get("phone") is not None:
            phone = _canonical_phone(data["phone"]) if isinstance(data["phone"], str) else None
            if phone is None:
                raise answer_now(400, "Invalid request: phone is not a Kenyan mobile number")
        self.provider.settle_due()
        triggered = self.provider.record_other_channel_failures(account, count, phone, outcome)
        return json_response(200, {"recorded": count, "rule_triggers": triggered})

    async def reset(self, request: Request) -> Response:
        self.provider.reset()
        return json_response(200, {"reset": True, "clock": iso(self.provider.clock.now())})

    def _clock_answer(self) -> Response:
        clock = self.provider.clock
        return json_response(
            200, {"now": iso(clock.now()), "now_epoch_s": clock.now(), "offset_s": clock.offset_s}
        )

    # ---- steps ------------------------------------------------------------------------------------------
    async def _enter(self, request: Request, endpoint: str) -> str:
        """Latency fault, then the Basic token; returns the account label. Due outcomes are applied first."""
        provider = self.provider
        faults = provider.scenario.faults
        if endpoint in faults.endpoints and (faults.latency_s > 0 or faults.latency_jitter_s > 0):
            provider.faults["latency"] += 1
            await asyncio.sleep(faults.latency(provider.fault_rng))
        account = self._account(request.headers.get("authorization"))
        if account is None:
            provider.refused["unauthorized"] += 1
            raise answer_now(401, "Unauthorized: a valid 'Authorization: Basic <token>' header is required")
        provider.settle_due()
        return account

    def _account(self, header: str | None) -> str | None:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "basic" or not token.strip():
            return None
        given, found = token.strip().encode(), None
        for label, known in self.accounts:  # every token compared, in constant time
            if hmac.compare_digest(given, known):
                found = label
        return found

    def _invalid(self, problem: str) -> AnswerNow:
        self.provider.refused["invalid"] += 1
        return answer_now(400, f"Invalid request: {problem}")

    async def _read_json(self, request: Request, limit: int, *, api: bool) -> Any:
        """The body as JSON. `api`: the request is to the UpesiPay API (Content-Type checked, refusals counted)."""

        def refuse(status: int, problem: str, headers: Mapping[str, str] | None = None) -> AnswerNow:
            if api:
                self.provider.refused["invalid"] += 1
            return answer_now(status, f"Invalid request: {problem}", headers)

        if api:
            media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media_type != "application/json":
                raise refuse(415, "Content-Type must be application/json")
        too_large = f"the body is larger than {limit} bytes"
        declared = request.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > DRAIN_MAX_BYTES:
            raise refuse(413, too_large, {"Connection": "close"})
        body, seen, more = bytearray(), 0, True
        while more:  # straight from ASGI receive: Starlette's stream() generator costs more than the JSON
            message = await request.receive()
            if message["type"] != "http.request":
                raise refuse(400, "the body was cut short")
            chunk: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            seen += len(chunk)
            if seen > DRAIN_MAX_BYTES:
                break
            if seen <= limit:
                body += chunk
        if seen > limit:
            raise refuse(413, too_large, {"Connection": "close"})
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise refuse(400, "the body is not valid JSON") from None

    def _push_input(self, body: Any) -> PushInput:
        if not isinstance(body, dict):
            raise self._invalid("the body must be a JSON object")
        # Unknown fields are ignored, as most JSON APIs do; the documented ones are checked strictly.
        amount = self._required(body, "amount")
        if type(amount) is not int:  # bools and 100.0 are refused
            raise self._invalid("amount must be an integer")
        if not 1 <= amount <= MAX_AMOUNT:
            raise self._invalid(f"amount must be from 1 to {MAX_AMOUNT}")
        raw_phone = self._required(body, "phone_number")
        if not isinstance(raw_phone, str):
            raise self._invalid("phone_number must be a string")
        phone = _canonical_phone(raw_phone[:32])
        if phone is None:
            raise self._invalid("phone_number must be a Kenyan mobile number such as 0712345678")
        channel_id = self._required(body, "channel_id")
        if type(channel_id) is not int or channel_id < 1:
            raise self._invalid("channel_id must be a positive integer")
        if self._required(body, "provider") != "m-pesa":
            raise self._invalid("provider must be 'm-pesa'")
        texts = {name: self._optional_text(body, name) for name in TEXT_LIMITS}
        callback_url = texts["callback_url"]
        if callback_url is not None and not _is_http_url(callback_url):
            raise self._invalid("callback_url must be an http or https URL")
        return PushInput(amount=amount, phone=phone, channel_id=channel_id, **texts)

    def _required(self, body: dict[str, Any], name: str) -> Any:
        value = body.get(name)
        if value is None:
            raise self._invalid(f"{name} is required")
        return value

    def _optional_text(self, body: dict[str, Any], name: str) -> str | None:
        value = body.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise self._invalid(f"{name} must be a string")
        if len(value) > TEXT_LIMITS[name]:
            raise self._invalid(f"{name} must be at most {TEXT_LIMITS[name]} characters")
        return value

    def _int_param(self, raw: str | None, name: str, default: int, low: int, high: int) -> int:
        if raw is None or raw == "":
            return default
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 10) or not low <= int(raw) <= high:
            raise self._invalid(f"{name} must be an integer from {low} to {high}")
        return int(raw)

    def _abuse_refusal(self, kind: str, until: float) -> Response:
        self.provider.refused[kind] += 1
        style = self.provider.scenario.abuse_answer
        ending = f" until {iso(until)}" if style in ("retry_after_and_until", "until") else ""
        if kind == "restricted":
            message = f"Account restricted from STK push by abuse protection{ending}"
        else:
            message = f"STK push blocked for this phone number by abuse protection{ending}"
        headers = None
        if style in ("retry_after_and_until", "retry_after"):
            headers = {"Retry-After": str(max(math.ceil(until - self.provider.clock.now()), 1))}
        return json_response(429, {"error_message": message}, headers)

    # ---- faults -------------------------------------------------------------------------------------------
    def _roll(self, endpoint: str) -> FaultKind:
        faults = self.provider.scenario.faults
        if endpoint not in faults.endpoints:
            return FaultKind.NONE
        return faults.roll(self.provider.fault_rng)

    def _fault_before(self, fault: FaultKind) -> tuple[Response | None, bool]:
        """(an answer to give instead of doing anything, whether to answer 500 after doing it)."""
        provider, faults = self.provider, self.provider.scenario.faults
        if fault is FaultKind.RATE_LIMIT:
            provider.faults["rate_limited"] += 1
            provider.refused["rate_limited"] += 1
            headers = {"Retry-After": str(faults.retry_after_s)}
            return json_response(429, {"error_message": "Too many requests"}, headers), False
        if fault is FaultKind.ERROR_5XX:
            # Half the 5xx come after the push was recorded (500: the customer IS prompted), half before
            # (502/503: nothing happened). The client cannot tell which: both are ambiguous to it.
            draw = provider.fault_rng.random()
            if draw < 0.5:
                return None, True
            if draw < 0.75:
                provider.faults["error_502"] += 1
                page = b"<html><head><title>502 Bad Gateway</title></head><body>502 Bad Gateway</body></html>"
                return Response(page, status_code=502, media_type="text/html"), False
            provider.faults["error_503"] += 1
            return json_response(503, {"error_message": "Service temporarily unavailable"}), False
        return None, False

    def _fault_after(self, fault: FaultKind, fail: bool, answer: Response) -> Response:
        provider = self.provider
        if fail:
            provider.faults["error_500"] += 1
            return json_response(500, {"error_message": "Server Error"})
        if fault is FaultKind.HANG:
            provider.faults["hang"] += 1
            return DelayedAnswer(answer, provider.scenario.faults.hang_s)
        if fault is FaultKind.RESET:
            provider.faults["reset"] += 1
            return ConnectionReset()
        return answer


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.netloc)


def create_app(config: SandboxConfig) -> FastAPI:
    """The sandbox as an ASGI app; serve it with uvicorn (the `reset` fault needs uvicorn's transport)."""
    provider = SandboxProvider(config)
    api = _Api(config, provider)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await provider.start()
        try:
            yield
        finally:
            await provider.stop()

    app = SandboxApp(
        title="UpesiPay sandbox", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.config = config
    app.state.provider = provider

    async def answer(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AnswerNow)
        return exc.response

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        return json_response(exc.status_code, {"error_message": str(exc.detail)}, exc.headers)

    app.add_exception_handler(AnswerNow, answer)
    app.add_exception_handler(StarletteHTTPException, http_error)
    routes = (
        ("/api/v2/payments", api.create_payment, "POST"),
        ("/api/v2/transaction-status", api.transaction_status, "GET"),
        ("/api/v2/transactions", api.transactions, "GET"),
        ("/sandbox/stats", api.stats, "GET"),
        ("/sandbox/scenario", api.get_scenario, "GET"),
        ("/sandbox/scenario", api.put_scenario, "PUT"),
        ("/sandbox/clock", api.get_clock, "GET"),
        ("/sandbox/clock/advance", api.advance_clock, "POST"),
        ("/sandbox/reset", api.reset, "POST"),
        ("/sandbox/other-channel", api.other_channel, "POST"),
    )
    for path, endpoint, method in routes:
        # Plain Starlette routes: the handlers read the Request themselves, and FastAPI's per-request
        # dependency solving would cost as much as the push itself (the sandbox must never be the bottleneck).
        app.router.add_route(path, endpoint, methods=[method], include_in_schema=False)
    return app
