"""Training of the Whisper adaptation (LoRA on the text decoder) on `transcriber_data` shards.

Teacher forcing as Whisper was trained: the decoder reads <|startoftranscript|> <|notimestamps|>
and the text's tokens, and learns the text and <|endoftext|>; the start position also learns
"no timestamps" for speech and <|nospeech|> for clips without speech, whose transcript target is
empty (<|endoftext|> at once). The adapted decoder still writes fluent text for noise (Whisper's
decoding never ends a transcript at its first token), confidently enough to pass Whisper's
no-speech rule, which also asks for a low log-probability; so omni-smol's config lets the
no-speech probability, which this training makes sure, decide alone. The loop is `training_run`'s
(seeded batches per step, resumable, checkpoints); the updates are exported as fp16 safetensors
(`whisper_lora`), which `build-default` merges into the converted Whisper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import whisper
from whisper.model import Whisper
from whisper.tokenizer import Tokenizer

from omni_serve.default.ctc_train import edit_distance
from omni_serve.default.training_run import CHECKPOINT_FILE, ResumableTraining, RunSettings, pick_device
from omni_serve.default.transcriber_data import TranscriberData, is_heldout
from omni_serve.default.whisper_lora import LoRAShape, add_lora, save_lora
from omni_serve.model.speech_encoder import load_whisper_checkpoint

IGNORE = -100
MAX_TEXT_TOKENS = 96


@dataclass(frozen=True)
class TranscriberTrainConfig(RunSettings):
    """LoRA shape (and `RunSettings`' optimisation, with shorter defaults)."""

    rank: int = 16
    alpha: float = 32.0
    warmup_steps: int = 30
    steps: int = 600
    checkpoint_every: int = 50
    eval_samples: int = 64


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


class TranscriberTrainer(ResumableTraining):
    """One training run in `out`, new or resumed from its checkpoint."""

    def __init__(self, data: TranscriberData, whisper_path: Path, out: Path, config: TranscriberTrainConfig,
                 device: str = "auto") -> None:
        self.data = data
        self.out = out
        self.config = config
        self.device = pick_device(device)
        torch.manual_seed(config.seed)
        dims, state = load_whisper_checkpoint(whisper_path)
        model = Whisper(dims)
        model.load_state_dict(state, strict=True)
        self.shape = LoRAShape(rank=config.rank, alpha=config.alpha)
        self.parameters = add_lora(model, self.shape)
        self.model = model.float().to(self.device)
        self.tokenizer: Tokenizer = whisper.tokenizer.get_tokenizer(multilingual=dims.n_vocab >= 51865)
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.step = 0
        self.train_ids = [i for i, text in enumerate(data.texts) if not is_heldout(text)]
        self.heldout_ids = [i for i, text in enumerate(data.texts) if is_heldout(text)]
        if not self.train_ids:
            raise ValueError("no training clips")

    @classmethod
    def resume_or_new(cls, data: TranscriberData, whisper_path: Path, out: Path, config: TranscriberTrainConfig,
                      resume: bool, device: str = "auto") -> TranscriberTrainer:
        """Resuming keeps the checkpoint's shape and optimisation settings; only `steps` comes from `config`."""
        path = out / CHECKPOINT_FILE
        if not (resume and path.is_file()):
            return cls(data, whisper_path, out, config, device)
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainer = cls(data, whisper_path, out, replace(TranscriberTrainConfig(**state["config"]), steps=config.steps),
                      device)
        trainer.restore(state)
        return trainer

    def trained_module(self) -> torch.nn.Module:
        return self.model

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.parameters

    def model_state(self) -> dict:
        return {"lora": [p.detach().cpu() for p in self.parameters]}

    def load_model_state(self, state: dict) -> None:
        for parameter, saved in zip(self.parameters, state["lora"]):
            parameter.data.copy_(saved)

    def describe(self) -> str:
        return "Whisper LoRA"

    def export(self) -> None:
        save_lora(self.model, self.shape, self.out, {"step": self.step})

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder outputs, decoder inputs and targets (IGNORE where nothing is learned)."""
        tokenizer = self.tokenizer
        prefix = list(tokenizer.sot_sequence_including_notimestamps)
        sequences = [tokenizer.encode(" " + self.data.texts[i])[:MAX_TEXT_TOKENS] if self.data.texts[i] else None
                     for i in ids]
        length = len(prefix) + max(len(s) if s is not None else 0 for s in sequences)
        inputs = torch.full((len(ids), length), tokenizer.eot)
        targets = torch.full((len(ids), length), IGNORE)
        for row, text_ids in enumerate(sequences):
            if text_ids is None:  # no speech: the start position learns <|nospeech|>, the transcript is empty
                inputs[row, : len(prefix)] = torch.tensor(prefix)
                targets[row, 0] = tokenizer.no_speech
                targets[row, len(prefix) - 1] = tokenizer.eot
                continue
            sequence = prefix + text_ids + [tokenizer.eot]
            inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
            targets[row, : len(sequence) - 1] = torch.tensor(sequence[1:])
        features = self.data.features[ids].to(self.device, torch.float32)
        return features, inputs.to(self.device), targets.to(self.device)

    def training_loss(self, ids: list[int]) -> torch.Tensor:
        features, inputs, targets = self.batch(ids)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.autocast):
            logits = self.model.decoder(inputs, features)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    @torch.inference_mode()
    def word_error_rate(self, ids: list[int]) -> float:
        """Greedy transcripts of held-out clips with speech against their texts."""
        self.model.eval()
        options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
        errors = total = 0
        for index in ids:
            features = self.data.features[index : index + 1].to(self.device, torch.float32)
            heard = whisper.decode(self.model, features, options)[0].text
            reference = words(self.data.texts[index])
            errors += edit_distance(reference, words(heard))
            total += len(reference)
        return errors / max(1, total)

    def evaluate(self) -> dict[str, float]:
        ids = self.heldout_ids[: self.config.eval_samples]
        if not ids:
            return {}
        self.model.eval()
        with torch.inference_mode():
            loss = sum(self.training_loss(ids[i : i + 16]).item() * len(ids[i : i + 16]) for i in range(0, len(ids), 16))
        return {"heldout_loss": loss / len(ids), "heldout_wer": self.word_error_rate(ids)}
