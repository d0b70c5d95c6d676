"""Generator (b) as the engine streams it against one full pass of its decoder, as in training."""

from __future__ import annotations

import torch

from omni_serve.default.ctc_data import DataOptions, HiddenStateCapture
from omni_serve.engine import Engine, Finished, GenerationOptions, SpeechRequest
from omni_serve.model.ctc_generator import ctc_collapse, spelling_windows
from omni_serve.model.loader import OmniModel


def streamed_and_offline_units(model: OmniModel, question: str, max_new_tokens: int) -> tuple[list, list[int]]:
    """The engine's events for `question` typed, and the units one full pass of the model's CTC decoder
    gives over the same answer (teacher-forced hidden states, token embeddings and token ids)."""
    engine = Engine(model)
    try:
        events = list(engine.generate(SpeechRequest(None, GenerationOptions(max_new_tokens=max_new_tokens), text=question)))
    finally:
        engine.close()
    final = events[-1]
    assert isinstance(final, Finished) and final.units
    answer = final.token_ids[:-1] if final.stopped_on_eos else final.token_ids
    generator = model.network.speech_generator
    with torch.inference_mode():
        hidden = HiddenStateCapture(model, DataOptions()).teacher_forced(question, answer)
        inputs = torch.cat([hidden, model.network.embed_tokens(torch.tensor(answer)).float()], dim=-1)
        windows = spelling_windows(torch.tensor([generator.spelling_rows(answer)]), *generator.spelling_context)
        logits = generator(inputs.unsqueeze(0), token_ids=windows)
    return events, ctc_collapse(logits[0].argmax(-1).tolist(), generator.blank_id)
