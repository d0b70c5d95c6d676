"""How the page reaches the models, behind one small interface so tests can hand the page a fake.

The page needs two things (`Gateway`): the registered models, and for a request an async stream of
protocol events that always ends in a `FinalEvent` or an `ErrorEvent` (transport failures included, with
a code the page turns into a plain message). `ControllerGateway` is the real one: a thin adapter over
`omni_serve.serve.client.ServeClient` (controller for a worker, the worker's NDJSON stream, failure
reports), with a fresh connection pool per call so it never outlives the event loop that made it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from omni_serve.serve.client import ServeClient
from omni_serve.serve.protocol import GenerateRequest, StreamEvent


class Gateway(Protocol):
    """What the page needs from the serving side."""

    async def list_models(self) -> list[str]:
        """Models some live worker serves, in the controller's order."""
        ...

    def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Events of one answer, ending with a FinalEvent or an ErrorEvent; closing it cancels the answer."""
        ...


class ControllerGateway:
    """The controller at `controller_url` and the workers it names."""

    def __init__(self, controller_url: str, token: str | None = None) -> None:
        self.controller_url = controller_url
        self.token = token

    async def list_models(self) -> list[str]:
        async with ServeClient(self.controller_url, self.token) as client:
            return await client.list_models()

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        async with ServeClient(self.controller_url, self.token) as client:
            async for event in client.stream(request):
                yield event
