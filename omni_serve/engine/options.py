"""Per-request settings, kept apart from the loop that applies them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling, stopping and streaming policy of one request.

    temperature 0 means greedy. The frequency and presence penalties (-2 to 2, as in the OpenAI API)
    lower each token's logit by its count in the answer so far and once for being there at all. Audio
    is vocoded once `first_chunk_units` units are waiting (small = low latency), then every
    `chunk_units` units, and at the end.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    first_chunk_units: int = 10
    chunk_units: int = 40
    vocode: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not (-2 <= self.frequency_penalty <= 2 and -2 <= self.presence_penalty <= 2):
            raise ValueError("frequency_penalty and presence_penalty must be in [-2, 2]")
        if self.first_chunk_units < 1 or self.chunk_units < 1:
            raise ValueError("chunk sizes must be at least 1 unit")


@dataclass(frozen=True)
class PastTurn:
    """An earlier exchange sent by a stateless client: what the user said (speech and/or text) and the answer."""

    answer: str
    audio: np.ndarray | None = None
    text: str | None = None


@dataclass
class SpeechRequest:
    """One user turn: 16 kHz mono speech and/or typed text, options, and the context to continue.

    Context is either `conversation_id` (the engine keeps earlier turns and their KV cache) or
    `history` (earlier turns sent with the request, as the OpenAI API does). `prompt` is a complete
    prompt text with `<speech>` placeholders, for clients of the reference that build their own.
    """

    audio: np.ndarray | None
    options: GenerationOptions = GenerationOptions()
    conversation_id: str | None = None
    prompt: str | None = None
    text: str | None = None
    history: list[PastTurn] = field(default_factory=list)
