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
from torch import nn

from omni_serve.model.config import OmniConfig
from omni_serve.model.ctc_generator import CTCSpeechGenerator, DecoderCache, ctc_collapse, spelling_windows
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
    """Incremental CTC decoding: only the new token's upsampled positions run, against a KV cache.

    `token_embeddings` (the LLM's input embedding table) is given when the decoder reads the chosen
    token's embedding beside the hidden state that chose it. A decoder that reads the spelling of
    the `after` tokens that follow each token (`spelling_context`) gets each token once they are
    chosen, and one that spells digits by their place once their number has ended: the stream holds
    those tokens back, and `finish` decodes them at the answer's end. `unspoken` tokens (the end of
    turn, for a decoder trained on texts that end without it) are not decoded at all.
    """

    def __init__(self, generator: CTCSpeechGenerator, token_embeddings: nn.Embedding | None = None,
                 unspoken: frozenset[int] = frozenset()) -> None:
        self.generator = generator
        self.token_embeddings = token_embeddings
        self.unspoken = unspoken
        self.cache = DecoderCache()
        self.last_frame: int | None = None
        self.frames: list[int] = []
        self.before, self.after = generator.spelling_context
        self.tokens: list[int] = []  # every token chosen so far: a number's spelling reads back to its start
        self.waiting: list[torch.Tensor] = []  # hidden states of the last tokens, not decoded yet

    def push(self, hidden: torch.Tensor, token_id: int, text: str) -> list[int]:
        return self.push_many([self], hidden.view(1, -1), [token_id])[0]

    @staticmethod
    @torch.inference_mode()
    def push_many(streams: list[CTCUnitStream], hidden: torch.Tensor, tokens: list[int]) -> list[list[int]]:
        """One new hidden state (row of `hidden`) and the token it chose per stream; the streams whose
        oldest waiting tokens now have every spelling they read decode them, those with as many
        ready tokens in one pass."""
        for stream, row, token in zip(streams, hidden, tokens):
            if token not in stream.unspoken:
                stream.tokens.append(token)
                stream.waiting.append(row)
        by_count: dict[int, list[int]] = {}
        for i, stream in enumerate(streams):
            if count := stream._ready():
                by_count.setdefault(count, []).append(i)
        results: list[list[int]] = [[] for _ in streams]
        for count, ready in by_count.items():
            taken = [streams[i]._take(count) for i in ready]
            states, windows, chosen = (torch.cat(parts) for parts in zip(*taken))
            decoded = CTCUnitStream._decode([streams[i] for i in ready], states, windows, chosen)
            for i, units in zip(ready, decoded):
                results[i] = units
        return results

    def _ready(self) -> int:
        """How many waiting tokens have their own spelling and that of the `after` tokens they read final."""
        decoded = len(self.tokens) - len(self.waiting)
        return max(0, self.generator.settled_tokens(self.tokens) - self.after - decoded)

    def _take(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The `count` oldest waiting hidden states (1, count, hidden), their spelling windows (1, count,
        window) and tokens (1, count), removed from the queue; tokens not chosen (yet) read as -1."""
        first = len(self.tokens) - len(self.waiting)
        start = max(0, first - self.before)  # the earliest token a window reads
        rows = torch.tensor([self.generator.spelling_rows(self.tokens)[start:]])
        windows = spelling_windows(rows, self.before, self.after)[:, first - start : first - start + count]
        chosen = torch.tensor([self.tokens[first : first + count]])
        states = torch.stack(self.waiting[:count]).unsqueeze(0)
        del self.waiting[:count]
        return states, windows, chosen

    @staticmethod
    def _decode(streams: list[CTCUnitStream], hidden: torch.Tensor, windows: torch.Tensor,
                chosen: torch.Tensor) -> list[list[int]]:
        """Decoder pass over (rows, N, hidden) new states of each stream and the tokens they chose; the
        units they make final."""
        generator, embeddings = streams[0].generator, streams[0].token_embeddings
        if embeddings is not None:
            hidden = torch.cat([hidden, embeddings(chosen.to(hidden.device)).to(hidden.dtype)], dim=-1)
        logits = generator(hidden, [stream.cache for stream in streams], token_ids=windows.to(hidden.device))
        return [stream._collapse(frames) for stream, frames in zip(streams, logits.argmax(dim=-1).tolist())]

    def _collapse(self, frames: list[int]) -> list[int]:
        units = ctc_collapse(frames, self.generator.blank_id, self.last_frame)
        self.last_frame = frames[-1]
        self.frames.extend(frames)
        return units

    @torch.inference_mode()
    def finish(self) -> list[int]:
        if not self.waiting:
            return []
        return self._decode([self], *self._take(len(self.waiting)))[0]


def push_units(streams: list[UnitStream], hidden: torch.Tensor, tokens: list[int], texts: list[str]) -> list[list[int]]:
    """`push` on every stream (row of `hidden`); CTC streams sharing a decoder run as one batch."""
    results: list[list[int]] = [[] for _ in streams]
    batches: dict[int, list[int]] = {}
    for row, stream in enumerate(streams):
        if isinstance(stream, CTCUnitStream):
            batches.setdefault(id(stream.generator), []).append(row)
        else:
            results[row] = stream.push(hidden[row], tokens[row], texts[row])
    for rows in batches.values():
        selected = hidden[rows[0] : rows[0] + 1] if len(rows) == 1 else hidden[rows]
        chosen = [tokens[r] for r in rows]
        for row, units in zip(rows, CTCUnitStream.push_many([streams[r] for r in rows], selected, chosen)):
            results[row] = units
    return results


class HiFiGANStream:
    """Streams a unit HiFi-GAN so that the joined output equals whole-utterance vocoding.

    Durations of a unit depend on `context_units` neighbours each side. Frames go into the model's
    `SynthesisStream`, which returns every sample its inputs already determine, computing each
    once. `lookahead_frames` caps what is emitted at that many frames before the last one; below
    the exact lag (about `receptive_field_frames`) the missing samples are guessed by flushing a copy
    of the state as if the answer ended there: lower latency, inexact at the joins.
    """

    def __init__(self, model: UnitHiFiGAN, lookahead_frames: int | None = None) -> None:
        self.model = model
        self.receptive = model.receptive_field_frames()
        self.lookahead = lookahead_frames
        self.context_units = model.dur_predictor.context_units if model.dur_predictor is not None else 0
        self.units: list[int] = []
        self.durations: list[int] = []
        self.frame_units: list[int] = []
        self.synthesis = model.synthesis_stream()
        self.fed_frames = 0
        self.exact = torch.zeros(0)  # exact samples not yet emitted, starting at sample `exact_from`
        self.exact_from = 0
        self.emitted = 0  # samples emitted (exact or guessed)

    @torch.inference_mode()
    def push(self, units: list[int], final: bool) -> np.ndarray:
        self.units.extend(u for u in units if u >= 0)
        self._finalise_durations(final)
        device = self.model.dict.weight.device
        ids = torch.tensor([self.frame_units[self.fed_frames :]], dtype=torch.long, device=device)
        self.fed_frames = len(self.frame_units)
        new = self.synthesis.push(self.model.frames(ids, None), final).float().cpu()
        self.exact = torch.cat([self.exact, new])
        exact_end = self.exact_from + self.exact.numel()
        if final or self.lookahead is None:
            limit = exact_end
        else:
            limit = max(0, len(self.frame_units) - self.lookahead) * self.model.samples_per_frame
        pieces = [self.exact[max(0, self.emitted - self.exact_from) : max(0, limit - self.exact_from)]]
        if limit > max(self.emitted, exact_end):  # lookahead below the exact lag: guess the rest
            guess = self.synthesis.clone().push(self.model.frames(ids[:, :0], None), final=True).float().cpu()
            start = max(self.emitted, exact_end)
            pieces.append(guess[start - exact_end : limit - exact_end])
        out = torch.cat(pieces)
        self.emitted += out.numel()
        drop = min(self.exact.numel(), max(0, self.emitted - self.exact_from))
        self.exact, self.exact_from = self.exact[drop:], self.exact_from + drop
        return out.numpy()

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
        from omni_serve.model.espeak import EspeakSettings, EspeakVocoder

        return EspeakVocoder(EspeakSettings.from_extras(config.extras))
    if folder is None:
        raise CheckpointError("this model needs a vocoder folder (--vocoder DIR with config.json and g_XXXXXXXX)")
    return HiFiGANUnitVocoder(load_unit_hifigan(folder).to(device))
