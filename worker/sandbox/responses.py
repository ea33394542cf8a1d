"""How the sandbox answers: JSON and error responses, and the two faults that need more than a status code
(`hang`: an answer that waits; `reset`: a TCP reset with no HTTP answer, which needs uvicorn's transport)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.types import Receive, Scope, Send

# Where SandboxApp leaves uvicorn's transport for the `reset` fault.
_TRANSPORT_KEY = "stkpush.sandbox.transport"


class AnswerNow(Exception):
    """Raised to answer at once with `response` (errors found deep in a handler)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body).encode(), status_code=status, media_type="application/json", headers=headers
    )


def answer_now(status: int, message: str, headers: Mapping[str, str] | None = None) -> AnswerNow:
    return AnswerNow(json_response(status, {"error_message": message}, headers))


class DelayedAnswer(Response):
    """The `hang` fault: the answer waits `delay_s`, or is dropped if the client gives up first."""

    def __init__(self, answer: Response, delay_s: float) -> None:
        super().__init__()
        self.answer, self.delay_s = answer, delay_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(self.delay_s):
                while (await receive())["type"] != "http.disconnect":
                    pass
        except TimeoutError:
            await self.answer(scope, receive, send)


class ConnectionReset(Response):
    """The `reset` fault: the request was read, then the TCP connection is reset with no HTTP answer at all."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = scope.get(_TRANSPORT_KEY)
        if not isinstance(transport, asyncio.Transport):
            raise RuntimeError(
                "the reset fault needs uvicorn's h11 or httptools protocol (no transport found)"
            )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: close() sends RST rather than FIN, as a crashed proxy or a dropped NAT entry would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        # Wait until the server has seen the connection go, so that it does not try to answer for us.
        async with asyncio.timeout(5):
            while (await receive())["type"] != "http.disconnect":
                pass


class SandboxApp(FastAPI):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # uvicorn's `send` is a method of its per-request cycle, which holds the connection's transport:
            # the only handle that can drop a connection without answering (the `reset` fault).
            scope[_TRANSPORT_KEY] = getattr(getattr(send, "__self__", None), "transport", None)
        await super().__call__(scope, receive, send)
