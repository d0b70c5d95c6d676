"""Low-rank adaptation (LoRA) of Whisper's text decoder, and its merge into a plain Whisper checkpoint.

Whisper tiny.en mishears espeak-ng's voices (the quality benchmark's questions are spoken by
them, and so is any demo that synthesises its input). Training low-rank updates of the decoder's
linear layers on espeak speech (`transcriber_train`) adapts it in about half a megabyte of weights
while the encoder, embeddings and norms stay Whisper's own. At build time the updates are merged
into the converted checkpoint (W + strength * scale * B @ A), so the model folder holds an ordinary
openai-whisper checkpoint and serving needs no LoRA code at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from whisper.model import Whisper

from omni_serve.model.errors import CheckpointError

WEIGHTS_FILE = "whisper_lora.safetensors"
SHAPE_FILE = "whisper_lora.json"
# Every linear layer of every decoder block: self- and cross-attention projections and the MLP.
TARGETS = ("attn.query", "attn.key", "attn.value", "attn.out",
           "cross_attn.query", "cross_attn.key", "cross_attn.value", "cross_attn.out", "mlp.0", "mlp.2")


@dataclass(frozen=True)
class LoRAShape:
    """Rank and scale of the updates; `alpha / rank` multiplies B @ A."""

    rank: int = 16
    alpha: float = 32.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; B starts at zero, so training starts from Whisper."""

    def __init__(self, base: nn.Linear, shape: LoRAShape) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(shape.rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, shape.rank))
        self.scale = shape.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + update * self.scale


def decoder_target_names(text_layers: int) -> list[str]:
    """Module names (as in the state dict) of the decoder layers that get an update."""
    return [f"decoder.blocks.{i}.{target}" for i in range(text_layers) for target in TARGETS]


def add_lora(model: Whisper, shape: LoRAShape) -> list[nn.Parameter]:
    """Freeze `model`, wrap its decoder's linear layers in LoRALinear; the new (trainable) parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for name in decoder_target_names(len(model.decoder.blocks)):
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        wrapped = LoRALinear(getattr(parent, child), shape)  # "mlp.0" works too: Sequential names its parts
        setattr(parent, child, wrapped)
        trainable += [wrapped.lora_a, wrapped.lora_b]
    return trainable


def lora_tensors(model: Whisper) -> dict[str, torch.Tensor]:
    """The updates of a model made by `add_lora`, keyed `<layer>.lora_a` / `<layer>.lora_b`, fp16."""
    tensors = {}
    for name in decoder_target_names(len(model.decoder.blocks)):
        layer = model.get_submodule(name)
        tensors[f"{name}.lora_a"] = layer.lora_a.detach().half().contiguous().cpu()
        tensors[f"{name}.lora_b"] = layer.lora_b.detach().half().contiguous().cpu()
    return tensors


def save_lora(model: Whisper, shape: LoRAShape, folder: Path, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora_tensors(model), str(folder / WEIGHTS_FILE))
    (folder / SHAPE_FILE).write_text(json.dumps({**asdict(shape), "targets": list(TARGETS), **extra}, indent=1))


def adapt_whisper_checkpoint(checkpoint: Path, folder: Path, strength: float = 1.0) -> dict:
    """Merge the updates in `folder` into the openai-whisper checkpoint file in place; their record."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    saved["model_state_dict"] = merge_lora(saved["model_state_dict"], folder, strength)
    torch.save(saved, checkpoint)
    return {**json.loads((folder / SHAPE_FILE).read_text()), "merge_strength": strength}


def merge_lora(state: dict[str, torch.Tensor], folder: Path, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """`state` (an openai-whisper state dict) with `strength` x the updates in `folder` added to its weights.

    A strength below 1 moves the merged model part of the way from Whisper to the trained adaptation:
    the updates were fitted to a few thousand synthetic clips, and less than all of them can
    generalise better to unseen voices (see `build.WHISPER_ADAPTATION_STRENGTH`).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"the merge strength must lie in [0, 1], got {strength}")
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / SHAPE_FILE).is_file():
        raise CheckpointError(f"no Whisper adaptation ({WEIGHTS_FILE}, {SHAPE_FILE}) in {folder}")
    record = json.loads((folder / SHAPE_FILE).read_text())
    shape = LoRAShape(rank=int(record["rank"]), alpha=float(record["alpha"]))
    tensors = load_file(str(folder / WEIGHTS_FILE))
    merged = dict(state)
    for key in tensors:
        if not key.endswith(".lora_a"):
            continue
        name = key.removesuffix(".lora_a")
        weight = f"{name}.weight"
        if weight not in merged:
            raise CheckpointError(f"the Whisper adaptation updates {name}, which the checkpoint lacks")
        update = tensors[f"{name}.lora_b"].float() @ tensors[key].float() * (shape.scale * strength)
        if update.shape != merged[weight].shape:
            raise CheckpointError(f"the Whisper adaptation of {name} has shape {tuple(update.shape)}, "
                                  f"the checkpoint's {tuple(merged[weight].shape)}")
        merged[weight] = (merged[weight].float() + update).to(merged[weight].dtype)
    return merged
