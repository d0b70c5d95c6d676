"""Training of a learned CTC unit generator (b) on data written by `omni_serve.default.ctc_data`.

The model is the published `CTCSpeechGenerator` (causal decoder layers, `upsample_factor` positions
per LLM token, blank = unit count), optionally fed [hidden state ; chosen token's embedding], a
within-token position embedding and the chosen token's characters (spelled by the data's
tokenizer). Training is plain CTC loss with AdamW in the loop of `training_run` (seeded batches per
step, so a resumed run takes exactly the steps an uninterrupted one would; checkpoints every
`checkpoint_every` steps and at the end); the trained decoder is exported as fp16 safetensors plus
a json of its shape.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, PreTrainedTokenizerBase

from omni_serve.default.ctc_data import CTCData
from omni_serve.default.training_run import CHECKPOINT_FILE, ResumableTraining, RunSettings, pick_device
from omni_serve.model.ctc_generator import CTCSpeechGenerator, ctc_collapse, spelling_windows

WEIGHTS_FILE = "ctc_decoder.safetensors"
SHAPE_FILE = "ctc_decoder.json"


@dataclass(frozen=True)
class TrainConfig(RunSettings):
    """Decoder shape (and `RunSettings`' optimisation); the defaults are the CPU experiment's 1.75M-parameter decoder."""

    layers: int = 3
    hidden: int = 256
    heads: int = 4
    ffn: int = 512
    upsample_factor: int = 10
    token_embedding: bool = True
    token_positions: bool = True
    token_spelling: int = 0  # characters of the chosen token each position reads (0: none)
    spelling_before: int = 0  # tokens before each token whose characters it reads too
    spelling_after: int = 0  # tokens after it (streaming then holds each token back that many)
    number_places: bool = False  # digits spelled by their place in their number (streaming holds numbers back)


def make_generator(config: TrainConfig, data: CTCData) -> CTCSpeechGenerator:
    """The decoder's layers take the LLM's rope settings (llama3 scaling for the published model), as
    `OmniConfig.ctc_layer_config` gives them when the trained decoder is served."""
    layer_config = LlamaConfig(hidden_size=config.hidden, num_attention_heads=config.heads,
                               num_key_value_heads=config.heads, intermediate_size=config.ffn,
                               num_hidden_layers=config.layers, head_dim=config.hidden // config.heads,
                               rope_parameters=dict(data.rope_parameters),
                               max_position_embeddings=data.max_position_embeddings, rms_norm_eps=1e-5)
    llm_hidden, unit_count = data.llm_hidden, len(data.unit_names)
    return CTCSpeechGenerator(llm_hidden, layer_config, config.upsample_factor, unit_count,
                              token_embedding=config.token_embedding, token_positions=config.token_positions,
                              token_spelling=config.token_spelling,
                              spelling_context=(config.spelling_before, config.spelling_after))


def saved_decoder(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A run's decoder weights in float32 and the fields of its shape: from its checkpoint when it has
    one (exact; the training config, which lists no units), else from its exported fp16 decoder and
    shape record (which does)."""
    if (run / CHECKPOINT_FILE).is_file():
        checkpoint = torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        return checkpoint["model"], checkpoint["config"]
    if not (run / WEIGHTS_FILE).is_file():
        raise ValueError(f"{run} holds neither a {CHECKPOINT_FILE} nor an exported {WEIGHTS_FILE}")
    weights = {name: value.float() for name, value in load_file(str(run / WEIGHTS_FILE)).items()}
    return weights, json.loads((run / SHAPE_FILE).read_text())


def edit_distance(reference: Sequence[Hashable], hypothesis: Sequence[Hashable]) -> int:
    """Levenshtein distance between two sequences (phoneme ids here, words in the quality benchmark)."""
    previous = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, h in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def spelling_position_rows(old: TrainConfig, new: TrainConfig) -> list[tuple[int, int]]:
    """(old row, new row) of every spelling position `old` has: the same character of the same token
    (the token itself, the k-th after it, the k-th before it) in the window layout of `spelling_windows`,
    whose rows are the token's characters, then each neighbour's. A decoder cannot lose characters or
    neighbours it reads."""
    def slots(config: TrainConfig) -> list[int]:  # 0: the token, k: k-th after, -k: k-th before
        return [0, *range(1, config.spelling_after + 1), *range(-1, -config.spelling_before - 1, -1)]

    if new.token_spelling < old.token_spelling or not set(slots(old)) <= set(slots(new)):
        raise ValueError("the decoder would read fewer characters or neighbours than the one it starts from")
    new_slots = slots(new)
    return [(slot * old.token_spelling + char, new_slots.index(token) * new.token_spelling + char)
            for slot, token in enumerate(slots(old)) for char in range(old.token_spelling)]


class Trainer(ResumableTraining):
    """One training run in `out`, new or resumed from its checkpoint. `tokenizer` (the one that made
    the data) spells tokens for a decoder that reads spellings."""

    def __init__(self, data: CTCData, out: Path, config: TrainConfig, device: str = "auto",
                 tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        self.data = data
        self.out = out
        self.config = config
        self.device = pick_device(device)
        torch.manual_seed(config.seed)
        self.unit_count = len(data.unit_names)
        self.generator = make_generator(config, data).to(self.device)
        if config.token_spelling:
            if tokenizer is None:
                raise ValueError("a decoder that reads token spellings needs the tokenizer that made the data")
            self.generator.spell_tokens(tokenizer, len(tokenizer), config.number_places)
        elif config.number_places:
            raise ValueError("number_places needs token_spelling")
        self.optimizer = torch.optim.AdamW(self.generator.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.step = 0
        usable = [i for i in range(len(data))
                  if 0 < len(data.unit_targets(i)) <= (data.tokens(i).stop - data.tokens(i).start) * config.upsample_factor]
        self.train_ids = [i for i in usable if not data.heldout[i]]
        self.heldout_ids = [i for i in usable if data.heldout[i]]
        if not self.train_ids:
            raise ValueError("no training samples (every sample is held out or has more units than frames)")

    @classmethod
    def resume_or_new(cls, data: CTCData, out: Path, config: TrainConfig, resume: bool, device: str = "auto",
                      tokenizer: PreTrainedTokenizerBase | None = None) -> Trainer:
        """Resuming keeps the checkpoint's shape and optimisation settings; only `steps` comes from `config`."""
        path = out / CHECKPOINT_FILE
        if not (resume and path.is_file()):
            return cls(data, out, config, device, tokenizer)
        state = torch.load(path, map_location="cpu", weights_only=False)
        trainer = cls(data, out, replace(TrainConfig(**state["config"]), steps=config.steps), device, tokenizer)
        trainer.restore(state)
        return trainer

    def trained_module(self) -> torch.nn.Module:
        return self.generator

    def trainable(self) -> list[torch.nn.Parameter]:
        return list(self.generator.parameters())

    def model_state(self) -> dict:
        return {"model": self.generator.state_dict()}

    def load_model_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["model"])

    def warm_start(self, run: Path) -> None:
        """Begin this new run from the decoder of another run (its checkpoint) or from an exported
        decoder (`checkpoints/omni-smol` ships only that), so that giving a trained decoder a spelling
        context, longer spellings or new text costs a fine-tune rather than a run from scratch. Every
        weight must match by name and shape, except the spelling position table, which grows with the
        context and the characters read per token: each of its old rows moves to the row of the same
        character of the same neighbour (`spelling_position_rows`), the rest stay new."""
        old, old_config = self._decoder_in(run)
        state = self.generator.state_dict()
        if set(old) != set(state):
            raise ValueError(f"{run} holds a decoder of another kind (weights differ: {sorted(set(old) ^ set(state))})")
        for name, value in old.items():
            value = value.to(state[name].device)
            if name.endswith("char_position_embed.weight"):  # the layout may differ at the same size
                moves = spelling_position_rows(old_config, self.config)
                state[name][[new for _, new in moves]] = value[[old_row for old_row, _ in moves]]
            elif value.shape != state[name].shape:
                raise ValueError(f"{run}: {name} has shape {tuple(value.shape)}, this decoder {tuple(state[name].shape)}")
            else:
                state[name] = value
        self.generator.load_state_dict(state)

    def _decoder_in(self, run: Path) -> tuple[dict[str, torch.Tensor], TrainConfig]:
        """The weights and shape of a run's decoder (`saved_decoder`); an exported one's units must be
        this data's, in this order (the output rows are read by position)."""
        weights, shape = saved_decoder(run)
        if "units" in shape and shape["units"] != self.data.unit_names:
            raise ValueError(f"{run}'s decoder speaks other units than this data's")
        return weights, TrainConfig(**{f.name: shape[f.name] for f in fields(TrainConfig) if f.name in shape})

    def describe(self) -> str:
        return "CTC decoder"

    def batch(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded inputs (batch, tokens, in) and the tokens' spelling windows (batch, tokens, window;
        -1 pads), frame lengths, concatenated targets and their lengths."""
        inputs = [self.data.inputs(i, self.config.token_embedding) for i in ids]
        padded = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)
        rows = [torch.tensor(self.generator.spelling_rows(self.data.token_ids[self.data.tokens(i)].tolist())) for i in ids]
        token_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
        windows = spelling_windows(token_ids, self.config.spelling_before, self.config.spelling_after)
        frames = torch.tensor([len(x) * self.config.upsample_factor for x in inputs])
        targets = [self.data.unit_targets(i) for i in ids]
        return (padded.to(self.device), windows.to(self.device), frames, torch.cat(targets),
                torch.tensor([len(t) for t in targets]))

    def logits(self, inputs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.autocast):
            return self.generator(inputs, token_ids=token_ids).float()

    def training_loss(self, ids: list[int]) -> torch.Tensor:
        inputs, token_ids, frames, targets, target_lengths = self.batch(ids)
        log_probs = F.log_softmax(self.logits(inputs, token_ids), dim=-1).transpose(0, 1)  # (frames, batch, units + 1)
        return F.ctc_loss(log_probs, targets.to(self.device), frames, target_lengths,
                          blank=self.generator.blank_id, zero_infinity=True)

    @torch.no_grad()
    def phoneme_error_rate(self, ids: list[int]) -> float:
        """Edit distance of greedy CTC decoding to the targets, over the targets' total length."""
        self.generator.eval()
        errors = total = 0
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            inputs, token_ids, frames, _, _ = self.batch(chunk)
            best = self.logits(inputs, token_ids).argmax(-1).cpu()
            for row, index in enumerate(chunk):
                units = ctc_collapse(best[row, : int(frames[row])].tolist(), self.generator.blank_id)
                reference = self.data.unit_targets(index).tolist()
                errors += edit_distance(reference, units)
                total += len(reference)
        return errors / max(1, total)

    def evaluate(self) -> dict[str, float]:
        n = self.config.eval_samples
        result = {"train_per": self.phoneme_error_rate(self.train_ids[:n])}
        if self.heldout_ids:
            result["heldout_per"] = self.phoneme_error_rate(self.heldout_ids[:n])
        return result

    def export(self) -> None:
        """fp16 weights (the checkpoint's key names) and the decoder's shape, for loading beside a model."""
        self.out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().half().contiguous().cpu() for k, v in self.generator.state_dict().items()}
        save_file(weights, str(self.out / WEIGHTS_FILE))
        shape = {**asdict(self.config), "llm_hidden": self.data.llm_hidden, "units": self.data.unit_names,
                 "rope_theta": self.data.rope_theta, "rope_parameters": self.data.rope_parameters, "step": self.step}
        (self.out / SHAPE_FILE).write_text(json.dumps(shape, indent=1))
