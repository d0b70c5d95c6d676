"""Vocoding off the scheduler thread.

A vocoder push (an espeak-ng call, or HiFi-GAN convolutions) used to run inside the decode step, so
every active request waited for each request's audio. Here one thread takes the pushes in the order
the scheduler queued them, so audio is made while the next tokens are decoded, each request's audio
stays in order, and a request's final event (queued after its last push) still comes last.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from omni_serve.engine.events import AudioChunk, ErrorEvent
from omni_serve.engine.state import RequestState

log = logging.getLogger(__name__)


class VocoderThread:
    """Runs each request's vocoder pushes, and what must follow them, in submission order."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self._jobs: queue.Queue[tuple[RequestState, Callable[[], None]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="omni-vocoder", daemon=True)
        self._thread.start()

    def push(self, state: RequestState, units: list[int], final: bool) -> None:
        """Vocode `units` for `state` (the last push of a request has `final`), emitting the new audio."""
        self._jobs.put((state, lambda: self._vocode(state, units, final)))

    def then(self, state: RequestState, action: Callable[[], None]) -> None:
        """Run `action` once every push queued before it for `state` is done (skipped if vocoding failed)."""
        self._jobs.put((state, action))

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=10)

    def _vocode(self, state: RequestState, units: list[int], final: bool) -> None:
        began = time.perf_counter()
        samples = state.vocoder.push(units, final)
        state.vocoder_s += time.perf_counter() - began
        if samples.size:
            state.first_audio_at = state.first_audio_at or time.perf_counter()
            state.audio_samples += samples.size
            state.emit(AudioChunk(samples, self.sample_rate))

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            state, action = job
            if state.vocoder_failed:
                continue
            try:
                action()
            except Exception as exc:  # a failed push fails its request, never the thread
                log.exception("vocoding failed")
                state.vocoder_failed = True
                state.cancelled.set()  # the scheduler stops decoding it at the next step
                state.emit(ErrorEvent(f"vocoding failed: {exc}", "internal"))
