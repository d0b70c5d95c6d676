"""The wire protocol between controller, workers and clients, defined once and used by every end.

Controller endpoints follow the FastChat family that LLaMA-Omni's clients speak. The worker streams
NDJSON events (one JSON object per line) in our compact shape, or, for requests in the reference's
shape, NUL-delimited JSON objects with the whole text and all units so far.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, TypeAdapter

# --- controller -----------------------------------------------------------------------------------


class WorkerStatus(BaseModel):
    model_names: list[str]
    speed: int = 1
    queue_length: int = 0


class RegisterWorkerRequest(BaseModel):
    worker_name: str  # the worker's base URL, e.g. http://127.0.0.1:21002
    check_heart_beat: bool = True
    worker_status: WorkerStatus | None = None


class HeartbeatRequest(BaseModel):
    worker_name: str
    queue_length: int = 0


class HeartbeatResponse(BaseModel):
    exist: bool


class ListModelsResponse(BaseModel):
    models: list[str]


class WorkerAddressRequest(BaseModel):
    model: str
    # Turns of one conversation go to the same worker while it lives (its engine holds the history).
    conversation_id: str | None = None


class WorkerAddressResponse(BaseModel):
    address: str  # "" when no worker serves the model


class WorkerEntry(BaseModel):
    name: str
    model_names: list[str]
    speed: int
    queue_length: int
    seconds_since_beat: float


class ListWorkersResponse(BaseModel):
    workers: list[WorkerEntry]


class RegisterWorkerResponse(BaseModel):
    registered: bool


class WorkerFailureReport(BaseModel):
    """A client tells the controller it lost a worker; the controller checks before it drops it."""

    worker_name: str


class WorkerFailureResponse(BaseModel):
    removed: bool


# --- both -----------------------------------------------------------------------------------------


class HealthResponse(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"] = "ok"


class ReadyResponse(BaseModel):
    """Readiness: the controller has a worker / the worker has its model (503 with ready=false otherwise)."""

    ready: bool
    models: list[str] = []
    workers: int = 0
    detail: str = ""


class ErrorBody(BaseModel):
    """The JSON body of every HTTP error answer (4xx/5xx) from the controller and the worker."""

    code: str  # unauthorized, forbidden, too_large, too_long, bad_audio, bad_request, unknown_model, busy
    message: str


# --- worker ---------------------------------------------------------------------------------------


class HistoryTurn(BaseModel):
    """An earlier exchange sent by a stateless client (e.g. the OpenAI API): user speech and/or text, and the answer."""

    answer: str
    audio_b64: str | None = None
    text: str | None = None


# What torch.Generator.manual_seed takes; a larger seed is a 400, not a worker failure.
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]


class GenerateRequest(BaseModel):
    """One user turn. Audio comes in exactly one of three forms.

    - `audio_b64`: an encoded audio file (wav, mp3, webm, ...), base64.
    - `pcm16_b64` + `sample_rate`: raw little-endian 16-bit mono PCM, base64 (a quarter of the JSON floats' bytes).
    - `audio`: a JSON list of float samples at 16 kHz (the reference client's shape; `prompt` then holds the
      whole prompt text with a `<speech>` placeholder, and the answer comes in the reference's stream shape).
    """

    model: str | None = None
    audio_b64: str | None = None
    pcm16_b64: str | None = None
    sample_rate: int = 16000
    audio: list[float] | None = None
    prompt: str | None = None
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    max_new_tokens: int = Field(256, ge=1, le=4096)
    stop: str | None = None
    seed: Seed | None = None
    conversation_id: str | None = None
    text: str | None = None  # typed text beside the speech, or instead of it
    history: list[HistoryTurn] = Field(default_factory=list)
    first_chunk_units: int = Field(10, ge=1, le=500)
    chunk_units: int = Field(40, ge=1, le=500)
    vocode: bool = True


class TextEvent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class UnitsEvent(BaseModel):
    type: Literal["units"] = "units"
    units: list[int]


class AudioEvent(BaseModel):
    type: Literal["audio"] = "audio"
    pcm16: str  # base64 little-endian 16-bit mono PCM
    sample_rate: int


class FinalEvent(BaseModel):
    type: Literal["final"] = "final"
    text: str
    token_ids: list[int]
    units: list[int]
    stopped_on_eos: bool
    timings: dict
    conversation_id: str | None = None
    worker: str | None = None


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    message: str
    code: str  # bad_audio, too_long, context_full, unknown_model, busy, cancelled, worker_failed, internal
    # Set by the client helper when the error was an HTTP answer (401, 404, 413, 503 ...), so a gateway
    # can pass it on; absent for errors inside a stream.
    status: int | None = None
    retry_after: float | None = None


StreamEvent = TextEvent | UnitsEvent | AudioEvent | FinalEvent | ErrorEvent
STREAM_EVENT: TypeAdapter[StreamEvent] = TypeAdapter(Annotated[StreamEvent, Field(discriminator="type")])
NDJSON_MEDIA_TYPE = "application/x-ndjson"


def parse_event(line: str | bytes) -> StreamEvent:
    """One NDJSON line of a worker's stream as its event model."""
    return STREAM_EVENT.validate_json(line)


class ReferenceChunk(BaseModel):
    """The reference worker's stream object: whole text so far (prompt + answer), all units so far."""

    text: str
    unit: str = ""
    error_code: int = 0


REFERENCE_DELIMITER = b"\0"
