"""Speech-unit interfaces: unit generators (LLM output -> units) and unit vocoders (units -> audio).

Both are small, per-request stream objects so the engine's loop does not care which pair a model
brings: the published model pairs the CTC decoder with the unit HiFi-GAN; the embedded default pairs
espeak-ng phonemes with espeak-ng speech.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from omni_serve.model.config import OmniConfig
from omni_serve.model.ctc_generator import CTCSpeechGenerator, DecoderCache, ctc_collapse
from omni_serve.model.errors import CheckpointError
from omni_serve.model.vocoder import UnitHiFiGAN, load_unit_hifigan


class UnitStream(Protocol):
    """Per-request unit generation state."""

    def push(self, hidden: torch.Tensor, token_id: int, text: str) -> list[int]:
        """Units made final by one generated token (`hidden` produced it; `text` is its decoded text delta)."""
        ...

    def finish(self) -> list[int]:
        """Units still held back when the answer ends."""
        ...


class VocoderStream(Protocol):
    """Per-request vocoder state: units in, only new samples out."""

    def push(self, units: list[int], final: bool) -> np.ndarray: ...


class UnitVocoder(Protocol):
    sample_rate: int

    def stream(self) -> VocoderStream: ...

    def vocode(self, units: list[int]) -> np.ndarray:
        """Whole-utterance synthesis (the reference the stream must equal)."""
        ...


class CTCUnitStream:
    """Incremental CTC decoding: only the new token's upsampled positions run, against a KV cache."""

    def __init__(self, generator: CTCSpeechGenerator) -> None:
        self.generator = generator
        self.cache = DecoderCache()
        self.last_frame: int | None = None
        self.frames: list[int] = []

    @torch.inference_mode()
    def push(self, hidden: torch.Tensor, token_id: int, text: str) -> list[int]:
        logits = self.generator(hidden.view(1, 1, -1), self.cache)
        frames = logits[0].argmax(dim=-1).tolist()
        units = ctc_collapse(frames, self.generator.blank_id, self.last_frame)
        self.last_frame = frames[-1]
        self.frames.extend(frames)
        return units

    def finish(self) -> list[int]:
        return []


class HiFiGANStream:
    """Streams a unit HiFi-GAN so that the joined output equals whole-utterance vocoding.

    Durations of a unit depend on `context_units` neighbours each side, and each output sample on
    `receptive` frames each side. A push finalises what its right context already determines and
    synthesises only the new samples, with enough left context to be exact. `lookahead` below the
    receptive field trades exactness at joins for lower latency.
    """

    def __init__(self, model: UnitHiFiGAN, lookahead_frames: int | None = None) -> None:
        self.model = model
        self.receptive = model.receptive_field_frames()
        self.lookahead = self.receptive if lookahead_frames is None else lookahead_frames
        self.context_units = model.dur_predictor.context_units if model.dur_predictor is not None else 0
        self.units: list[int] = []
        self.durations: list[int] = []
        self.frame_units: list[int] = []
        self.emitted_frames = 0

    @torch.inference_mode()
    def push(self, units: list[int], final: bool) -> np.ndarray:
        self.units.extend(u for u in units if u >= 0)
        self._finalise_durations(final)
        available = len(self.frame_units)
        target = available if final else available - self.lookahead
        if target <= self.emitted_frames:
            return np.zeros(0, dtype=np.float32)
        start = max(0, self.emitted_frames - self.receptive)
        end = available if final else min(available, target + self.receptive)
        device = self.model.dict.weight.device
        window = torch.tensor([self.frame_units[start:end]], device=device)
        audio = self.model.synthesize(self.model.frames(window, None))
        spf = self.model.samples_per_frame
        new = audio[(self.emitted_frames - start) * spf : (target - start) * spf]
        self.emitted_frames = target
        return new.float().cpu().numpy()

    def _finalise_durations(self, final: bool) -> None:
        done, total = len(self.durations), len(self.units)
        upto = total if final else total - self.context_units
        if upto <= done:
            return
        start = max(0, done - self.context_units)
        window = torch.tensor([self.units[start:total]], device=self.model.dict.weight.device)
        durations = self.model.durations(window)[0, done - start : upto - start].tolist()
        for unit, duration in zip(self.units[done:upto], durations):
            self.frame_units.extend([unit] * duration)
        self.durations.extend(durations)


class HiFiGANUnitVocoder:
    """fairseq's unit HiFi-GAN behind the UnitVocoder interface."""

    def __init__(self, model: UnitHiFiGAN, lookahead_frames: int | None = None) -> None:
        self.model = model
        self.sample_rate = model.config.sampling_rate
        self.lookahead_frames = lookahead_frames

    def stream(self) -> HiFiGANStream:
        return HiFiGANStream(self.model, self.lookahead_frames)

    def vocode(self, units: list[int]) -> np.ndarray:
        ids = torch.tensor([units], dtype=torch.long, device=self.model.dict.weight.device)
        return self.model(ids).float().cpu().numpy()


def build_vocoder(config: OmniConfig, folder: Path | None, device: torch.device) -> UnitVocoder:
    """The vocoder a model folder asks for: HiFi-GAN files in `folder`, or espeak-ng for phoneme units."""
    if config.vocoder == "espeak":
        from omni_serve.model.espeak import EspeakVocoder

        return EspeakVocoder()
    if folder is None:
        raise CheckpointError("this model needs a vocoder folder (--vocoder DIR with config.json and g_XXXXXXXX)")
    return HiFiGANUnitVocoder(load_unit_hifigan(folder).to(device))
