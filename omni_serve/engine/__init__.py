"""The engine: requests in, streams of text, unit and audio events out. Serving code uses only this."""

from omni_serve.engine.engine import Engine
from omni_serve.engine.events import AudioChunk, ErrorEvent, Event, Finished, TextDelta, Timings, UnitChunk
from omni_serve.engine.options import GenerationOptions, PastTurn, SpeechRequest
from omni_serve.engine.warm_up import WarmUp, warm_up
from omni_serve.model.audio import (
    SAMPLE_RATE,
    AudioLimits,
    load_audio,
    pcm16_bytes,
    pcm16_to_float,
    prepare_waveform,
    wav_bytes,
)
from omni_serve.model.errors import AudioError, AudioTooLongError, CheckpointError, ContextLengthError, OmniError

__all__ = [
    "SAMPLE_RATE",
    "AudioChunk",
    "AudioError",
    "AudioLimits",
    "AudioTooLongError",
    "CheckpointError",
    "ContextLengthError",
    "Engine",
    "ErrorEvent",
    "Event",
    "Finished",
    "GenerationOptions",
    "OmniError",
    "PastTurn",
    "SpeechRequest",
    "TextDelta",
    "Timings",
    "UnitChunk",
    "WarmUp",
    "load_audio",
    "pcm16_bytes",
    "pcm16_to_float",
    "prepare_waveform",
    "warm_up",
    "wav_bytes",
]
