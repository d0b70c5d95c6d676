"""The training loop the default model's two trainers share (CTC speech decoder, Whisper adaptation).

Each step draws its batch from a generator seeded by the step number, so a resumed run takes exactly
the steps an uninterrupted one would; the learning rate warms up linearly, then decays by a cosine
to a tenth over the planned steps; gradients are clipped to norm 1. Every `eval_every` steps the run
is evaluated and the result appended to log.jsonl; every `checkpoint_every` steps (and at the end)
the trainable weights, optimizer and step are saved atomically; at the end the trained weights are
exported. Subclasses say what is trained, how a batch's loss is computed, and what is exported.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


def pick_device(device: str) -> torch.device:
    """"auto": CUDA when available, else CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def warmup_cosine(step: int, peak: float, warmup_steps: int, steps: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it over the planned `steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def append_record(out: Path, entry: dict) -> None:
    """Log one evaluation and append it to the run folder's log.jsonl."""
    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()))
    out.mkdir(parents=True, exist_ok=True)
    with (out / LOG_FILE).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


@dataclass(frozen=True)
class RunSettings:
    """Optimisation and schedule that every trainer has; each trainer's config adds what it trains
    (and sets the defaults that suit it)."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    batch_size: int = 16
    steps: int = 1000
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_samples: int = 200
    seed: int = 0
    autocast: bool = True  # bf16 autocast: 1.5x faster on this CPU, and the GPU default


class ResumableTraining:
    """One run in `out`. Subclasses set `config`, `optimizer`, `train_ids`, `heldout_ids` and `device`,
    and implement the methods below that raise NotImplementedError."""

    out: Path
    config: RunSettings
    optimizer: torch.optim.Optimizer
    train_ids: list[int]
    heldout_ids: list[int]
    device: torch.device
    step: int = 0

    def trained_module(self) -> nn.Module:
        """The module put in training mode for each step."""
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def training_loss(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def model_state(self) -> dict[str, Any]:
        """What the checkpoint keeps of the trained weights (beside optimizer, step and config)."""
        raise NotImplementedError

    def load_model_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def export(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """The run's opening log line."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable())

    def learning_rate(self, step: int) -> float:
        return warmup_cosine(step, self.config.learning_rate, self.config.warmup_steps, self.config.steps)

    def train_step(self) -> float:
        rng = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        picks = torch.randint(len(self.train_ids), (min(self.config.batch_size, len(self.train_ids)),), generator=rng)
        self.trained_module().train()
        loss = self.training_loss([self.train_ids[int(i)] for i in picks])
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable(), 1.0)
        self.optimizer.step()
        self.step += 1
        return loss.item()

    def save_checkpoint(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {**self.model_state(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "config": asdict(self.config)}
        temporary = self.out / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, temporary)
        temporary.replace(self.out / CHECKPOINT_FILE)  # a run killed while saving keeps the previous one

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's weights, optimizer and step."""
        self.load_model_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        log.info("resumed %s at step %d", self.out / CHECKPOINT_FILE, self.step)

    def run(self, max_seconds: float | None = None, until_step: int | None = None) -> dict[str, float]:
        """Train up to `config.steps` (or until `max_seconds` or `until_step`), checkpointing; export; the
        last evaluation. Stopping early keeps the planned learning-rate schedule, so a resumed run with
        the same `steps` takes exactly the steps an uninterrupted one would."""
        config = self.config
        end = min(config.steps, until_step if until_step is not None else config.steps)
        began = time.perf_counter()
        log.info("%s: %d parameters; %d train / %d held out; device %s", self.describe(), self.parameter_count(),
                 len(self.train_ids), len(self.heldout_ids), self.device)
        losses: list[float] = []
        result: dict[str, float] = {}
        while self.step < end:
            losses.append(self.train_step())
            last = self.step == end or (max_seconds is not None and time.perf_counter() - began > max_seconds)
            if self.step % config.eval_every == 0 or last:
                result = {"step": self.step, "loss": sum(losses) / len(losses), **self.evaluate(),
                          "seconds": round(time.perf_counter() - began, 1)}
                append_record(self.out, result)
                losses = []
            if self.step % config.checkpoint_every == 0 or last:
                self.save_checkpoint()
            if last:
                break
        self.export()
        return result
