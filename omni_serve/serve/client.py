"""The client side of the wire protocol: ask the controller for a worker, stream its answer as events.

Used by the web UI, the OpenAI-style gateway, the tests and the benchmarks. Every failure arrives as an
`ErrorEvent` in the same stream as the answer (so a consumer handles one stream and never a
half-finished exception), with a code saying what happened:

- no_worker (503): no live worker serves the model;   - busy (503, retry_after): the worker is full;
- unknown_model (404): workers are up, but none serves that model;
- worker_failed: the worker died or cut the stream mid-answer (the controller is told, and checks);
- controller_unreachable (502);   - any code of the worker's HTTP error answers (401, 404, 413, 400 ...).

A worker that cannot be reached before anything was streamed is reported and another one is tried.
Closing the stream (`async with contextlib.aclosing(client.stream(request))`, or dropping it) closes the
connection, which cancels the generation in the worker.
Needs no torch: numpy, httpx and pydantic only, so the web and gateway processes stay light.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from typing_extensions import Self

from omni_serve.model.audio import pcm16_to_float  # numpy only: no torch in clients
from omni_serve.serve.protocol import (
    AudioEvent,
    ErrorBody,
    ErrorEvent,
    FinalEvent,
    GenerateRequest,
    ListModelsResponse,
    StreamEvent,
    WorkerAddressRequest,
    WorkerAddressResponse,
    WorkerFailureReport,
    parse_event,
)
from omni_serve.serve.security import auth_headers

DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=60.0, pool=10.0)


class WorkerUnreachable(Exception):
    """The worker could not be reached at all; safe to try another one (nothing was streamed)."""


class ServeClient:
    """A connection pool to one controller and its workers; use `async with ServeClient(url) as client`."""

    def __init__(self, controller_url: str, token: str | None = None, *, http: httpx.AsyncClient | None = None,
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, attempts: int = 2) -> None:
        self.controller_url = controller_url.rstrip("/")
        self.token = token
        self.attempts = attempts
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(timeout=timeout, trust_env=False)
        self._default_model: str | None = None  # for requests naming no model; saves a round trip each

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    # --- controller ---------------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        response = await self.http.post(f"{self.controller_url}/list_models")
        response.raise_for_status()
        return ListModelsResponse.model_validate(response.json()).models

    async def worker_address(self, model: str, conversation_id: str | None = None) -> str:
        """The worker that should answer next ("" when none serves the model)."""
        body = WorkerAddressRequest(model=model, conversation_id=conversation_id)
        response = await self.http.post(f"{self.controller_url}/get_worker_address", json=body.model_dump())
        response.raise_for_status()
        return WorkerAddressResponse.model_validate(response.json()).address

    async def report_failure(self, address: str) -> bool:
        """Tell the controller a worker failed us; True when it dropped the worker."""
        try:
            response = await self.http.post(f"{self.controller_url}/report_worker_failure",
                                            json=WorkerFailureReport(worker_name=address).model_dump(),
                                            headers=auth_headers(self.token))
            return response.status_code == 200 and bool(response.json().get("removed"))
        except httpx.HTTPError:
            return False

    # --- streaming ----------------------------------------------------------------------------

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """The answer to `request` from whichever worker the controller picks, as protocol events."""
        try:
            model = request.model or await self._any_model()
            if model is None:
                yield ErrorEvent(message="no worker is registered with the controller", code="no_worker", status=503)
                return
            for _ in range(max(1, self.attempts)):
                address = await self.worker_address(model, request.conversation_id)
                if not address and request.model is None and self._default_model is not None:
                    self._default_model = None  # the model served may have changed: ask again, once
                    model = await self._any_model() or model
                    address = await self.worker_address(model, request.conversation_id)
                if not address:
                    yield await self._no_worker(model)
                    return
                try:
                    async with aclosing(self.stream_from(address, request)) as events:
                        async for event in events:
                            yield event
                    return
                except WorkerUnreachable:
                    await self.report_failure(address)
        except httpx.HTTPError as exc:
            yield ErrorEvent(message=f"the controller at {self.controller_url} did not answer ({type(exc).__name__})",
                             code="controller_unreachable", status=502)
            return
        yield ErrorEvent(message="no worker could be reached", code="worker_failed", status=502)

    async def _no_worker(self, model: str) -> ErrorEvent:
        """404 for a model no worker serves while others are served; 503 when no worker is up at all."""
        served = await self.list_models()
        if served and model not in served:
            return ErrorEvent(message=f"no worker serves the model {model!r}; served: {', '.join(served)}",
                              code="unknown_model", status=404)
        return ErrorEvent(message=f"no live worker serves {model!r}", code="no_worker", status=503)

    async def _any_model(self) -> str | None:
        if self._default_model is None:
            self._default_model = next(iter(await self.list_models()), None)
        return self._default_model

    async def stream_from(self, address: str, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Stream from one worker; raises WorkerUnreachable only when it could not be reached at all."""
        url = f"{address.rstrip('/')}/worker_generate_stream"
        headers = {"Content-Type": "application/json", **auth_headers(self.token)}
        body = request.model_dump_json(exclude_none=True)
        try:
            async with self.http.stream("POST", url, content=body, headers=headers) as response:
                if response.status_code != 200:
                    yield await _http_error(response)
                    return
                async for line in response.aiter_lines():
                    if line:
                        event = parse_event(line)
                        yield event
                        if isinstance(event, (FinalEvent, ErrorEvent)):
                            return
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise WorkerUnreachable(address) from exc
        except (httpx.TransportError, ValueError) as exc:  # reset, cut chunked stream, timeout, garbage
            await self.report_failure(address)
            yield ErrorEvent(message=f"the worker {address} failed mid-answer ({type(exc).__name__})",
                             code="worker_failed")
            return
        await self.report_failure(address)
        yield ErrorEvent(message=f"the worker {address} closed the stream before the answer ended",
                         code="worker_failed")


async def stream_answer(controller_url: str, request: GenerateRequest, token: str | None = None,
                        **client_options: Any) -> AsyncIterator[StreamEvent]:
    """One-shot helper: a fresh client, one request's events, then the client is closed."""
    async with (ServeClient(controller_url, token, **client_options) as client,
                aclosing(client.stream(request)) as events):
        async for event in events:
            yield event


async def _http_error(response: httpx.Response) -> ErrorEvent:
    raw = await response.aread()
    try:
        body = ErrorBody.model_validate_json(raw)
        code, message = body.code, body.message
    except ValueError:
        code, message = f"http_{response.status_code}", raw.decode(errors="replace")[:500]
    retry_after = response.headers.get("retry-after", "")
    seconds = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
    return ErrorEvent(message=message, code=code, status=response.status_code, retry_after=seconds)


# --- building requests and reading audio ----------------------------------------------------------


def request_from_file(source: str | Path | bytes, **options: Any) -> GenerateRequest:
    """A request carrying an encoded audio file (wav, mp3, webm ...) as it is; the worker decodes it."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    return GenerateRequest(audio_b64=base64.b64encode(data).decode("ascii"), **options)


def request_from_samples(samples: np.ndarray, sample_rate: int = 16000, **options: Any) -> GenerateRequest:
    """A request carrying float samples in [-1, 1] as 16-bit PCM (a quarter of the bytes of JSON floats)."""
    return GenerateRequest(pcm16_b64=base64.b64encode(pcm16_request_bytes(samples)).decode("ascii"),
                           sample_rate=sample_rate, **options)


def pcm16_request_bytes(samples: np.ndarray) -> bytes:
    """Samples as 16-bit PCM, scaled by 32768 and rounded: audio that came from 16-bit PCM (a wav file, a
    microphone) crosses the wire bit-exact, so the worker sees the very samples the client decoded."""
    scaled = np.round(np.asarray(samples, dtype=np.float64) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def audio_samples(event: AudioEvent) -> np.ndarray:
    """The float32 samples of one streamed audio chunk."""
    return pcm16_to_float(base64.b64decode(event.pcm16))


async def collect(events: AsyncIterator[StreamEvent]) -> tuple[FinalEvent | ErrorEvent, np.ndarray]:
    """Drain a stream: its last event (final or error) and all its audio joined."""
    last: FinalEvent | ErrorEvent = ErrorEvent(message="the stream was empty", code="worker_failed")
    chunks = []
    async for event in events:
        if isinstance(event, AudioEvent):
            chunks.append(audio_samples(event))
        elif isinstance(event, (FinalEvent, ErrorEvent)):
            last = event
    return last, np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
