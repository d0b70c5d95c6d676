"""Turning a `GenerateRequest` off the wire into the engine's `SpeechRequest`, refusing what cannot be answered.

This runs before the worker starts streaming, so a bad upload gets an HTTP error with a clear message
(400 bad audio, 413 too long, 404 unknown model) instead of a 200 stream that fails at its first line.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np
from pydantic import ValidationError

from omni_serve.engine import (
    SAMPLE_RATE,
    AudioError,
    AudioLimits,
    AudioTooLongError,
    GenerationOptions,
    PastTurn,
    SpeechRequest,
    load_audio,
    pcm16_to_float,
    prepare_waveform,
)
from omni_serve.serve.protocol import GenerateRequest
from omni_serve.serve.validation import validation_message


class RequestRefused(Exception):
    """A request the worker answers with an HTTP error before any streaming."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reference = False  # answer in the reference's error shape (the request was in its shape)


def parse_request(body: bytes) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # pydantic's own error then says the JSON is invalid
        raise RequestRefused(400, "bad_request", validation_message(exc, data)[0]) from exc


def is_reference_shape(request: GenerateRequest) -> bool:
    """The reference's clients send the audio as a JSON list of floats, and read the reference's stream."""
    return request.audio is not None


def decode_audio(request: GenerateRequest, limits: AudioLimits) -> np.ndarray | None:
    """16 kHz float32 samples from whichever of the three audio forms the request used (None: text only)."""
    forms = [name for name in ("audio_b64", "pcm16_b64", "audio") if getattr(request, name) is not None]
    if len(forms) > 1:
        raise RequestRefused(400, "bad_request", f"send one of audio_b64, pcm16_b64, audio, not {', '.join(forms)}")
    if not forms:
        if request.text:
            return None
        raise RequestRefused(400, "bad_request", "send speech (audio_b64, pcm16_b64 or audio) or text")
    try:
        if request.audio is not None:
            return prepare_waveform(np.asarray(request.audio, dtype=np.float32), SAMPLE_RATE, limits)
        if request.pcm16_b64 is not None:
            return prepare_waveform(pcm16_to_float(_b64("pcm16_b64", request.pcm16_b64)), request.sample_rate, limits)
        return load_audio(_b64("audio_b64", request.audio_b64), limits)
    except AudioTooLongError as exc:
        raise RequestRefused(413, "too_long", str(exc)) from exc
    except AudioError as exc:
        raise RequestRefused(400, "bad_audio", str(exc)) from exc


def decode_history(request: GenerateRequest, limits: AudioLimits) -> list[PastTurn]:
    """Earlier turns sent by a stateless client, their speech decoded like the request's own."""
    turns = []
    for index, turn in enumerate(request.history):
        audio = None
        if turn.audio_b64 is not None:
            try:
                audio = load_audio(_b64(f"history[{index}].audio_b64", turn.audio_b64), limits)
            except AudioTooLongError as exc:
                raise RequestRefused(413, "too_long", f"history turn {index}: {exc}") from exc
            except AudioError as exc:
                raise RequestRefused(400, "bad_audio", f"history turn {index}: {exc}") from exc
        turns.append(PastTurn(answer=turn.answer, audio=audio, text=turn.text))
    return turns


def to_speech_request(request: GenerateRequest, audio: np.ndarray | None, history: list[PastTurn],
                      vocode: bool) -> SpeechRequest:
    try:
        options = GenerationOptions(
            max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_p=request.top_p,
            frequency_penalty=request.frequency_penalty, presence_penalty=request.presence_penalty,
            seed=request.seed, first_chunk_units=request.first_chunk_units, chunk_units=request.chunk_units,
            vocode=vocode)
    except ValueError as exc:
        raise RequestRefused(400, "bad_request", str(exc)) from exc
    return SpeechRequest(audio=audio, options=options, conversation_id=request.conversation_id, prompt=request.prompt,
                         text=request.text, history=history)


def _b64(field: str, text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioError(f"{field} is not valid base64 ({exc})") from exc
