"""Speech adaptor: stack k encoder frames, then a two-layer MLP into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn

ADAPTOR_WIDTH = 2048  # the reference hard-codes this intermediate width


class SpeechProjector(nn.Module):
    """(batch, frames, encoder_dim) -> (batch, frames // k, llm_dim); leftover frames are dropped."""

    def __init__(self, encoder_dim: int, llm_dim: int, stack: int, width: int = ADAPTOR_WIDTH) -> None:
        super().__init__()
        self.stack = stack
        self.linear1 = nn.Linear(encoder_dim * stack, width)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(width, llm_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, length, dim = frames.shape
        usable = length - length % self.stack
        stacked = frames[:, :usable].reshape(batch, usable // self.stack, dim * self.stack)
        return self.linear2(self.relu(self.linear1(stacked)))
