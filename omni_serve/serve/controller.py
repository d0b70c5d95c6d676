"""The controller: knows which workers serve which model and hands out the one that should answer next.

It speaks the FastChat-family endpoints LLaMA-Omni's clients use (`/register_worker`,
`/receive_heart_beat`, `/list_models`, `/get_worker_address`, `/refresh_all_workers`,
`/worker_get_status`), plus `/health`, `/ready`, `/metrics`, `/list_workers` and
`/report_worker_failure`, through which a client that lost a worker mid-stream gets it dropped at once
(after the controller checked for itself) instead of after the heartbeat expiry. The OpenAI-style API
(`/v1/models`, `/v1/chat/completions`, `omni_serve.serve.openai_api`) is mounted here too, so one URL
serves every kind of client.
The controller never imports torch: it starts in a second and can run on a machine without a GPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from omni_serve.serve.client import ServeClient
from omni_serve.serve.metrics import ControllerMetrics, metrics_response
from omni_serve.serve.openai_api import ChatBackend, create_openai_router
from omni_serve.serve.protocol import (
    HealthResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    ListModelsResponse,
    ListWorkersResponse,
    ReadyResponse,
    RegisterWorkerRequest,
    RegisterWorkerResponse,
    WorkerAddressRequest,
    WorkerAddressResponse,
    WorkerEntry,
    WorkerFailureReport,
    WorkerFailureResponse,
    WorkerStatus,
)
from omni_serve.serve.registry import WorkerInfo, WorkerRegistry
from omni_serve.serve.security import (
    AddressRefused,
    check_worker_address,
    error_response,
    install_guards,
    token_refusal,
)
from omni_serve.serve.settings import ControllerSettings

log = logging.getLogger(__name__)


@dataclass
class Controller:
    """Everything one controller app owns; built by `create_app`, never shared between apps."""

    settings: ControllerSettings
    registry: WorkerRegistry = field(init=False)
    metrics: ControllerMetrics = field(init=False)
    http: httpx.AsyncClient | None = None  # the controller's own calls to workers; made at start-up
    gateway: ServeClient | None = None  # streams for the OpenAI-style API; made at start-up

    def __post_init__(self) -> None:
        self.registry = WorkerRegistry(self.settings.heartbeat_expiry_s, on_expire=self._expired)
        self.metrics = ControllerMetrics(self._live_gauges)

    def _expired(self, info: WorkerInfo) -> None:
        log.info("worker %s stopped beating; dropped", info.name)
        self.metrics.removals.labels("expired").inc()

    def _live_gauges(self) -> dict:
        workers = self.registry.live()
        return {
            "omni_controller_workers": ("live registered workers", {(): float(len(workers))}, ()),
            "omni_controller_worker_queue_length": (
                "requests queued or running at each worker (last heartbeat + dispatches since)",
                {(info.name,): float(info.queue_length) for info in workers}, ("worker",)),
        }

    async def worker_status(self, address: str) -> WorkerStatus:
        response = await self.http.post(f"{address}/worker_get_status")
        response.raise_for_status()
        return WorkerStatus.model_validate(response.json())

    async def worker_alive(self, address: str) -> bool:
        try:
            response = await self.http.get(f"{address}/health")
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def dispatch(self, model: str, conversation_id: str | None = None) -> str:
        """The address of the worker that should answer next ("" when none serves `model`)."""
        chosen = self.registry.choose(model, self.settings.dispatch, conversation_id)
        self.metrics.dispatches.labels(model, "ok" if chosen else "no_worker").inc()
        return chosen.name if chosen else ""

    async def drop_if_dead(self, address: str) -> bool:
        """Drop a worker someone lost, if it really does not answer its health check; True when dropped."""
        if address not in self.registry.workers or await self.worker_alive(address):
            return False
        self.registry.remove(address)
        self.metrics.removals.labels("failed").inc()
        log.warning("worker %s reported failed and does not answer; dropped", address)
        return True


class RegistryClient(ServeClient):
    """The shared client, with its controller calls answered by this controller's own registry.

    Serves the OpenAI-style API mounted on the controller: same dispatch, retries and error events as
    any client, without HTTP calls from the controller to itself.
    """

    def __init__(self, controller: Controller) -> None:
        super().__init__(f"http://{controller.settings.host}:{controller.settings.port}", controller.settings.token)
        self.controller = controller

    async def list_models(self) -> list[str]:
        return self.controller.registry.models()

    async def worker_address(self, model: str, conversation_id: str | None = None) -> str:
        return self.controller.dispatch(model, conversation_id)

    async def report_failure(self, address: str) -> bool:
        return await self.controller.drop_if_dead(address)


def create_app(settings: ControllerSettings) -> FastAPI:
    """A controller app; run it with uvicorn (see `serve()`), or drive it in-process in tests."""
    controller = Controller(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=settings.probe_timeout_s, trust_env=False) as http:
            controller.http = http
            async with RegistryClient(controller) as gateway:
                controller.gateway = gateway
                yield

    app = FastAPI(title="omni_serve controller", lifespan=lifespan)
    app.state.controller = controller
    install_guards(app, settings.max_body_bytes, per_prefix=(("/v1/", settings.max_api_body_bytes),))
    if settings.openai_api:
        backend = ChatBackend(list_models=lambda: controller.gateway.list_models(),
                              stream=lambda request: controller.gateway.stream(request), token=settings.token)
        app.include_router(create_openai_router(backend))
    registry, metrics = controller.registry, controller.metrics

    def refused(request: Request) -> JSONResponse | None:
        answer = token_refusal(request, settings.token)
        if answer is not None:
            metrics.errors.labels("unauthorized").inc()
        return answer

    @app.post("/register_worker", response_model=RegisterWorkerResponse)
    async def register_worker(body: RegisterWorkerRequest, request: Request) -> Response | RegisterWorkerResponse:
        if (answer := refused(request)) is not None:
            metrics.registrations.labels("unauthorized").inc()
            return answer
        try:
            address = check_worker_address(body.worker_name, settings.allowed_worker_hosts)
        except AddressRefused as exc:
            log.warning("refused registration: %s", exc)
            metrics.registrations.labels("forbidden").inc()
            return error_response(403, "forbidden", str(exc))
        status = body.worker_status
        if status is None:  # the reference's workers always send it; ask the worker otherwise
            try:
                status = await controller.worker_status(address)
            except (httpx.HTTPError, ValueError) as exc:
                metrics.registrations.labels("unreachable").inc()
                return error_response(400, "unreachable", f"could not read the worker's status at {address}: {exc}")
        registry.register(address, status, body.check_heart_beat)
        metrics.registrations.labels("ok").inc()
        log.info("registered worker %s serving %s", address, status.model_names)
        return RegisterWorkerResponse(registered=True)

    @app.post("/receive_heart_beat", response_model=HeartbeatResponse)
    async def receive_heart_beat(body: HeartbeatRequest, request: Request) -> Response | HeartbeatResponse:
        if (answer := refused(request)) is not None:
            return answer
        try:
            address = check_worker_address(body.worker_name, settings.allowed_worker_hosts)
        except AddressRefused:
            return HeartbeatResponse(exist=False)
        return HeartbeatResponse(exist=registry.heartbeat(address, body.queue_length))

    @app.api_route("/list_models", methods=["GET", "POST"], response_model=ListModelsResponse)
    async def list_models() -> ListModelsResponse:
        return ListModelsResponse(models=registry.models())

    @app.get("/list_workers", response_model=ListWorkersResponse)
    async def list_workers() -> ListWorkersResponse:
        now = registry.clock()
        return ListWorkersResponse(workers=[
            WorkerEntry(name=info.name, model_names=info.model_names, speed=info.speed,
                        queue_length=info.queue_length, seconds_since_beat=round(now - info.last_beat, 3))
            for info in registry.live()])

    @app.post("/get_worker_address", response_model=WorkerAddressResponse)
    async def get_worker_address(body: WorkerAddressRequest) -> WorkerAddressResponse:
        return WorkerAddressResponse(address=controller.dispatch(body.model, body.conversation_id))

    @app.post("/refresh_all_workers", response_model=ListModelsResponse)
    async def refresh_all_workers() -> ListModelsResponse:
        """Ask every worker for its status again; drop the ones that do not answer."""
        workers = registry.live()
        results = await asyncio.gather(*(controller.worker_status(info.name) for info in workers),
                                       return_exceptions=True)
        for info, result in zip(workers, results):
            if isinstance(result, WorkerStatus):
                info.model_names, info.queue_length = result.model_names, result.queue_length
                info.speed = max(1, result.speed)
            elif registry.remove(info.name) is not None:
                log.info("worker %s did not answer a refresh; dropped", info.name)
                metrics.removals.labels("refresh").inc()
        return ListModelsResponse(models=registry.models())

    @app.api_route("/worker_get_status", methods=["GET", "POST"], response_model=WorkerStatus)
    async def worker_get_status() -> WorkerStatus:
        workers = registry.live()
        return WorkerStatus(model_names=registry.models(), speed=sum(info.speed for info in workers),
                            queue_length=sum(info.queue_length for info in workers))

    @app.post("/report_worker_failure", response_model=WorkerFailureResponse)
    async def report_worker_failure(body: WorkerFailureReport, request: Request) -> Response | WorkerFailureResponse:
        """A client lost this worker; drop it if it really does not answer its health check."""
        if (answer := refused(request)) is not None:
            return answer
        try:
            address = check_worker_address(body.worker_name, settings.allowed_worker_hosts)
        except AddressRefused:
            return WorkerFailureResponse(removed=False)
        return WorkerFailureResponse(removed=await controller.drop_if_dead(address))

    @app.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        return HealthResponse()

    @app.get("/ready", response_model=ReadyResponse)
    async def ready() -> JSONResponse:
        workers = registry.live()
        body = ReadyResponse(ready=bool(workers), models=registry.models(), workers=len(workers),
                             detail="" if workers else "no worker registered yet")
        return JSONResponse(body.model_dump(), status_code=200 if workers else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return metrics_response(metrics.registry)

    return app
