"""Settings of the controller and the model worker, as frozen dataclasses handed to `create_app`.

Defaults are the safe ones: loopback addresses only, the reference's heartbeat timing (beat every
15 s, forget a worker after 30 s silent) and caps on request size. The command line fills them in;
tests build them directly with short heartbeats.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

LOOPBACK = "127.0.0.1"
DEFAULT_CONTROLLER_PORT = 21001
DEFAULT_WORKER_PORT = 21002
HEARTBEAT_INTERVAL_S = 15.0
HEARTBEAT_EXPIRY_S = 30.0
TOKEN_ENV = "OMNI_SERVE_TOKEN"
# Networks and names a worker may register from unless the operator allows more (--allow-worker-hosts).
LOOPBACK_HOSTS = ("127.0.0.0/8", "::1", "localhost")
MiB = 1024 * 1024

DispatchMethod = Literal["shortest_queue", "lottery"]


@dataclass(frozen=True)
class ControllerSettings:
    """What the controller needs: where to listen, how to dispatch, whom to trust."""

    host: str = LOOPBACK
    port: int = DEFAULT_CONTROLLER_PORT
    dispatch: DispatchMethod = "shortest_queue"
    heartbeat_expiry_s: float = HEARTBEAT_EXPIRY_S
    token: str | None = None
    allowed_worker_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_body_bytes: int = 64 * 1024  # controller messages are tiny
    probe_timeout_s: float = 2.0  # for the controller's own calls to workers (status, health)
    openai_api: bool = True  # mount /v1/models and /v1/chat/completions
    max_api_body_bytes: int = 48 * MiB  # /v1 requests carry audio (base64) and earlier turns


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker needs besides its engine: its address, its controller, its limits."""

    host: str = LOOPBACK
    port: int = DEFAULT_WORKER_PORT
    worker_address: str | None = None  # what the controller should call; default http://host:port
    controller_url: str | None = None  # None: serve without registering
    model_name: str | None = None  # advertised name; default the engine's
    token: str | None = None
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    limit_concurrency: int = 16  # requests streaming at once; more are answered 503 + Retry-After
    max_body_bytes: int = 32 * MiB  # 120 s as the reference's JSON floats is about 25 MB
    max_audio_seconds: float = 120.0
    retry_after_s: int = 1

    @property
    def address(self) -> str:
        return self.worker_address or f"http://{_url_host(self.host)}:{self.port}"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def resolve_token(flag: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The shared token: the flag, else $OMNI_SERVE_TOKEN, else None (no token required)."""
    return flag or environ.get(TOKEN_ENV) or None
