"""The transcription front end: Whisper transcribes, the transcript's token embeddings stand in for speech.

A small LLM given an adaptor trained on CPU learns the question's type but not its content (see
the model card of omni-smol). Transcribing first and embedding the transcript with the LLM's own
token embeddings gives the LLM exactly what it would see had the question been typed, so a
spoken question gets the typed question's answer whenever Whisper hears it right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import whisper
from torch import nn
from transformers import PreTrainedTokenizerBase
from whisper.decoding import DecodingResult, DecodingTask
from whisper.model import Whisper

from omni_serve.model.errors import AudioError
from omni_serve.model.speech_encoder import load_whisper_checkpoint, log_mel_windows
from omni_serve.model.transcript_scoring import LanguageModelRanker, TranscriptScorer
from omni_serve.model.whisper_inference import SharedAudioInference

# First words after which a typed sentence ends with a question mark.
QUESTION_OPENERS = frozenset({
    "what", "who", "whom", "whose", "why", "how", "when", "where", "which", "is", "are", "am", "was", "were",
    "do", "does", "did", "can", "could", "will", "would", "should", "shall", "may", "might", "must", "have",
    "has", "had", "isn't", "aren't", "wasn't", "weren't", "don't", "doesn't", "didn't", "can't", "couldn't",
    "won't", "wouldn't", "shouldn't",
})


def as_typed(text: str) -> str:
    """The transcript as a person would type it: a capital first letter and a final punctuation mark.

    Whisper sometimes drops both ("what is the main language spoken in Brazil"), and a small LLM
    answers such a question differently from the same words typed with a capital and a question
    mark. A missing mark becomes "?" after a question word and "." otherwise; marks Whisper wrote
    are kept. (Dev set, beam 10 with rescoring: exact transcripts 41 -> 43 of 66.)
    """
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    if text[-1] in ".?!":
        return text
    return text + ("?" if text.split()[0].lower().strip(",") in QUESTION_OPENERS else ".")


@dataclass(frozen=True)
class TranscriptionOptions:
    """English, no timestamps, deterministic; greedy unless `beam_size` is set.

    A model's config.json sets them in `omni_serve.transcription`. With a beam, `llm_rescoring_weight`
    lets the LLM help choose among the beam's candidates (see `transcript_scoring`). omni-smol asks
    for both: more exact transcripts, so more answers equal to the typed question's, at some
    first-audio cost.
    """

    language: str = "en"
    without_timestamps: bool = True
    beam_size: int | None = None
    llm_rescoring_weight: float | None = None
    # openai-whisper's own rule for a window without speech (its `transcribe` defaults): both must hold.
    # A `logprob_threshold` of None lets the no-speech probability decide alone: a Whisper trained on
    # clips without speech (omni-smol's) is sure of it, yet writes fluent text for noise.
    no_speech_threshold: float = 0.6
    logprob_threshold: float | None = -1.0

    @classmethod
    def from_extras(cls, extras: dict[str, Any]) -> TranscriptionOptions:
        settings = extras.get("transcription", {})
        beam = settings.get("beam_size")
        weight = settings.get("llm_rescoring_weight")
        no_speech = settings.get("no_speech", {})
        return cls(language=settings.get("language", "en"), beam_size=int(beam) if beam and beam > 1 else None,
                   llm_rescoring_weight=float(weight) if weight else None,
                   no_speech_threshold=float(no_speech.get("probability", cls.no_speech_threshold)),
                   logprob_threshold=no_speech.get("below_logprob", cls.logprob_threshold))

    def is_no_speech(self, result: DecodingResult) -> bool:
        """Whether a decoded window held no speech, by the no-speech rule above."""
        below = self.logprob_threshold
        return result.no_speech_prob > self.no_speech_threshold and (below is None or result.avg_logprob < below)


class TranscriptionFrontEnd:
    """Speech -> Whisper transcript -> the LLM's embeddings of the transcript's tokens."""

    def __init__(self, model: Whisper, embed_tokens: nn.Embedding, tokenizer: PreTrainedTokenizerBase,
                 options: TranscriptionOptions = TranscriptionOptions(), scorer: TranscriptScorer | None = None) -> None:
        if options.llm_rescoring_weight and (scorer is None or not options.beam_size):
            raise ValueError("LLM rescoring needs a beam (beam_size > 1) and a transcript scorer")
        self.model = model
        self.embed_tokens = embed_tokens
        self.tokenizer = tokenizer
        self.options = options
        self.scorer = scorer

    @classmethod
    def load(cls, whisper_path: Path, network: nn.Module, tokenizer: PreTrainedTokenizerBase, device: torch.device,
             options: TranscriptionOptions = TranscriptionOptions(),
             scoring_prompt_ids: list[int] | None = None) -> TranscriptionFrontEnd:
        """Whisper in fp32 on CPU (fp16 kernels are slow there), in the checkpoint's fp16 on CUDA.

        `scoring_prompt_ids` (a first-turn prompt with one speech placeholder) is where the LLM reads
        each candidate when `options.llm_rescoring_weight` is set.
        """
        dims, state = load_whisper_checkpoint(whisper_path)
        model = Whisper(dims)
        model.load_state_dict(state, strict=True)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        scorer = None
        if options.llm_rescoring_weight and scoring_prompt_ids is not None:
            scorer = TranscriptScorer(network, tokenizer, scoring_prompt_ids)
        return cls(model.to(device=device, dtype=dtype).eval(), network.model.embed_tokens, tokenizer, options, scorer)

    @torch.inference_mode()
    def transcribe(self, samples: np.ndarray) -> str:
        """The text of 16 kHz samples, in its typed form; each 30 s window is decoded on its own, the texts joined.

        Windows Whisper judges to hold no speech are left out; if none holds speech, AudioError.
        """
        mel = log_mel_windows(samples, self.model.dims.n_mels).to(self.model.encoder.conv1.weight.device)
        fp16 = self.model.encoder.conv1.weight.dtype == torch.float16
        options = whisper.DecodingOptions(language=self.options.language, fp16=fp16, beam_size=self.options.beam_size,
                                          without_timestamps=self.options.without_timestamps)
        results = [self._decode_window(window[None], options) for window in mel]
        heard = [result.text.strip() for result in results if not self.options.is_no_speech(result)]
        if not any(heard):
            # Noise or a hum would otherwise get a confident answer to words Whisper made up.
            raise AudioError("no speech was heard in the audio; speak closer to the microphone or check the input")
        return as_typed(" ".join(text for text in heard if text))

    def _decode_window(self, mel: torch.Tensor, options: whisper.DecodingOptions) -> DecodingResult:
        """One 30 s window: `DecodingTask.run` with a beam fails on several windows at once."""
        task = DecodingTask(self.model, options)
        # Whisper's own inference copies the window's keys for every beam at every step.
        task.inference = SharedAudioInference(self.model)
        if options.beam_size is not None:
            task.decoder.inference = task.inference
        if self.scorer is not None:
            # The LLM reads each candidate as it would be passed on: in its typed form.
            task.sequence_ranker = LanguageModelRanker(lambda tokens: as_typed(task.tokenizer.decode(tokens)),
                                                       self.scorer.log_likelihoods, self.options.llm_rescoring_weight)
        return task.run(mel)[0]

    @torch.inference_mode()
    def embed_text(self, text: str) -> torch.Tensor:
        """(tokens, hidden) LLM embeddings of `text`, tokenised as typed text would be."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        weight = self.embed_tokens.weight
        return self.embed_tokens(torch.tensor(ids, dtype=torch.long, device=weight.device)).reshape(-1, weight.shape[1])

    def encode(self, samples: np.ndarray) -> torch.Tensor:
        return self.embed_text(self.transcribe(samples))
