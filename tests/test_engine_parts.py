"""The engine's building blocks on their own: batched speech-decoder rows, growing KV buffers, vocoder lookahead."""

from __future__ import annotations

import copy

import numpy as np
import torch
from conftest import FIXTURES

from omni_serve.engine.batch import GrowingLayer
from omni_serve.model.ctc_generator import DecoderCache
from omni_serve.model.units import HiFiGANStream


def test_batched_decoder_rows_with_different_histories_equal_single_rows(fixture_model):
    """Rows whose caches hold 0, 3 and 70 hidden states decode one new state each, batched or alone."""
    generator = fixture_model.network.speech_generator
    torch.manual_seed(0)
    width = generator.input_proj.in_features
    caches = []
    with torch.inference_mode():
        for history in (0, 3, 70):
            cache = DecoderCache()
            if history:
                generator(torch.randn(1, history, width), cache)
            caches.append(cache)
        alone = copy.deepcopy(caches)
        new = torch.randn(3, 1, width)
        batched = generator(new, caches)
        single = torch.cat([generator(new[row : row + 1], alone[row]) for row in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5 * float(single.abs().max()), rtol=0)  # float rounding
    assert torch.equal(batched.argmax(-1), single.argmax(-1))
    assert [c.length for c in caches] == [c.length for c in alone] == [25 * n for n in (1, 4, 71)]


def test_cacheless_run_equals_incremental_run(fixture_model):
    """The reference-style full run and the cached one-state-at-a-time run give the same logits."""
    generator = fixture_model.network.speech_generator
    torch.manual_seed(1)
    hidden = torch.randn(1, 9, generator.input_proj.in_features)
    with torch.inference_mode():
        full = generator(hidden)
        cache = DecoderCache()
        stepped = torch.cat([generator(hidden[:, i : i + 1], cache) for i in range(9)], dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5 * float(full.abs().max()), rtol=0)  # float rounding
    assert torch.equal(stepped.argmax(-1), full.argmax(-1))


def test_growing_layer_equals_concatenated_cache():
    torch.manual_seed(2)
    layer = GrowingLayer()
    keys, values = [], []
    for length in (5, 1, 1, 9, 1, 30, 1):  # crosses several buffer doublings
        k, v = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
        keys.append(k)
        values.append(v)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, torch.cat(keys, dim=2))
        assert torch.equal(got_v, torch.cat(values, dim=2))


def test_vocoder_lookahead_emits_early_and_converges_to_exact(fixture_model, expected):
    """A lookahead below the receptive field emits audio sooner (guessed at the joins); a large one is exact."""
    model = fixture_model.vocoder.model
    units = expected["vocoder"]["units_60"]
    whole = np.load(FIXTURES / "vocoder-outputs" / "units60_dur.npy")
    errors = {}
    for lookahead in (2, 8, model.receptive_field_frames() + 2):
        stream = HiFiGANStream(model, lookahead_frames=lookahead)
        pieces = []
        for start in range(0, len(units), 10):
            final = start + 10 >= len(units)
            pieces.append(stream.push(units[start : start + 10], final))
            if not final:
                assert stream.emitted == max(0, len(stream.frame_units) - lookahead) * model.samples_per_frame
        joined = np.concatenate(pieces)
        assert joined.shape == whole.shape
        errors[lookahead] = float(np.abs(joined - whole).max())
    small, medium, large = errors.values()
    assert large <= 1e-4
    assert small > medium > large


class _BrokenVocoder:
    """Speaks the first chunk, then fails (a vocoder crash in the middle of an answer)."""

    sample_rate = 16_000

    def stream(self):
        return self

    def push(self, units: list[int], final: bool) -> np.ndarray:
        if getattr(self, "spoke", False):
            raise RuntimeError("vocoder crashed")
        self.spoke = True
        return np.zeros(160, dtype=np.float32)

    def vocode(self, units: list[int]) -> np.ndarray:
        raise NotImplementedError


def test_vocoder_failure_ends_the_request_with_one_error_and_the_engine_goes_on(fixture_model, question_audio,
                                                                               expected):
    import dataclasses

    from omni_serve.engine import AudioChunk, Engine, ErrorEvent, Finished, GenerationOptions, SpeechRequest

    engine = Engine(dataclasses.replace(fixture_model, vocoder=_BrokenVocoder()))
    try:
        options = GenerationOptions(max_new_tokens=24, first_chunk_units=1, chunk_units=1)
        events = list(engine.generate(SpeechRequest(question_audio["q1"], options)))
        assert isinstance(events[-1], ErrorEvent) and "vocoder crashed" in events[-1].message
        assert sum(isinstance(e, (ErrorEvent, Finished)) for e in events) == 1
        assert any(isinstance(e, AudioChunk) for e in events)
        text_only = list(engine.generate(SpeechRequest(question_audio["q1"], dataclasses.replace(options, vocode=False))))
        assert isinstance(text_only[-1], Finished)
        assert text_only[-1].token_ids == expected["omni"]["q1"]["generated_ids"]
    finally:
        engine.close()
