"""Account-wide sending pause after UpesiPay refuses the credentials (401/403).

One Redis key per account, shared by every worker, expiring after the probe interval: the first send after it
expires is the probe. If the credentials are still refused the pause is set again; once one is accepted, sending
has resumed by itself. Fails closed like the guard: if Redis can't say, nothing is sent.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("stkpush.pause")


class CredentialsPause:
    def __init__(self, client: redis.Redis, account: str) -> None:
        self.client = client
        self.key = f"stkpush:{{{account}}}:credentials-pause"

    def remaining_s(self) -> float:
        """Seconds until the next probe may go out; 0 when sending is allowed."""
        try:
            ttl_ms = self.client.pttl(self.key)
        except redis.RedisError:
            log.warning("Redis unavailable while reading the credentials pause: holding sends")
            return 30.0
        return max(float(ttl_ms), 0.0) / 1000.0

    def pause(self, seconds: float) -> None:
        self.client.set(self.key, "1", px=max(int(seconds * 1000), 1))

    def clear(self) -> None:
        self.client.delete(self.key)
