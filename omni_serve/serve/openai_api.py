"""OpenAI-compatible speech chat API: `/v1/models` and `/v1/chat/completions` with audio in and out.

Code written for OpenAI's chat completions audio API works unchanged against us. The router turns
an OpenAI request into our GenerateRequest (earlier turns become `history`), streams the worker's
events through a backend, and answers in OpenAI's shapes: one JSON completion, or server-sent
chunks with transcript and base64 PCM16 audio deltas ending in `data: [DONE]`.

Notes for users: the `voice` is accepted and ignored (a model speaks in its vocoder's one voice);
system messages are ignored (LLaMA-Omni models were trained with their own system prompt);
streamed audio is always PCM16 (16 kHz mono), as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import soundfile
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omni_serve.serve.protocol import (
    AudioEvent,
    ErrorEvent,
    FinalEvent,
    GenerateRequest,
    HistoryTurn,
    Seed,
    StreamEvent,
    TextEvent,
)
from omni_serve.serve.validation import validation_message

AUDIO_LIFETIME_S = 3600
DISCONNECT_POLL_S = 0.25  # how often a collected (non-streamed) answer checks that its client is still there
OUTPUT_FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", None), "opus": ("OGG", "OPUS")}
ERROR_STATUS = {"bad_audio": 400, "bad_request": 400, "context_full": 400, "too_long": 413, "unknown_model": 404,
                "no_worker": 503, "busy": 503, "worker_failed": 502, "unauthorized": 401, "cancelled": 499,
                "internal": 500}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              413: "invalid_request_error"}


class AudioOptions(BaseModel):
    format: Literal["wav", "pcm16", "flac", "mp3", "opus"] = "wav"
    voice: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class InputAudio(BaseModel):
    data: str = Field(min_length=1, description="base64 of the audio file")
    format: str | None = None  # informative: the worker recognises the format itself


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class AssistantAudio(BaseModel):
    """An earlier answer's audio, named by its id (or carrying its transcript)."""

    id: str | None = None
    transcript: str | None = None


KNOWN_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TOOL_ROLES = frozenset({"tool", "function"})


class Message(BaseModel):
    """One chat message; fields this API does not use (name, ...) are accepted and ignored, tool calls refused."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[Annotated[TextPart | AudioPart, Field(discriminator="type")]] | None = None
    audio: AssistantAudio | None = None


class ChatCompletionRequest(BaseModel):
    model: str
    messages: list[Message]
    modalities: list[Literal["text", "audio"]] = Field(default_factory=lambda: ["text"])
    audio: AudioOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    seed: Seed | None = None
    n: Literal[1] = Field(1, description="one choice per request: several would each need a generation")
    # Named so that a request relying on them is refused rather than answered as if they were not there.
    tools: list[Any] | None = None
    functions: list[Any] | None = None


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        # OpenAI's client paces its retries of a 503 by Retry-After, as the worker's own 503 says.
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(status_code=self.status, content=error_body(self.status, self.message, self.code, self.param),
                            headers=headers)


def error_status(event: ErrorEvent) -> int:
    """The HTTP status a worker or client error maps to (the event's own when it carries one)."""
    return getattr(event, "status", None) or ERROR_STATUS.get(event.code, 500)


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPE.get(status, "server_error"), "param": param, "code": code}}


@dataclass
class ChatBackend:
    """Where requests go: the list of served models, and a stream of worker events for one request."""

    list_models: Callable[[], Awaitable[list[str]]]
    stream: Callable[[GenerateRequest], AsyncIterator[StreamEvent]]
    token: str | None = None


class TranscriptStore:
    """Recent answers by audio id, so a later request can refer to `{"role": "assistant", "audio": {"id": ...}}`."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self.items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def put(self, audio_id: str, transcript: str, expires_at: float) -> None:
        self.items[audio_id] = (expires_at, transcript)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, audio_id: str) -> str | None:
        entry = self.items.get(audio_id)
        if entry is None or entry[0] < time.time():
            return None
        return entry[1]


def to_generate_request(body: ChatCompletionRequest, transcripts: TranscriptStore) -> GenerateRequest:
    """Translate OpenAI messages: alternating user/assistant turns, the last one from the user.

    System and developer messages are left out (LLaMA-Omni models keep the system prompt they were
    trained with); anything about tools is refused: these models cannot call them, and an answer that
    silently skipped a tool's result would look right and be wrong.
    """
    if body.tools or body.functions:
        raise OpenAIError(400, "tools are not supported: this model answers in speech and text only",
                          "unsupported_parameter", "tools" if body.tools else "functions")
    for message in body.messages:
        if message.role not in KNOWN_ROLES:
            raise OpenAIError(400, f"unknown message role {message.role!r}; this API takes system, developer, "
                              "user and assistant messages", "invalid_messages", "messages")
        if message.role in TOOL_ROLES or getattr(message, "tool_calls", None) or getattr(message, "function_call", None):
            raise OpenAIError(400, "tool calls and tool results are not supported: this model cannot call tools",
                              "unsupported_parameter", "messages")
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user":
        raise OpenAIError(400, "the last message must come from the user", "invalid_messages", "messages")
    history: list[HistoryTurn] = []
    for index in range(0, len(turns) - 1, 2):
        user, assistant = turns[index], turns[index + 1]
        if user.role != "user" or assistant.role != "assistant":
            raise OpenAIError(400, "messages must alternate between user and assistant", "invalid_messages", "messages")
        audio_b64, text = _user_parts(user)
        history.append(HistoryTurn(answer=_assistant_text(assistant, transcripts), audio_b64=audio_b64, text=text))
    if len(turns) % 2 == 0:
        raise OpenAIError(400, "messages must alternate between user and assistant", "invalid_messages", "messages")
    audio_b64, text = _user_parts(turns[-1])
    options: dict[str, Any] = {name: value for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty")
                               if (value := getattr(body, name)) is not None}
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        options["max_new_tokens"] = min(limit, 4096)
    return GenerateRequest(model=body.model, audio_b64=audio_b64, text=text, history=history, seed=body.seed,
                           vocode="audio" in body.modalities, **options)


def _user_parts(message: Message) -> tuple[str | None, str | None]:
    if isinstance(message.content, str):
        return None, message.content
    parts = message.content or []
    audio = [part.input_audio.data for part in parts if isinstance(part, AudioPart)]
    texts = [part.text for part in parts if isinstance(part, TextPart)]
    if len(audio) > 1:
        raise OpenAIError(400, "one input_audio part per message is supported", "invalid_audio", "messages")
    return (audio[0] if audio else None), ("\n".join(texts) if texts else None)


def _assistant_text(message: Message, transcripts: TranscriptStore) -> str:
    if isinstance(message.content, str) and message.content:
        return message.content
    if isinstance(message.content, list):
        text = "".join(part.text for part in message.content if isinstance(part, TextPart))
        if text:
            return text
    audio = message.audio or AssistantAudio()
    if audio.transcript:
        return audio.transcript
    if audio.id:
        transcript = transcripts.get(audio.id)
        if transcript is None:
            raise OpenAIError(400, f"audio {audio.id!r} is unknown or expired", "audio_not_found", "messages")
        return transcript
    raise OpenAIError(400, "an assistant message needs content or audio", "invalid_messages", "messages")


def encode_audio(pcm16: bytes, sample_rate: int, fmt: str) -> bytes:
    """The answer's PCM16 samples in the requested container."""
    if fmt == "pcm16":
        return pcm16
    container, subtype = OUTPUT_FORMATS[fmt]
    samples = np.frombuffer(pcm16, dtype="<i2")
    if fmt == "opus":  # Ogg Opus takes 8/12/16/24/48 kHz; our 16 kHz is fine
        samples = samples.astype(np.float32) / 32768.0
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format=container, subtype=subtype)
    return buffer.getvalue()


def create_openai_router(backend: ChatBackend) -> APIRouter:
    """Routes for `/v1/models` and `/v1/chat/completions`, answered through `backend`."""
    router = APIRouter(prefix="/v1")
    transcripts = TranscriptStore()

    def check_key(authorization: str | None) -> None:
        if backend.token and authorization != f"Bearer {backend.token}":
            raise OpenAIError(401, "invalid or missing API key (use the serving token)", "invalid_api_key")

    @router.get("/models")
    async def models(authorization: str | None = Header(None)) -> JSONResponse:
        try:
            check_key(authorization)
        except OpenAIError as exc:
            return exc.response()
        names = await backend.list_models()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "omni_serve"} for name in names]})

    @router.post("/chat/completions")
    async def chat_completions(request: Request, authorization: str | None = Header(None)):
        try:
            check_key(authorization)
            try:
                data = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OpenAIError(400, f"invalid request: the body is not JSON ({exc})", "invalid_request") from exc
            try:
                body = ChatCompletionRequest.model_validate(data)
            except ValidationError as exc:
                message, param = validation_message(exc, data)
                raise OpenAIError(400, message, "invalid_request", param) from exc
            generate = to_generate_request(body, transcripts)
            events = backend.stream(generate)
            first = await anext(events, None)
            if first is None:
                raise OpenAIError(502, "the worker closed the stream without an answer", "worker_failed")
            if isinstance(first, ErrorEvent):
                raise OpenAIError(error_status(first), first.message, first.code)
        except OpenAIError as exc:
            return exc.response()
        completion = _Completion(body, transcripts)
        if body.stream:
            return StreamingResponse(completion.sse(first, events), media_type="text/event-stream")
        try:
            return JSONResponse(await unless_client_leaves(request, completion.collect(first, events), events))
        except OpenAIError as exc:
            return exc.response()

    return router


class _Completion:
    """Builds one answer's OpenAI objects from worker events."""

    def __init__(self, body: ChatCompletionRequest, transcripts: TranscriptStore) -> None:
        self.body = body
        self.transcripts = transcripts
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.audio_id = f"audio_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.expires_at = self.created + AUDIO_LIFETIME_S
        self.wants_audio = "audio" in body.modalities
        self.format = (body.audio or AudioOptions()).format

    async def collect(self, first: StreamEvent, events: AsyncIterator[StreamEvent]) -> dict:
        pcm, text, sample_rate, final = bytearray(), [], 16000, None
        async for event in _chain(first, events):
            if isinstance(event, TextEvent):
                text.append(event.text)
            elif isinstance(event, AudioEvent):
                pcm += base64.b64decode(event.pcm16)
                sample_rate = event.sample_rate
            elif isinstance(event, FinalEvent):
                final = event
            elif isinstance(event, ErrorEvent):
                raise OpenAIError(error_status(event), event.message, event.code)
        if final is None:
            raise OpenAIError(502, "the worker stopped before the answer was complete", "worker_failed")
        transcript = final.text
        message: dict[str, Any] = {"role": "assistant", "content": None if self.wants_audio else transcript,
                                   "refusal": None}
        if self.wants_audio:
            self.transcripts.put(self.audio_id, transcript, self.expires_at)
            data = base64.b64encode(encode_audio(bytes(pcm), sample_rate, self.format)).decode()
            message["audio"] = {"id": self.audio_id, "data": data, "expires_at": self.expires_at,
                                "transcript": transcript}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.body.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": "stop" if final.stopped_on_eos else "length"}],
                "usage": self._usage(final)}

    async def sse(self, first: StreamEvent, events: AsyncIterator[StreamEvent]) -> AsyncIterator[bytes]:
        yield self._chunk({"role": "assistant", "content": None if self.wants_audio else ""})
        async for event in _chain(first, events):
            if isinstance(event, TextEvent):
                if self.wants_audio:
                    yield self._chunk({"audio": {"id": self.audio_id, "transcript": event.text}})
                else:
                    yield self._chunk({"content": event.text})
            elif isinstance(event, AudioEvent) and self.wants_audio:
                yield self._chunk({"audio": {"id": self.audio_id, "data": event.pcm16}})
            elif isinstance(event, FinalEvent):
                if self.wants_audio:
                    self.transcripts.put(self.audio_id, event.text, self.expires_at)
                    yield self._chunk({"audio": {"id": self.audio_id, "expires_at": self.expires_at}})
                yield self._chunk({}, "stop" if event.stopped_on_eos else "length", self._usage(event))
                break
            elif isinstance(event, ErrorEvent):
                body = error_body(error_status(event), event.message, event.code)
                yield f"data: {json.dumps(body)}\n\n".encode()
                break
        yield b"data: [DONE]\n\n"

    def _chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.body.model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if usage is not None:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n".encode()

    @staticmethod
    def _usage(final: FinalEvent) -> dict:
        prompt = int(final.timings.get("prompt_positions", 0))
        completion = len(final.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def unless_client_leaves(request: Request, answer: Awaitable[dict], events: AsyncIterator[StreamEvent]) -> dict:
    """The collected answer; if the client leaves first, the worker's stream is closed, which cancels it.

    A streamed answer stops when its response can no longer be sent; a collected one sends nothing
    until the end, so the client's leaving is watched for here.
    """
    task = asyncio.ensure_future(answer)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise OpenAIError(499, "the client closed the request", "cancelled")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await events.aclose()


async def _chain(first: StreamEvent, rest: AsyncIterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
    yield first
    async for event in rest:
        yield event
