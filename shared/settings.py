"""Settings shared by every Kairos process (env prefix ``KAIROS_``)."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "change-me-dev-only"

SERVICES = ("profile", "selection", "decision", "dispatch", "feedback")


class Settings(BaseSettings):
    """One settings object per process; every field can be set as ``KAIROS_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="KAIROS_", extra="ignore")

    env: Literal["dev", "test", "staging", "prod"] = "dev"
    run_dir: Path = Path(".run")

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:55432/kairos"
    redis_url: str = "redis://127.0.0.1:56379/0"
    nats_url: str = "nats://127.0.0.1:54222"

    # JetStream replicas of every stream Kairos creates: 3 on a 3-node NATS cluster (k8s/backing),
    # 1 on a single server. Existing streams are updated to it where the server allows.
    stream_replicas: int = Field(default=1, ge=1, le=5)

    # Namespaces so several suites (parallel test runs) share one server safely.
    bus_prefix: str = ""
    redis_prefix: str = ""

    host: str = "127.0.0.1"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    profile_port: int = 8181
    selection_port: int = 8182
    decision_port: int = 8183
    dispatch_port: int = 8184
    feedback_port: int = 8185
    # Explicit service URLs (Kubernetes Services); default http://host:port.
    profile_url: str | None = None
    selection_url: str | None = None
    decision_url: str | None = None
    dispatch_url: str | None = None
    feedback_url: str | None = None

    api_keys: str | None = None
    tracking_secret: str = DEFAULT_SECRET

    view_budget_ms: int = 250
    upstream_timeout_s: float = 5.0
    max_body_bytes: int = 1_048_576
    # Slow clients: request headers must arrive within this (else 408 and the connection
    # closes); a body may keep the server waiting at most idle_s per chunk, and after
    # timeout_s of waiting it must average 16 KiB/s (shared.deadlines).
    request_header_timeout_s: float = 10.0
    request_body_idle_s: float = 10.0
    request_body_timeout_s: float = 60.0
    import_max_bytes: int = 1_073_741_824

    # Selection's audience index: where it is saved for fast restarts (default
    # <run_dir>/selection), how often, and this process's name for its own consumers.
    selection_index_dir: Path | None = None
    selection_save_interval_s: float = 300.0
    instance_id: str = Field(default_factory=socket.gethostname)

    # Share of decisions ranked at random (unbiased learning data for propensities).
    decision_explore: float = Field(default=0.05, ge=0.0, le=1.0)
    # An offer nobody answered within this many seconds counts as a failure (propensity).
    decision_unanswered_s: float = 3 * 86_400.0
    decision_run_page: int = Field(
        default=5_000, ge=10, le=10_000, description="Members per batch-run page (checkpoint)"
    )

    # Public links (click, open, unsubscribe, provider callbacks): the signing secret and the
    # address customers reach the gateway at. Unset secret: KAIROS_TRACKING_SECRET.
    link_secret: str | None = None
    link_secrets_previous: str = ""  # comma-separated secrets still accepted (rotation)
    public_url: str = "http://127.0.0.1:8080"

    # Channel providers: a channel whose provider is not configured delivers to the local
    # outbox in dispatch's database (``kairos outbox``).
    apns_url: str | None = None  # https://api.push.apple.com
    apns_key_file: Path | None = None  # the .p8 signing key (ES256)
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None  # the app's bundle id
    apns_ca_file: Path | None = None  # trust this CA instead of the system's (test peers)
    apns_connections: int = Field(default=2, ge=1, le=32)
    fcm_url: str | None = None  # https://fcm.googleapis.com
    fcm_credentials_file: Path | None = None  # the service-account JSON (token_uri inside)
    fcm_ca_file: Path | None = None
    webpush_vapid_key_file: Path | None = None  # PEM EC P-256 private key
    webpush_vapid_subject: str = "mailto:ops@example.com"
    webpush_ca_file: Path | None = None
    smtp_url: str | None = None  # smtp://user:pass@host:587 (STARTTLS), smtps://…, ?starttls=false
    smtp_ca_file: Path | None = None
    smtp_connections: int = Field(default=4, ge=1, le=64)
    email_from: str = "Kairos <no-reply@example.com>"
    dkim_key_file: Path | None = None
    dkim_selector: str | None = None
    dkim_domain: str | None = None
    sms_url: str | None = None  # https://api.twilio.com
    sms_account: str | None = None
    sms_token: str | None = None
    sms_from: str | None = None
    rewards_url: str | None = None
    rewards_secret: str | None = None
    # Per channel (push, email, sms, inapp, rewards), messages per second for all replicas
    # together: JSON such as {"push": 3000, "sms": 100}. Unset channels are not limited.
    dispatch_rate_limits: str = "{}"
    dispatch_concurrency: int = Field(default=64, ge=1, le=1024)
    dispatch_max_age_s: float = Field(default=6 * 3600.0, gt=0)  # retries give up after this
    # Finished messages are kept this long (support's view, exactly-once against redeliveries:
    # longer than the DISPATCH stream's 7 days), then deleted.
    dispatch_retention_days: int = Field(default=30, ge=8)

    consumer_batch: int = 500
    # The profile's events consumer: larger batches (fewer round trips per event) and two
    # batches in flight (one is in Postgres while the other is in Redis or being parsed).
    profile_events_batch: int = Field(default=1000, ge=1, le=10_000)
    profile_events_in_flight: int = Field(default=2, ge=1, le=8)
    # How long an event batch's announcement row (its customers and versions, read by
    # selection after ``profile.counted``) is kept: longer than a selection replica may lag
    # or be down; one whose batch is gone rebuilds its index from the profile.
    event_batch_retention_s: float = Field(default=3600.0, ge=600.0)
    consumer_max_deliver: int = 5
    # How long a consumer that nobody waits on message by message (history, counters, the
    # audience index, learning) keeps gathering after a batch's first message: fewer, larger
    # batches cost far less CPU per message (each batch is a transaction or a script call),
    # which leaves the cores to the latency path (the gateway, triggers, dispatch), whose
    # consumers gather for 5 ms (``shared.bus.GATHER_S``).
    consumer_bulk_gather_ms: float = Field(default=25.0, ge=1.0, le=1000.0)
    # The cyclic garbage collector's thresholds (``gc.set_threshold``). Python's default
    # (700, 10, 10) collects after every 700 new container objects, and every tenth of those
    # collections goes on to the older generations: an import batch or an event batch
    # allocates hundreds of thousands of short-lived objects, and selection's index holds
    # lists of millions of elements that a full collection walks. With the default, the
    # profile spent 3 s and selection 6.9 s of their 12 s of CPU collecting during a
    # 300,000-customer import (``bench import``, measured with ``gc.callbacks``).
    gc_thresholds: tuple[PositiveInt, PositiveInt, PositiveInt] = (50_000, 20, 10)
    run_consumers: bool = True
    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _enforce_non_default_secrets(self) -> Settings:
        if self.env not in ("dev", "test") and self.tracking_secret == DEFAULT_SECRET:
            raise ValueError(
                "KAIROS_TRACKING_SECRET still has its development default; "
                f"set a real secret when KAIROS_ENV={self.env}"
            )
        if (
            self.env not in ("dev", "test")
            and self.link_secret is not None
            and self.link_secret == DEFAULT_SECRET
        ):
            raise ValueError(
                f"KAIROS_LINK_SECRET has its development default (KAIROS_ENV={self.env})"
            )
        if self.env not in ("dev", "test") and not self.api_keys:
            raise ValueError(f"KAIROS_API_KEYS must be set when KAIROS_ENV={self.env}")
        return self

    def link_signer_secret(self) -> str:
        """The secret that signs public links."""
        return self.link_secret or self.tracking_secret

    def port_of(self, name: str) -> int:
        """The listening port of a process by name (gateway or a service)."""
        port: int = getattr(self, f"{name}_port")
        return port

    def url_of(self, service: str) -> str:
        """Base URL the gateway uses to reach a service."""
        explicit: str | None = getattr(self, f"{service}_url")
        return explicit or f"http://{self.host}:{self.port_of(service)}"


SECRETS_DIR_ENV = "KAIROS_SECRETS_DIR"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment.

    With ``KAIROS_SECRETS_DIR`` set (Kubernetes: a Secret volume), each file there named like
    a setting's variable (``KAIROS_DATABASE_URL``) supplies that setting; an environment
    variable of the same name still wins."""
    return Settings(_secrets_dir=secrets_dir())  # type: ignore[call-arg]  # BaseSettings init kwarg


def secrets_dir() -> Path | None:
    """The directory of secret files named by ``KAIROS_SECRETS_DIR``, if any."""
    raw = os.environ.get(SECRETS_DIR_ENV)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_dir():
        raise ValueError(f"{SECRETS_DIR_ENV}={raw} is not a directory")
    return path
