"""A model worker: one engine (one model) behind HTTP, registered with a controller and beating to it.

`POST /worker_generate_stream` answers our compact request with NDJSON events and the reference's
request (audio as JSON floats) with the reference's NUL-delimited stream. Audio is decoded and checked
before the stream starts, so bad input gets an HTTP error. At most `limit_concurrency` requests stream
at once; more get 503 with Retry-After, so a crowd meets a clear answer instead of an unbounded queue.
A client that goes away cancels its generation: the engine stops it within one decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from omni_serve.engine import AudioLimits, Engine, SpeechRequest
from omni_serve.serve.metrics import WorkerMetrics, metrics_response
from omni_serve.serve.protocol import (
    NDJSON_MEDIA_TYPE,
    AudioEvent,
    ErrorEvent,
    GenerateRequest,
    HealthResponse,
    HeartbeatRequest,
    ReadyResponse,
    RegisterWorkerRequest,
    StreamEvent,
    WorkerStatus,
)
from omni_serve.serve.requests import (
    RequestRefused,
    decode_audio,
    decode_history,
    is_reference_shape,
    parse_request,
    to_speech_request,
)
from omni_serve.serve.security import auth_headers, error_response, install_guards, token_refusal
from omni_serve.serve.settings import WorkerSettings
from omni_serve.serve.streams import REFERENCE_ERROR_CODE, compact_stream, reference_stream

log = logging.getLogger(__name__)
# Bodies up to this size (about 4 s of PCM16 speech) are parsed and decoded on the event loop: well
# under a millisecond, less than the hand-off to a thread costs. Bigger ones go to a thread.
INLINE_BYTES = 192 * 1024


class Slot:
    """One of the worker's concurrent-request places; released exactly once, whatever ends the request."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.held = True
        worker.in_flight += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.worker.in_flight -= 1


class SlotResponse(StreamingResponse):
    """A streaming response that gives its slot back even when the client leaves before the first byte."""

    def __init__(self, content: AsyncIterator[bytes], slot: Slot, media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-store"})
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()


@dataclass
class Worker:
    """Everything one worker app owns; built by `create_app`."""

    settings: WorkerSettings
    engine: Engine
    in_flight: int = 0
    registered: bool = False
    metrics: WorkerMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = WorkerMetrics(self._live_gauges)
        self.limits = AudioLimits(max_seconds=self.settings.max_audio_seconds)

    @property
    def model_name(self) -> str:
        return self.settings.model_name or self.engine.model_name

    @property
    def queue_length(self) -> int:
        """Requests this worker holds: streaming, or queued in the engine (which settles a step after a cancel)."""
        return max(self.in_flight, self.engine.queue_length)

    def status(self) -> WorkerStatus:
        return WorkerStatus(model_names=[self.model_name], speed=1, queue_length=self.queue_length)

    def _live_gauges(self) -> dict:
        return {
            "omni_worker_in_flight": ("requests holding a concurrency slot", {(): float(self.in_flight)}, ()),
            "omni_worker_queue_length": ("requests streaming or queued in the engine",
                                         {(): float(self.queue_length)}, ()),
            "omni_worker_concurrency_limit": ("slots before 503", {(): float(self.settings.limit_concurrency)}, ()),
            "omni_worker_registered": ("1 while the controller knows this worker", {(): float(self.registered)}, ()),
        }


def create_app(settings: WorkerSettings, engine: Engine) -> FastAPI:
    """A worker app around an already loaded engine (load it first, so a bad model fails at start-up)."""
    worker = Worker(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_registered(worker)) if settings.controller_url else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    app = FastAPI(title="omni_serve worker", lifespan=lifespan)
    app.state.worker = worker
    install_guards(app, settings.max_body_bytes)
    metrics = worker.metrics

    def refuse(status: int, code: str, message: str, reference: bool = False,
               headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.errors.labels(code).inc()
        if not reference:
            return error_response(status, code, message, headers)
        # The reference's client reads a JSON object with text and error_code from any answer.
        body = {"text": message, "error_code": REFERENCE_ERROR_CODE, "code": code, "message": message}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request) -> Response:
        if (answer := token_refusal(request, settings.token)) is not None:
            metrics.errors.labels("unauthorized").inc()
            return answer
        if worker.in_flight >= settings.limit_concurrency:
            return refuse(503, "busy", f"the worker is busy ({worker.in_flight} requests); retry shortly",
                          headers={"Retry-After": str(settings.retry_after_s)})
        arrived = time.perf_counter()
        slot = Slot(worker)
        try:
            body = await request.body()
            if len(body) <= INLINE_BYTES:
                generate = parse_request(body)
            else:
                generate = await asyncio.to_thread(parse_request, body)
            if len(body) <= INLINE_BYTES and not needs_decoder(generate):
                speech = prepare_speech(worker, generate)
            else:
                speech = await asyncio.to_thread(prepare_speech, worker, generate)
        except RequestRefused as exc:
            slot.release()
            return refuse(exc.status, exc.code, exc.message, exc.reference)
        except BaseException:
            slot.release()
            raise
        shape = "reference" if is_reference_shape(generate) else "compact"
        metrics.requests.labels(shape).inc()

        heard = False

        def observe(event: StreamEvent) -> None:
            nonlocal heard
            if isinstance(event, AudioEvent) and not heard:
                heard = True
                metrics.first_audio.observe(time.perf_counter() - arrived)
            elif isinstance(event, ErrorEvent):
                metrics.errors.labels(event.code).inc()

        events = engine.agenerate(speech)
        if shape == "reference":
            content = reference_stream(events, generate.prompt, generate.stop, observe)
            return SlotResponse(content, slot, media_type="application/octet-stream")
        return SlotResponse(compact_stream(events, settings.address, observe), slot, media_type=NDJSON_MEDIA_TYPE)

    @app.api_route("/worker_get_status", methods=["GET", "POST"], response_model=WorkerStatus)
    async def worker_get_status() -> WorkerStatus:
        return worker.status()

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse()

    @app.get("/ready", response_model=ReadyResponse)
    async def ready() -> ReadyResponse:
        return ReadyResponse(ready=True, models=[worker.model_name], workers=1,
                             detail="registered" if worker.registered else "model loaded")

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return metrics_response(metrics.registry)

    return app


def prepare(worker: Worker, body: bytes) -> tuple[GenerateRequest, SpeechRequest]:
    """Parse, check the model name, decode the audio (what the endpoint does, in one call)."""
    generate = parse_request(body)
    return generate, prepare_speech(worker, generate)


def needs_decoder(generate: GenerateRequest) -> bool:
    """Encoded files may go through ffmpeg (tens of ms): never on the event loop."""
    return generate.audio_b64 is not None or any(turn.audio_b64 for turn in generate.history)


def prepare_speech(worker: Worker, generate: GenerateRequest) -> SpeechRequest:
    """Check the model name and decode the audio into the engine's request, or raise RequestRefused."""
    reference = is_reference_shape(generate)
    try:
        if generate.model is not None and generate.model != worker.model_name:
            raise RequestRefused(404, "unknown_model",
                                 f"this worker serves {worker.model_name!r}, not {generate.model!r}")
        audio = decode_audio(generate, worker.limits)
        history = decode_history(generate, worker.limits)
        # The reference's clients vocode the units themselves; making audio for them would be wasted work.
        return to_speech_request(generate, audio, history, vocode=generate.vocode and not reference)
    except RequestRefused as exc:
        exc.reference = reference
        raise


async def keep_registered(worker: Worker) -> None:
    """Register, then beat every interval; register again whenever the controller forgets this worker.

    While the controller cannot be reached the worker retries four times per interval, so a restarted
    controller lists it again within one heartbeat interval of coming back.
    """
    settings = worker.settings
    interval = settings.heartbeat_interval_s
    url = settings.controller_url.rstrip("/")
    headers = auth_headers(settings.token)
    reported = None  # the last problem logged, so a long outage logs once, not every retry
    async with httpx.AsyncClient(timeout=max(1.0, min(10.0, interval)), trust_env=False, headers=headers) as http:
        while True:
            try:
                if not worker.registered:
                    request = RegisterWorkerRequest(worker_name=settings.address, worker_status=worker.status())
                    response = await http.post(f"{url}/register_worker", json=request.model_dump(mode="json"))
                    if response.status_code in (401, 403):
                        problem = f"the controller refused registration: {response.text}"
                        if problem != reported:
                            log.error(problem)
                            reported = problem
                        await asyncio.sleep(interval)
                        continue
                    response.raise_for_status()
                    worker.registered = True
                    reported = None
                    log.info("registered at %s as %s", url, settings.address)
                else:
                    beat = HeartbeatRequest(worker_name=settings.address, queue_length=worker.queue_length)
                    response = await http.post(f"{url}/receive_heart_beat", json=beat.model_dump(mode="json"))
                    response.raise_for_status()
                    if not response.json().get("exist", False):
                        log.info("the controller forgot this worker; registering again")
                        worker.registered = False
                        continue
                await asyncio.sleep(interval)
            except (httpx.HTTPError, ValueError) as exc:
                worker.registered = False
                problem = f"controller {url} unreachable ({type(exc).__name__}); retrying"
                if problem != reported:
                    log.warning(problem)
                    reported = problem
                await asyncio.sleep(max(0.05, interval / 4))
