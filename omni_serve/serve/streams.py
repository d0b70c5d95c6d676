"""Engine events to bytes on the wire, in our compact NDJSON shape or in the reference's shape.

Compact: one protocol event per line (text deltas, new units, base64 PCM16 audio, final stats, errors).
Reference: NUL-terminated JSON objects holding the prompt followed by the whole answer so far, all
units so far as a space-separated string, and error_code (0 when fine), which the reference's web
client reads unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from omni_serve.engine import AudioChunk, ErrorEvent, Event, Finished, TextDelta, UnitChunk
from omni_serve.serve import protocol

REFERENCE_ERROR_CODE = 1  # what the reference worker sends for any failure


def wire_event(event: Event, worker: str | None = None) -> protocol.StreamEvent:
    """The protocol model of one engine event."""
    if isinstance(event, TextDelta):
        return protocol.TextEvent(text=event.text)
    if isinstance(event, UnitChunk):
        return protocol.UnitsEvent(units=list(event.units))
    if isinstance(event, AudioChunk):
        return protocol.AudioEvent(pcm16=base64.b64encode(event.pcm16()).decode("ascii"), sample_rate=event.sample_rate)
    if isinstance(event, Finished):
        return protocol.FinalEvent(text=event.text, token_ids=list(event.token_ids), units=list(event.units),
                                   stopped_on_eos=event.stopped_on_eos, timings=event.timings.as_dict(),
                                   conversation_id=event.conversation_id, worker=worker)
    if isinstance(event, ErrorEvent):
        return protocol.ErrorEvent(message=event.message, code=event.code)
    raise TypeError(f"unknown engine event {event!r}")


async def compact_stream(events: AsyncIterator[Event], worker: str | None,
                         observe: Callable[[protocol.StreamEvent], None] = lambda event: None) -> AsyncIterator[bytes]:
    """NDJSON lines; a failure inside the worker becomes an error line, never a cut-off stream."""
    try:
        async with aclosing(events):
            async for event in events:
                wire = wire_event(event, worker)
                observe(wire)
                yield wire.model_dump_json().encode() + b"\n"
    except Exception as exc:  # noqa: BLE001 - reported to the client, which would otherwise see a cut stream
        error = protocol.ErrorEvent(message=f"the worker failed: {exc}", code="internal")
        observe(error)
        yield error.model_dump_json().encode() + b"\n"


def reference_chunk(text: str, units: list[int], error_code: int = 0) -> bytes:
    chunk = protocol.ReferenceChunk(text=text, unit=" ".join(map(str, units)), error_code=error_code)
    return chunk.model_dump_json().encode() + protocol.REFERENCE_DELIMITER


async def reference_stream(
        events: AsyncIterator[Event], prompt: str | None, stop: str | None,
        observe: Callable[[protocol.StreamEvent], None] = lambda event: None) -> AsyncIterator[bytes]:
    """The reference's stream: whole text (prompt + answer) and all units so far, after every change.

    The answer is cut where `stop` first appears, and generation ends there.
    """
    prefix = prompt or ""
    answer, units = "", []
    try:
        async with aclosing(events):
            async for event in events:
                observe(wire_event(event))
                if isinstance(event, TextDelta):
                    answer += event.text
                    if stop and stop in answer:
                        yield reference_chunk(prefix + answer[: answer.index(stop)], units)
                        return  # leaving the loop closes the engine stream, which cancels the request
                elif isinstance(event, UnitChunk):
                    units.extend(event.units)
                elif isinstance(event, Finished):
                    answer = event.text[: event.text.index(stop)] if stop and stop in event.text else event.text
                    units = list(event.units)
                elif isinstance(event, ErrorEvent):
                    yield reference_chunk(event.message, [], REFERENCE_ERROR_CODE)
                    return
                else:
                    continue  # audio: the reference's clients make their own from the units
                yield reference_chunk(prefix + answer, units)
    except Exception as exc:  # noqa: BLE001
        observe(protocol.ErrorEvent(message=str(exc), code="internal"))
        yield reference_chunk(f"the worker failed: {exc}", [], REFERENCE_ERROR_CODE)
