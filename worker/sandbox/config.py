"""What one sandbox run needs: its accounts (tokens), scenario, seed, delays, abuse limits and clock."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.sandbox.rules import AbuseLimits, SandboxClock
from worker.sandbox.scenario import Scenario

MAX_BODY_BYTES = 64 * 1024  # the API's body limit; a push body is a few hundred bytes
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")


@dataclass
class SandboxConfig:
    """Everything a sandbox run needs; each `--token` is one account, labelled account-1, account-2, ..."""

    tokens: Sequence[str]
    scenario: Scenario = field(default_factory=Scenario)
    seed: int = 0  # unless the scenario sets "seed"
    callback_delay_s: float = 1.0  # push to outcome (and callback), unless the scenario sets callback_delay_s
    late_delay_s: float = 30.0  # outcome to a `late` callback, unless the scenario sets late_delay_s
    callback_timeout_s: float = 5.0
    limits: AbuseLimits = field(default_factory=AbuseLimits)
    clock: SandboxClock = field(default_factory=SandboxClock)
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.tokens, str):
            raise ValueError("tokens must be a sequence of tokens, not one string")
        self.tokens = tuple(self.tokens)
        if not self.tokens:
            raise ValueError("at least one token is required: each token is one UpesiPay account")
        # The messages never repeat a token: it is a secret even here.
        if not all(isinstance(token, str) and _TOKEN_RE.fullmatch(token) for token in self.tokens):
            raise ValueError("each token must be non-empty printable ASCII without spaces")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("tokens must be distinct")
        for name in ("callback_delay_s", "late_delay_s", "callback_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.callback_timeout_s <= 0 or self.max_body_bytes < 1024:
            raise ValueError("callback_timeout_s must be > 0 and max_body_bytes at least 1024")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError("seed must be an integer")

    @property
    def accounts(self) -> dict[str, str]:
        """Account label -> token. Labels, never tokens, appear in stats and logs."""
        return {f"account-{index}": token for index, token in enumerate(self.tokens, start=1)}
