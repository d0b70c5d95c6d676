"""Warm-up: short requests through every stage before a worker takes traffic.

The first request after loading pays one-off costs: memory pools growing, first-call paths in
Whisper, the LLM, the unit decoder and the vocoder, and on a GPU kernel selection and lazy loading
of CUDA modules. Measured: with omni-smol on a 2-core CPU the first request's audio came 0.65 s after
the next one's (1.62 s vs 0.96 s, nearly all in the speech front end); on an H200 a cold decode took
seconds. A worker warms up before it reports ready, so no user pays this.

The model answers a typed question first; its spoken answer (when it has a vocoder) is then the
speech input of the second request, so the front end hears speech rather than silence, which a
no-speech rule could refuse before the costly part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from omni_serve.engine.engine import Engine
from omni_serve.engine.events import AudioChunk, ErrorEvent
from omni_serve.engine.options import GenerationOptions, SpeechRequest
from omni_serve.model.audio import SAMPLE_RATE, prepare_waveform

WARM_UP_QUESTION = "Hello! What can you tell me about the weather?"
FALLBACK_SECONDS = 1.0  # quiet noise, for a model without a vocoder


@dataclass(frozen=True)
class WarmUp:
    """What the warm-up did: seconds spent, and each request's error (None when it answered)."""

    seconds: float
    text_error: str | None
    speech_error: str | None


def warm_up(engine: Engine, max_new_tokens: int = 16) -> WarmUp:
    """Run a typed and a spoken request through `engine` and drop their answers (nothing is kept: no
    conversation id). Errors are reported, not raised: a model that refuses the warm-up input still
    serves, only colder."""
    began = time.perf_counter()
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    text_error, spoken = _answer(engine, SpeechRequest(None, options, text=WARM_UP_QUESTION))
    if spoken.size == 0:
        spoken = np.random.default_rng(0).normal(0.0, 0.01, int(FALLBACK_SECONDS * SAMPLE_RATE)).astype(np.float32)
    elif engine.sample_rate != SAMPLE_RATE:
        spoken = prepare_waveform(spoken, engine.sample_rate)
    speech_error, _ = _answer(engine, SpeechRequest(spoken, options))
    return WarmUp(seconds=time.perf_counter() - began, text_error=text_error, speech_error=speech_error)


def _answer(engine: Engine, request: SpeechRequest) -> tuple[str | None, np.ndarray]:
    """The request's error message (None if it finished) and the audio it produced."""
    error, pieces = None, []
    for event in engine.generate(request):
        if isinstance(event, AudioChunk):
            pieces.append(event.samples)
        elif isinstance(event, ErrorEvent):
            error = event.message
    return error, np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
