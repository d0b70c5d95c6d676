"""Audio input: decode anything a browser or a user may send into 16 kHz mono float32.

soundfile reads wav/flac/ogg directly; everything else (mp3, webm/opus from a browser, m4a) goes
through the ffmpeg binary, as openai-whisper does. Every failure becomes an AudioError that names
the problem, because the sender needs to know what to fix.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from omni_serve.model.errors import AudioError, AudioTooLongError

SAMPLE_RATE = 16_000
WINDOW_SECONDS = 30
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS
DEFAULT_MAX_SECONDS = 120.0
SILENCE_PEAK = 1e-4  # below this peak amplitude nothing audible was recorded
MIN_SECONDS = 0.05
MIN_SAMPLE_RATE = 4_000  # below this no speech band survives (telephone audio is 8 kHz)


@dataclass(frozen=True)
class AudioLimits:
    """What the model accepts: longer clips are refused instead of silently cut."""

    max_seconds: float = DEFAULT_MAX_SECONDS
    min_seconds: float = MIN_SECONDS


def load_audio(source: str | Path | bytes, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Decode a file path or encoded bytes to validated 16 kHz mono float32 samples."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    if not data:
        raise AudioError("the audio is empty (0 bytes)")
    samples, rate = _decode(data, limits)
    return prepare_waveform(samples, rate, limits)


def prepare_waveform(samples: np.ndarray, rate: int, limits: AudioLimits = AudioLimits()) -> np.ndarray:
    """Mix down, resample to 16 kHz and validate raw samples (any shape (n,) or (n, channels)).

    The length is checked before any conversion: a few kilobytes that claim a rate of 1 Hz would
    otherwise be resampled into gigabytes before being refused.
    """
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(f"the sample rate {rate} Hz is too low for speech; send at least {MIN_SAMPLE_RATE} Hz")
    array = np.asarray(samples)
    _refuse_too_long(array.shape[0] / rate if array.ndim else 0.0, limits)
    if array.dtype.kind in "iu":
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max + 1)
    array = array.astype(np.float32, copy=False)
    if array.ndim == 2:
        array = array.mean(axis=1)
    elif array.ndim != 1:
        raise AudioError(f"audio must be 1-D or (samples, channels), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise AudioError("the audio contains NaN or infinite samples")
    if rate != SAMPLE_RATE and array.size:
        common = gcd(int(rate), SAMPLE_RATE)
        array = resample_poly(array, SAMPLE_RATE // common, int(rate) // common).astype(np.float32)
    validate_waveform(array, limits)
    return array


def validate_waveform(samples: np.ndarray, limits: AudioLimits = AudioLimits()) -> None:
    """Refuse audio the model cannot answer: too short, silent or too long."""
    seconds = samples.size / SAMPLE_RATE
    if samples.size == 0:
        raise AudioError("the audio holds no samples")
    if seconds < limits.min_seconds:
        raise AudioError(f"the audio is too short ({seconds * 1000:.0f} ms); speak for at least a moment")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioError("the audio is silent; check the microphone")
    _refuse_too_long(seconds, limits)


def _refuse_too_long(seconds: float, limits: AudioLimits) -> None:
    if seconds > limits.max_seconds:
        raise AudioTooLongError(f"the audio is {seconds:.1f} s long; the limit is {limits.max_seconds:.0f} s")


def split_windows(samples: np.ndarray) -> list[np.ndarray]:
    """Cut a waveform into consecutive 30 s windows, the span the Whisper encoder sees at once."""
    return [samples[start : start + WINDOW_SAMPLES] for start in range(0, max(samples.size, 1), WINDOW_SAMPLES)]


def pcm16_bytes(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as little-endian 16-bit PCM, the wire format for streamed audio."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Inverse of pcm16_bytes."""
    if len(data) % 2:
        raise AudioError("PCM16 audio must have an even number of bytes")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """Encode samples as a 16-bit PCM wav file in memory."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _decode(data: bytes, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Samples and rate; a file whose header says it is too long is refused before it is read."""
    try:
        info = soundfile.info(io.BytesIO(data))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        return _decode_with_ffmpeg(data, limits)
    if info.samplerate > 0:
        _refuse_too_long(info.frames / info.samplerate, limits)
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
        return samples, int(rate)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError):
        return _decode_with_ffmpeg(data, limits)


def _decode_with_ffmpeg(data: bytes, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Decodes at most a second past the limit (`-t`), so a long file costs no more than a refusal needs."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioError("the audio format needs ffmpeg, which is not installed (apt-get install ffmpeg)")
    command = [ffmpeg, "-nostdin", "-v", "error", "-i", "pipe:0", "-t", f"{limits.max_seconds + 1:g}",
               "-f", "s16le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    try:
        result = subprocess.run(command, input=data, capture_output=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AudioError("decoding the audio took too long") from exc
    if result.returncode != 0 or not result.stdout:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        detail = reason[-1] if reason else "no audio stream found"
        raise AudioError(f"the file is not readable audio ({detail})")
    return pcm16_to_float(result.stdout), SAMPLE_RATE
