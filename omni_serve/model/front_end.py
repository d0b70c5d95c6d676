"""Speech front ends: turn a waveform into the embeddings that stand at a `<speech>` placeholder.

The published model uses Whisper's encoder plus the trained adaptor. A model folder may instead
name the transcription front end (Whisper transcribes; the transcript's token embeddings stand in
for speech), which is what a small CPU model needs to understand content it was never trained on.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from whisper.model import AudioEncoder

from omni_serve.model.adaptor import SpeechProjector
from omni_serve.model.speech_encoder import log_mel_windows


class SpeechFrontEnd(Protocol):
    def encode(self, samples: np.ndarray) -> torch.Tensor:
        """16 kHz mono samples -> (positions, llm_hidden) embeddings for one speech input."""
        ...


class EncoderAdaptorFrontEnd:
    """Whisper encoder -> frame stacking adaptor; each 30 s window gives the same number of positions."""

    def __init__(self, encoder: AudioEncoder, projector: SpeechProjector, n_mels: int) -> None:
        self.encoder = encoder
        self.projector = projector
        self.n_mels = n_mels

    @torch.inference_mode()
    def features(self, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mel, encoder output, adapted features) for every window: exposed for parity checks."""
        weight = self.projector.linear1.weight
        mel = log_mel_windows(samples, self.n_mels).to(weight.device)
        encoded = self.encoder(mel.to(self.encoder.conv1.weight.dtype))
        adapted = self.projector(encoded.to(weight.dtype))
        return mel, encoded, adapted

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        return self.features(samples)[2].reshape(-1, self.projector.linear2.out_features)
