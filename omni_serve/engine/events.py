"""What the engine streams to its callers, in order: text, units, audio, then one final event.

Errors are events too, so a consumer handles one stream and never a half-finished exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omni_serve.model.audio import pcm16_bytes


@dataclass(frozen=True)
class TextDelta:
    """New answer text; never splits a UTF-8 character."""

    text: str


@dataclass(frozen=True)
class UnitChunk:
    """Speech units made final since the last chunk."""

    units: list[int]


@dataclass(frozen=True)
class AudioChunk:
    """New float32 samples; joined, the chunks equal whole-utterance vocoding."""

    samples: np.ndarray
    sample_rate: int

    def pcm16(self) -> bytes:
        return pcm16_bytes(self.samples)


@dataclass(frozen=True)
class Timings:
    """Seconds from the request's arrival, rates of the whole answer, and the prompt's size in positions."""

    prompt_positions: int = 0
    encode_s: float = 0.0
    prefill_s: float = 0.0
    first_token_s: float | None = None
    first_audio_s: float | None = None
    total_s: float = 0.0
    tokens_per_s: float = 0.0
    audio_s: float = 0.0
    vocoder_s: float = 0.0
    real_time_factor: float | None = None  # vocoder time / audio time

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Finished:
    """The whole answer."""

    text: str
    token_ids: list[int]
    units: list[int]
    stopped_on_eos: bool
    timings: Timings = field(default_factory=Timings)
    conversation_id: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_units(self) -> int:
        return len(self.units)


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed; `code` is machine-readable (bad_audio, too_long, context_full, cancelled, internal)."""

    message: str
    code: str


Event = TextDelta | UnitChunk | AudioChunk | Finished | ErrorEvent
