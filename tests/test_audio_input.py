"""Audio input: every format and rate is converted; every bad input is a clear AudioError."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile
from conftest import FIXTURES

from omni_serve.engine import AudioError, AudioLimits, AudioTooLongError, load_audio, prepare_waveform
from omni_serve.model.speech_encoder import log_mel_windows

Q1 = FIXTURES / "inputs" / "q1.wav"


def _tone(seconds: float, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def _encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def test_resamples_and_mixes_down_any_rate_and_channels():
    audio = load_audio(_encode(_tone(1.0, 44100, channels=2), 44100, "WAV"))
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 220) < 2  # the tone survives resampling


def test_flac_and_ogg_read_directly():
    for fmt in ("FLAC", "OGG"):
        assert load_audio(_encode(_tone(0.5, 22050), 22050, fmt)).size == pytest.approx(8000, abs=2)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
@pytest.mark.parametrize("extension", ["mp3", "webm"])
def test_browser_and_compressed_formats_go_through_ffmpeg(tmp_path, extension):
    target = tmp_path / f"q1.{extension}"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(Q1), str(target)], check=True)
    audio = load_audio(target)
    reference = load_audio(Q1)
    assert abs(audio.size - reference.size) < 2000  # codec padding only
    assert np.corrcoef(np.abs(audio[:8000]), np.abs(reference[:8000]))[0, 1] > 0.3 or audio.std() > 0.01


@pytest.mark.parametrize("payload,message", [
    (b"", "empty"),
    (b"this is plainly not audio, just some text " * 20, "not readable audio"),
    (bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "not readable audio"),
])
def test_unreadable_input_is_a_clear_error(payload, message):
    with pytest.raises(AudioError, match=message):
        load_audio(payload)


def test_truncated_wav_is_a_clear_error():
    data = Q1.read_bytes()[:30]
    with pytest.raises(AudioError):
        load_audio(data)


def test_silent_audio_is_refused():
    with pytest.raises(AudioError, match="silent"):
        load_audio(_encode(np.zeros(16000, dtype=np.float32), 16000, "WAV"))


def test_empty_wav_is_refused():
    with pytest.raises(AudioError, match="no samples|empty|not readable"):
        load_audio(_encode(np.zeros(0, dtype=np.float32), 16000, "WAV"))


def test_too_long_audio_is_refused_with_the_limit():
    with pytest.raises(AudioTooLongError, match="limit is 120 s"):
        prepare_waveform(_tone(121.0), 16000)
    with pytest.raises(AudioTooLongError, match="limit is 10 s"):
        prepare_waveform(_tone(11.0), 16000, AudioLimits(max_seconds=10))


def test_length_is_refused_before_any_conversion(monkeypatch):
    """A few kilobytes that claim a very low rate, or a long file, are refused without being expanded."""
    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled before the length was checked")

    monkeypatch.setattr("omni_serve.model.audio.resample_poly", no_resampling)
    with pytest.raises(AudioTooLongError, match="200.0 s long"):
        prepare_waveform(_tone(200.0, 8000), 8000)
    with pytest.raises(AudioTooLongError, match="limit is 120 s"):  # refused from the wav header
        load_audio(_encode(_tone(130.0, 8000), 8000, "WAV"))
    with pytest.raises(AudioError, match="too low for speech"):
        prepare_waveform(_tone(1.0, 16000), 1)
    with pytest.raises(AudioTooLongError, match="8000.0 s long"):  # 8,000 samples said to be 1 Hz
        load_audio(_encode(_tone(0.5, 16000), 1, "WAV"))


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_long_compressed_file_is_refused(tmp_path):
    """ffmpeg decodes at most a second past the limit, so a long file is refused at the cost of the limit."""
    target = tmp_path / "long.webm"  # not readable by soundfile, so ffmpeg decodes it
    subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=frequency=220:duration=150",
                    "-b:a", "16k", str(target)], check=True)
    with pytest.raises(AudioTooLongError, match="121.0 s long; the limit is 120 s"):
        load_audio(target)


def test_nan_and_bad_rate_are_refused():
    samples = _tone(1.0)
    samples[5] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        prepare_waveform(samples, 16000)
    with pytest.raises(AudioError, match="sample rate"):
        prepare_waveform(_tone(1.0), 0)


def test_long_clips_are_encoded_in_consecutive_30s_windows(fixture_model):
    long_audio = np.concatenate([load_audio(Q1)] * 15)  # about 42 s
    assert log_mel_windows(long_audio, 128).shape == (2, 128, 3000)
    embeddings = fixture_model.front_end.encode(long_audio)
    assert embeddings.shape == (600, fixture_model.config.llm.hidden_size)
