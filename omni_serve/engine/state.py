"""Per-request and per-conversation state, created and dropped in one place (the engine)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from omni_serve.engine.detokenizer import Detokenizer
from omni_serve.engine.events import Event
from omni_serve.engine.options import SpeechRequest
from omni_serve.model.units import UnitStream, VocoderStream


@dataclass
class Conversation:
    """Earlier turns: every id fed so far (with -200 per speech input), their speech, and the KV cache.

    `unfed` holds ids chosen but not yet run through the LLM (the last answer's final token), so the
    next turn starts exactly where the cache ends.
    """

    ids: list[int] = field(default_factory=list)
    speech: list[torch.Tensor] = field(default_factory=list)
    cache: DynamicCache | None = None
    length: int = 0
    unfed: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class RequestState:
    """Everything one request owns while it is decoded."""

    request: SpeechRequest
    emit: Callable[[Event], None]
    detokenizer: Detokenizer
    units: UnitStream
    vocoder: VocoderStream | None
    generator: torch.Generator | None
    conversation: Conversation | None
    prompt_ids: list[int] = field(default_factory=list)
    prompt_speech: list[torch.Tensor] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    all_units: list[int] = field(default_factory=list)
    pending_units: list[int] = field(default_factory=list)
    vocoder_failed: bool = False  # set by the vocoder thread; its error was the final event
    audio_samples: int = 0
    stopped_on_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    encode_s: float = 0.0
    prefill_s: float = 0.0
    prompt_positions: int = 0
    first_token_at: float | None = None
    first_audio_at: float | None = None
    last_token_at: float | None = None
    vocoder_s: float = 0.0

    @property
    def vocoding_started(self) -> bool:
        """Some units already went to the vocoder (`pending_units` is what has not): later chunks use chunk_units."""
        return len(self.all_units) > len(self.pending_units)
