"""The one typed settings object: read from the environment (and `.env`) once; nothing else reads os.environ."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    AnyHttpUrl,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# Celery (kombu's Redis transport) redelivers an unacked message once it has been reserved this long. Every
# countdown or ETA the project sets stays below half of it (asserted in worker.celery_app), so a scheduled task is
# never delivered twice just because it waited.
DEFAULT_VISIBILITY_TIMEOUT_S = 3600
# UpesiPay's documented abuse rules (docs/upesipay.md): the guard's limits may be lower, never higher.
PROVIDER_STREAK_LIMIT = 10
PROVIDER_FAILURE_LIMIT = 50
PROVIDER_LIMITS = {
    "phone_streak_limit": (
        PROVIDER_STREAK_LIMIT,
        f"UpesiPay blocks a number after more than {PROVIDER_STREAK_LIMIT} successive failed or cancelled requests",
    ),
    "account_failure_limit": (
        PROVIDER_FAILURE_LIMIT,
        f"UpesiPay restricts the account after more than {PROVIDER_FAILURE_LIMIT} failed requests in 6 hours",
    ),
}


class SettingsError(RuntimeError):
    """A setting is missing or malformed. The message names each variable and its rule, never a value."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False, frozen=True
    )

    # UpesiPay
    upesipay_base_url: AnyHttpUrl
    upesipay_auth_token: SecretStr
    upesipay_channel_id: int = Field(gt=0, le=2**31 - 1)
    # The guard and the ledger are per UpesiPay account; one deployment serves one account unless told otherwise.
    upesipay_account: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    upesipay_connect_timeout_s: float = Field(default=5.0, gt=0)
    # A read timeout after the request was sent makes the payment UNKNOWN (never resent blindly), so it is
    # generous: UpesiPay answers 201 before the customer sees the prompt.
    upesipay_read_timeout_s: float = Field(default=30.0, gt=0)

    # Infrastructure
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Prefix for every broker key (kombu's global_keyprefix): lets a demo or test share a Redis it did not
    # create and remove exactly its own keys afterwards. Empty in production.
    redis_key_prefix: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:-]*$")
    database_url: str = "sqlite:///stkpush.db"
    visibility_timeout_s: int = Field(default=DEFAULT_VISIBILITY_TIMEOUT_S, ge=60)

    # Callbacks
    callback_base_url: AnyHttpUrl
    callback_secret: SecretStr = Field(min_length=16)

    # Payment rules
    amount_min: int = Field(default=1, ge=1)
    amount_max: int = Field(default=150_000, ge=1)
    # Deprecated: no longer read. A send that provably never reached UpesiPay retries for SEND_RETRY_FOR_S.
    send_max_attempts: int = Field(default=5, ge=1, le=20)
    send_backoff_base_s: float = Field(default=2.0, gt=0)
    send_backoff_cap_s: float = Field(default=300.0, gt=0)
    # A payment whose sends never reached UpesiPay (connection refused, DNS, 502/503 before recording) retries with
    # backoff (base, doubling, capped at SEND_BACKOFF_CAP_S) for this long from its first such attempt, then FAILED
    # "never sent" (`stkpush retry` re-opens it). Its deadline (EXPIRED) still comes first.
    send_retry_for_s: int = Field(default=3 * 3600, ge=1)
    # A block or restriction UpesiPay announces without an end lasts the rule's own duration (0, the default: 24 h
    # for a number, 4/24/72 h for the account by our window's count). N > 0 probes after N seconds instead: the
    # looser reading, at the merchant's risk (docs/guard.md, "Provider blocks").
    provider_block_wait_s: int = Field(default=0, ge=0)
    # An ambiguous send (timeout, reset, 5xx) is sent again only when the prompt's lifetime has passed and
    # UNKNOWN_LOOKUPS lookups, each UNKNOWN_LOOKUP_SPACING_S apart, agree UpesiPay has no such request
    # (worker/ambiguous.py). M-Pesa prompts live about 60-120 s: the strict value is above that.
    prompt_lifetime_s: int = Field(default=180, ge=1)
    unknown_lookups: int = Field(default=2, ge=2, le=10)
    unknown_lookup_spacing_s: int = Field(default=60, ge=1)
    # Without a provider reference only the transactions list can be asked, and "not in the list" is no proof
    # (docs/upesipay.md): such a payment stays UNKNOWN unless the merchant sets this (the looser reading).
    unknown_resend_on_list_absence: bool = False
    # ResultCode 1001 ("another transaction is in progress on that phone"): a failure for the guard, not the
    # payment's end; sent again after IN_PROGRESS_RETRY_S, at most IN_PROGRESS_RETRIES times, then FAILED.
    in_progress_retry_s: int = Field(default=120, ge=1)
    in_progress_retries: int = Field(default=3, ge=0, le=20)

    # Credentials refused: every send waits this long, then one payment probes whether they work again.
    credentials_probe_s: float = Field(default=120.0, gt=0)

    # Fail-points for the reliability tests only (never set in production): the worker process SIGKILLs itself
    # at this point of a send, once per marker file: "after-claim", "after-send", or "before-resolve" (the ledger
    # has ended an attempt, the guard has not been told yet).
    fault_kill_at: Literal["", "after-claim", "after-send", "before-resolve"] = ""
    fault_marker_file: str = ""

    # Dispatcher and settlement (beat)
    dispatch_interval_s: float = Field(default=2.0, gt=0, le=300)
    # A queued PENDING row older than this has lost its message (Redis restarted without AOF, say): queue again.
    requeue_after_s: int = Field(default=900, ge=1)
    # A SENDING row older than this belongs to a dead worker (the hard task time limit is 150 s).
    stuck_sending_after_s: int = Field(default=300, ge=1)
    # AWAITING_CALLBACK this long without a callback: ask transaction-status. M-Pesa prompts time out in ~1 min.
    settle_after_s: int = Field(default=180, ge=1)
    # UNKNOWN rows are asked about after this long (the provider needs a moment to record the request).
    settle_unknown_after_s: int = Field(default=20, ge=1)
    # A payment UpesiPay still reports as QUEUED (or could not report on) is asked about again after this long.
    settle_poll_s: float = Field(default=30.0, gt=0)
    # Still unsettled after this long (no status, no callback): counted as FAILED for the guard and the ledger.
    settle_give_up_s: int = Field(default=3 * 3600, ge=60)

    # Failures from other channels (payment buttons, the dashboard) fill UpesiPay's window too: beat reads the
    # newest OTHER_CHANNELS_PAGES pages (100 each) of the transactions list every OTHER_CHANNELS_POLL_S and counts
    # failed pushes that are not ours (worker/other_channels.py). 0 turns the reading off.
    other_channels_poll_s: float = Field(default=60.0, ge=0)
    other_channels_pages: int = Field(default=2, ge=1, le=20)

    # The guard (docs/ARCHITECTURE.md and docs/guard.md); defaults are UpesiPay's documented limits. Lower values
    # leave a margin; higher ones are refused (_provider_limits): they would let the provider block us.
    phone_streak_limit: int = Field(default=10, ge=1)
    # A number at its streak limit: "hold" waits for a success on it or an operator's `stkpush guard release`
    # (UpesiPay documents no expiry for a streak); "rest" frees it PHONE_COOLDOWN_S after its last failure, for
    # merchants who accept the risk that UpesiPay still counts the old streak.
    phone_at_limit: Literal["hold", "rest"] = "hold"
    phone_cooldown_s: int = Field(default=24 * 3600, ge=1)
    phone_max_inflight: int = Field(default=1, ge=1)
    account_failure_limit: int = Field(default=50, ge=1)
    account_window_s: int = Field(default=6 * 3600, ge=1)
    # Lanes (docs/guard.md, "Lanes"): batch rows are admitted only while failures + sends in flight stay below
    # ACCOUNT_FAILURE_LIMIT - INTERACTIVE_RESERVE, so a customer at a checkout always finds this much budget.
    interactive_reserve: int = Field(default=10, ge=0)
    # Batch sends in flight at once, at most: each may still fail, so a batch cannot commit the whole bulk lane
    # to outcomes it has not seen yet.
    bulk_max_inflight: int = Field(default=20, ge=1)
    # The bulk lane's release order (docs/batches.md, "Release order"): "score" sends the waiting rows likeliest to
    # pay first (worker/scoring.py), "fifo" in the order they were recorded. Neither changes what the guard admits.
    bulk_order: Literal["fifo", "score"] = "score"
    # Deadlines: how long a single payment is worth prompting for when its producer does not say (a customer
    # leaves the checkout); past it, a payment never sent ends EXPIRED. Batch rows have none unless given.
    interactive_expires_in_s: int = Field(default=600, ge=1)
    # A batch pauses itself (worker/batch_brake.py) after this many rejections in a row with the same error; its
    # rows are also claimed only while its sends in SENDING plus its current rejection run stay below it.
    batch_pause_rejections: int = Field(default=5, ge=1, le=1000)
    # ... or when, over its last this-many outcomes, the failure rate reaches BATCH_PAUSE_FAILURE_RATE and is
    # BATCH_PAUSE_NORM_MARGIN above the rest of the account's rate in the window. 0 turns this trigger off.
    batch_pause_outcomes: int = Field(default=20, ge=0, le=10_000)
    batch_pause_failure_rate: float = Field(default=0.6, gt=0, le=1)
    batch_pause_norm_margin: float = Field(default=0.3, ge=0, le=1)

    # Where POST /batches spools uploads and where HTTP batches' rejects files are kept (operators clean it up);
    # empty: <system temp>/stkpush-batches.
    batch_dir: str = ""

    # Webhooks (docs/webhooks.md). A receiver slower than this is counted as a failed attempt and retried.
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=60)
    # Retries wait base * 2^(attempt-1), capped, with jitter (half fixed, half random), for up to retry_for.
    webhook_retry_base_s: float = Field(default=30.0, gt=0)
    webhook_retry_cap_s: float = Field(default=6 * 3600.0, gt=0)
    webhook_retry_for_s: int = Field(default=3 * 24 * 3600, ge=1)
    # An endpoint failing without a single success for this long is disabled (loud log, metric); its waiting
    # deliveries stay in the ledger for `stkpush webhook enable`.
    webhook_disable_after_s: int = Field(default=3 * 24 * 3600, ge=1)
    # How long a released delivery is reserved for the worker holding its message; a worker that dies mid-delivery
    # is noticed after this (then beat releases it again). Longer than the timeout; shorter only risks duplicates.
    webhook_lease_s: float = Field(default=120.0, gt=0)
    # The Python hook: a Celery task of the merchant's app (same broker) sent every event, e.g.
    # myshop.tasks.payment_settled, on the merchant's own queue (Celery's default queue is named "celery").
    stkpush_on_outcome_task: str = Field(
        default="", max_length=200, pattern=r"^([A-Za-z_][\w]*)(\.[A-Za-z_][\w]*)*$|^$"
    )
    stkpush_on_outcome_queue: str = Field(
        default="celery", min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$"
    )
    # The longest `GET /payments/{ref}?wait=` a request may ask for: each waiter holds a connection.
    payment_wait_max_s: int = Field(default=60, ge=1, le=300)

    # HTTP producer API keys (comma separated); empty disables the producer endpoints. Each is `key` (the
    # environment's account), `account:key` (that account only) or `*:key` (admin: every account, the account
    # routes). See worker/web/access.py.
    api_keys: SecretStr = SecretStr("")

    # Several accounts (worker/accounts.py): the Fernet key(s) the stored accounts' tokens are encrypted under,
    # comma separated, the first encrypting (docs/operations.md, "Rotating the encryption key"). Empty: only the
    # environment's account can be used.
    account_token_key: SecretStr = SecretStr("")
    # How long a process trusts a stored account's configuration before reading it again: `stkpush account set`
    # (a new token, new limits, a disable) reaches every worker within this.
    account_cache_s: float = Field(default=10.0, ge=0, le=3600)
    # Where the guard keeps its state: empty means REDIS_URL. A `redis+cluster://` (or `rediss+cluster://`) URL
    # puts the guard on a Redis Cluster; the broker stays on REDIS_URL (kombu has no cluster transport).
    guard_redis_url: str = ""

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # Checked here, not left to the first connection: a bad port or database otherwise shows up as "broker
        # unreachable" forever, or as a traceback that never names the variable. Rules only, never the value
        # (it may hold the password).
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError:
            raise ValueError("must have a port that is a number between 1 and 65535") from None
        if port == 0:
            raise ValueError("must have a port that is a number between 1 and 65535")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("must name the socket's path (unix:///path/to/redis.sock)")
            database = dict(parse_qsl(parts.query)).get("db", "0")
        else:
            if not parts.hostname:
                raise ValueError("must name a host (redis://host:6379/0)")
            database = parts.path.lstrip("/") or "0"
        if not database.isdigit() or int(database) > 1_000_000:
            raise ValueError("must end with a database number (redis://host:6379/0)")
        return value

    @field_validator("guard_redis_url")
    @classmethod
    def _guard_redis_url(cls, value: str) -> str:
        if value and not value.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
        ):
            raise ValueError(
                "must be empty or start with redis://, rediss://, unix://, redis+cluster:// or rediss+cluster://"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("must be a sqlite:// or postgresql:// URL")
        return value

    @field_validator("phone_streak_limit", "account_failure_limit")
    @classmethod
    def _provider_limits(cls, value: int, info: ValidationInfo) -> int:
        most, rule = PROVIDER_LIMITS[info.field_name or ""]
        if value > most:
            raise ValueError(f"must be at most {most}: {rule}")
        return value

    @model_validator(mode="after")
    def _bounds(self) -> Settings:
        if self.amount_min > self.amount_max:
            raise ValueError("AMOUNT_MIN must not exceed AMOUNT_MAX")
        if self.interactive_reserve >= self.account_failure_limit:
            raise ValueError("INTERACTIVE_RESERVE must be below ACCOUNT_FAILURE_LIMIT")
        if self.webhook_lease_s <= self.webhook_timeout_s:
            raise ValueError("WEBHOOK_LEASE_S must be longer than WEBHOOK_TIMEOUT_S")
        if self.send_backoff_cap_s * 2 > self.visibility_timeout_s:
            raise ValueError("SEND_BACKOFF_CAP_S must be at most half of VISIBILITY_TIMEOUT_S")
        return self

    @property
    def sqlalchemy_url(self) -> str:
        if self.database_url.startswith("postgresql://"):
            return "postgresql+psycopg://" + self.database_url.removeprefix("postgresql://")
        return self.database_url

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        name = loc[0].upper() if loc else "settings"
        rule = "is required" if item["type"] == "missing" else item["msg"]
        lines.append(f"  {name}: {rule}")
    return "invalid stkpush settings:\n" + "\n".join(lines)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings, turning pydantic's error into one that names each bad variable (no values)."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        raise SettingsError(_describe(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
