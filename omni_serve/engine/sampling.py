"""Next-token choice: greedy, or temperature with nucleus (top-p) filtering and a per-request seed.

Frequency and presence penalties (the OpenAI API's) lower the logits of tokens the answer already
holds before either choice, so a client can keep a small model from repeating itself in a loop.
"""

from __future__ import annotations

import torch

from omni_serve.engine.options import GenerationOptions


def penalized(logits: torch.Tensor, generated: list[int], frequency_penalty: float,
              presence_penalty: float) -> torch.Tensor:
    """`logits` less `frequency_penalty` per earlier use of each token and `presence_penalty` once for any use."""
    if not generated or (frequency_penalty == 0 and presence_penalty == 0):
        return logits
    counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[-1]).to(logits.dtype)
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


def choose_token(logits: torch.Tensor, options: GenerationOptions, generated: list[int],
                 generator: torch.Generator | None) -> int:
    """Pick one token id from a (vocab,) float32 logit vector, given the tokens generated so far."""
    logits = penalized(logits, generated, options.frequency_penalty, options.presence_penalty)
    if options.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < options.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
