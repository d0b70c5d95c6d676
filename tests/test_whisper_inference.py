"""Beam decoding with shared audio keys computes what openai-whisper's own inference computes."""

from __future__ import annotations

import pytest
import torch
from whisper.decoding import PyTorchInference
from whisper.model import ModelDimensions, Whisper

from omni_serve.model.whisper_inference import SharedAudioInference

PROMPT_LENGTH = 3


@pytest.fixture(scope="module")
def whisper_model() -> Whisper:
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=16, n_audio_ctx=24, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                           n_vocab=50, n_text_ctx=16, n_text_state=32, n_text_head=4, n_text_layer=2)
    model = Whisper(dims).eval()
    with torch.no_grad():  # Whisper's init leaves some weights at zero; make every path matter
        for param in model.decoder.parameters():
            param.normal_(0, 0.3)
    return model


def decode_steps(inference, audio_features: torch.Tensor, prompt: torch.Tensor, appended: list[torch.Tensor],
                 reorders: list[list[int]]) -> list[torch.Tensor]:
    """Logits of the prompt pass, then of one pass per step: beams rearranged, then one token appended."""
    tokens = prompt
    outputs = [inference.logits(tokens, audio_features)]
    for order, token in zip(reorders, appended):
        tokens = torch.cat([tokens[order], token], dim=1)
        inference.rearrange_kv_cache(order)
        outputs.append(inference.logits(tokens, audio_features))
    inference.cleanup_caching()
    return outputs


def random_tokens(rows: int, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50, (rows, PROMPT_LENGTH), generator=generator)
    return prompt, [torch.randint(0, 50, (rows, 1), generator=generator) for _ in range(steps)]


@torch.inference_mode()
def test_one_window_matches_whispers_inference(whisper_model):
    audio_features = torch.randn(1, 24, 32)
    reorders = [[0, 0, 1, 2], [3, 1, 1, 0], [0, 1, 2, 3], [2, 2, 2, 2]]
    prompt, appended = random_tokens(4, len(reorders))
    ours = decode_steps(SharedAudioInference(whisper_model), audio_features, prompt, appended, reorders)
    theirs = decode_steps(PyTorchInference(whisper_model, PROMPT_LENGTH), audio_features, prompt, appended, reorders)
    assert len(ours) == len(theirs) == 5
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[-2][0], ours[-2][1])  # the beams really differ


@torch.inference_mode()
def test_several_windows_decode_as_each_window_alone(whisper_model):
    """Whisper's own inference cannot broadcast one window's keys over another's beams; ours keeps them apart."""
    windows = torch.randn(2, 24, 32)
    reorders = [[1, 1, 0, 5, 3, 3], [0, 2, 1, 4, 4, 5], [2, 1, 0, 3, 4, 5]]  # beams stay within their window
    prompt, appended = random_tokens(6, len(reorders))
    together = decode_steps(SharedAudioInference(whisper_model), windows, prompt, appended, reorders)
    for index in range(2):
        rows = slice(3 * index, 3 * index + 3)
        local = [[i - 3 * index for i in order[rows]] for order in reorders]
        alone = decode_steps(PyTorchInference(whisper_model, PROMPT_LENGTH), windows[index:index + 1], prompt[rows],
                             [token[rows] for token in appended], local)
        for mine, reference in zip(together, alone):
            torch.testing.assert_close(mine[rows], reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # what the shared keys are for: Whisper's own fails here
        PyTorchInference(whisper_model, PROMPT_LENGTH).logits(prompt, windows)
