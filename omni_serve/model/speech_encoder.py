"""Whisper speech encoder: path resolution, loading and log-mel features.

The reference resolves `speech_encoder` against the current directory only and crashes when run
from anywhere else. We look in every sensible place and, when the file is nowhere, say where we
looked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import whisper
from whisper.model import AudioEncoder, ModelDimensions

from omni_serve.model.audio import WINDOW_SAMPLES
from omni_serve.model.errors import CheckpointError


def resolve_speech_encoder(configured: str | None, model_dir: Path, override: str | Path | None = None) -> Path:
    """Find the Whisper checkpoint: explicit override; absolute path; current directory; model folder and its ancestors."""
    if override is not None:
        path = Path(override).expanduser()
        if path.is_file():
            return path.resolve()
        raise CheckpointError(f"speech encoder file given by --speech-encoder does not exist: {path}")
    if not configured:
        raise CheckpointError("config.json names no speech_encoder file; pass --speech-encoder")
    tried = []
    configured_path = Path(configured).expanduser()
    if configured_path.is_absolute():
        candidates = [configured_path]
    else:
        folder = Path(model_dir).resolve()
        candidates = [Path.cwd() / configured_path]
        candidates += [ancestor / configured_path for ancestor in (folder, *folder.parents)]
    for candidate in candidates:
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate.resolve()
    raise CheckpointError(
        f"speech encoder file {configured!r} not found; tried:\n  " + "\n  ".join(tried)
        + "\nPut the Whisper checkpoint at one of these places or pass --speech-encoder FILE."
    )


def load_whisper_checkpoint(path: Path) -> tuple[ModelDimensions, dict[str, torch.Tensor]]:
    """Read an openai-whisper checkpoint (dict with `dims` and `model_state_dict`) safely."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return ModelDimensions(**checkpoint["dims"]), checkpoint["model_state_dict"]
    except (KeyError, TypeError, RuntimeError, OSError) as exc:
        raise CheckpointError(f"{path} is not an openai-whisper checkpoint: {exc}") from exc


def load_audio_encoder(path: Path) -> tuple[AudioEncoder, ModelDimensions]:
    """Build only the encoder half of Whisper (the text decoder is never used by the adaptor front end)."""
    dims, state = load_whisper_checkpoint(path)
    encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer)
    encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    encoder.load_state_dict(encoder_state, strict=True)
    _use_plain_layer_norms(encoder)
    return encoder.eval(), dims


def _use_plain_layer_norms(module: torch.nn.Module) -> None:
    """Swap whisper's LayerNorm (always computes in fp32) for torch's, as the reference does.

    This lets the whole encoder run in fp16/bf16 on a GPU; in fp32 the swap changes nothing.
    """
    for name, child in module.named_children():
        if isinstance(child, whisper.model.LayerNorm):
            plain = torch.nn.LayerNorm(child.normalized_shape, eps=child.eps)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _use_plain_layer_norms(child)


def log_mel_windows(samples: np.ndarray, n_mels: int) -> torch.Tensor:
    """Log-mel of each consecutive 30 s window, each padded to 30 s: shape (windows, n_mels, 3000).

    The published model was trained on 30 s padded input, so every window is padded the same way.
    """
    starts = range(0, max(len(samples), 1), WINDOW_SAMPLES)
    windows = [whisper.pad_or_trim(torch.from_numpy(samples[s : s + WINDOW_SAMPLES])) for s in starts]
    return torch.stack([whisper.log_mel_spectrogram(w, n_mels=n_mels) for w in windows])
