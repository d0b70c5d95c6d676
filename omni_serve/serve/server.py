"""Running an app with uvicorn and waiting for a server to answer: shared by the CLI, launcher and tests."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import uvicorn
from fastapi import FastAPI

# Streams still open at shutdown get this long to finish before their connections are closed.
GRACEFUL_SHUTDOWN_S = 3


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; uvicorn's own signal handling gives a clean shutdown."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, timeout_keep_alive=30)
    uvicorn.Server(config).run()


def wait_until_ready(url: str, timeout_s: float, alive: Callable[[], bool] | None = None, interval_s: float = 0.1,
                     any_answer: bool = False) -> None:
    """Poll GET `url` until it answers 200 (any HTTP answer with `any_answer`).

    Raises TimeoutError, or RuntimeError as soon as `alive()` says the process serving it has exited.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the process serving {url} exited before it was ready")
            try:
                response = http.get(url)
                if response.status_code == 200 or (any_answer and response.status_code < 500):
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(interval_s)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s (last: {last})")
