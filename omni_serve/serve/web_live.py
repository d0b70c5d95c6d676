"""Live answer audio for the page's Web Audio player: a per-answer channel from the event generator to a fetch.

Why not only Gradio's `gr.Audio(streaming=True)`: it re-encodes every chunk to AAC and plays it through
HLS (playlist polling, segment fetches, hls.js buffering), which delays the start of playback by about a
second after the first chunk arrives (see `bench/web_latency.py`). Here the page opens one plain HTTP
stream at the Submit click, the answer's PCM is written to it the moment the worker sends it, and a
small Web Audio player schedules the chunks back to back (no codec, no polling, no gaps at joins).

Wire format of `GET /omni/live/{key}`: a sequence of frames, each `<u32 sample_rate><u32 n_bytes>` (little
endian) followed by `n_bytes` of 16-bit little-endian mono PCM. The response ends when the answer ends.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

LIVE_ROUTE = "/omni/live/{key}"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
FRAME_HEADER = struct.Struct("<II")
CHANNEL_TTL_S = 600.0  # a channel nobody finished or read is dropped after this
IDLE_TIMEOUT_S = 300.0  # a reader waiting this long with no frame gives up
MAX_CHANNELS = 512


def encode_frame(pcm16: bytes, sample_rate: int) -> bytes:
    """One frame of the live stream: header, then the PCM."""
    return FRAME_HEADER.pack(sample_rate, len(pcm16)) + pcm16


def decode_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split a whole live stream into (sample_rate, pcm16) frames; the inverse of `encode_frame`."""
    frames, offset = [], 0
    while offset + FRAME_HEADER.size <= len(data):
        rate, size = FRAME_HEADER.unpack_from(data, offset)
        offset += FRAME_HEADER.size
        frames.append((rate, data[offset:offset + size]))
        offset += size
    return frames


@dataclass
class _Channel:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    closed: bool = False
    reading: bool = False


class LiveAudioHub:
    """Channels keyed by a random key the page makes at the Submit click; the key is the only capability.

    Either side may arrive first (the page's fetch usually does): a channel is created by whichever
    touches it first, buffers frames until read, and disappears when it was both closed and read, or
    after `CHANNEL_TTL_S`. One hub per app (made by `create_app`), never a module global.
    """

    def __init__(self, max_channels: int = MAX_CHANNELS, idle_timeout_s: float = IDLE_TIMEOUT_S) -> None:
        self._channels: dict[str, _Channel] = {}
        self._finished: dict[str, float] = {}  # keys read to the end: later calls are no-ops
        self._max_channels = max_channels
        self._idle_timeout_s = idle_timeout_s

    def __len__(self) -> int:
        return len(self._channels)

    @staticmethod
    def valid_key(key: str | None) -> bool:
        return bool(key) and bool(KEY_PATTERN.match(key))

    def publish(self, key: str | None, pcm16: bytes, sample_rate: int) -> None:
        """Queue one chunk of answer audio for the page (a no-op without a valid key)."""
        channel = self._channel(key)
        if channel is not None and not channel.closed and pcm16:
            channel.queue.put_nowait(encode_frame(pcm16, sample_rate))

    def close(self, key: str | None) -> None:
        """End the answer's stream; the reader finishes after the frames already queued."""
        channel = self._channel(key)
        if channel is None or channel.closed:
            return
        channel.closed = True
        channel.queue.put_nowait(None)

    async def frames(self, key: str) -> AsyncIterator[bytes]:
        """Yield the channel's frames until it is closed (or idle too long), then forget it."""
        channel = self._channel(key)
        if channel is None or channel.reading:
            return
        channel.reading = True
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(channel.queue.get(), self._idle_timeout_s)
                except TimeoutError:
                    return
                if frame is None:
                    return
                yield frame
        finally:
            self._channels.pop(key, None)
            self._finished[key] = time.monotonic()

    def _channel(self, key: str | None) -> _Channel | None:
        if not self.valid_key(key) or key in self._finished:
            return None
        channel = self._channels.get(key)
        if channel is None:
            self._prune()
            if len(self._channels) >= self._max_channels:
                return None
            channel = self._channels[key] = _Channel()
        return channel

    def _prune(self) -> None:
        cutoff = time.monotonic() - CHANNEL_TTL_S
        for key in [k for k, c in self._channels.items() if c.created < cutoff]:
            del self._channels[key]
        for key in [k for k, t in self._finished.items() if t < cutoff]:
            del self._finished[key]


def add_live_route(app: FastAPI, hub: LiveAudioHub) -> None:
    """Register `GET /omni/live/{key}` on the app that mounts the Gradio page (before mounting it at /)."""

    @app.get(LIVE_ROUTE, include_in_schema=False)
    async def live_audio(key: str) -> StreamingResponse:
        if not hub.valid_key(key):
            raise HTTPException(status_code=404, detail="unknown stream")
        return StreamingResponse(hub.frames(key), media_type="application/octet-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
