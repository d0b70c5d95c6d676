"""Parity with the reference implementation's recorded outputs (tolerances from the fixture README)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FIXTURES, QUESTIONS

from omni_serve.engine import AudioChunk, Finished, GenerationOptions, SpeechRequest, UnitChunk
from omni_serve.model.ctc_generator import ctc_collapse
from omni_serve.model.prompt import tokenize_speech_prompt

MAX_NEW_TOKENS = 24  # the reference run's generate() argument


@pytest.mark.parametrize("question", QUESTIONS)
def test_audio_is_read_like_whisper(question, question_audio, expected):
    record = expected["omni"][question]
    audio = question_audio[question]
    assert audio.size == record["num_samples"]
    np.testing.assert_allclose(audio[:10], record["audio_first10"], atol=1e-7)


@pytest.mark.parametrize("question", QUESTIONS)
def test_front_end_matches_reference(question, fixture_model, question_audio, intermediates):
    mel, encoded, adapted = (t.cpu() for t in fixture_model.front_end.features(question_audio[question]))
    torch.testing.assert_close(mel[0].T, intermediates[f"{question}.mel"], atol=1e-4, rtol=0)
    torch.testing.assert_close(encoded[0], intermediates[f"{question}.encoder_out"], atol=1e-4, rtol=0)
    torch.testing.assert_close(adapted[0], intermediates[f"{question}.speech_features"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("question", QUESTIONS)
def test_prompt_ids_match_reference(question, fixture_model, expected):
    record = expected["omni"][question]
    template = fixture_model.template
    prompt = template.opening() + template.user_turn()
    assert prompt == record["prompt"]
    assert tokenize_speech_prompt(fixture_model.tokenizer, prompt, first=True) == record["input_ids"]


def test_extra_tokenizer_cases(fixture_model, expected):
    for case in ("tokenizer_speech_token_two_placeholders", "tokenizer_speech_token_prompt_without_literal_bos"):
        record = expected["tokenizer"][case]
        assert tokenize_speech_prompt(fixture_model.tokenizer, record["prompt"], first=True) == record["ids"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_every_step_logits_and_ctc_match(question, fixture_model, question_audio, expected, intermediates):
    """Teacher-force the reference's tokens and compare logits, hidden states and CTC frames step by step."""
    record = expected["omni"][question]
    network = fixture_model.network
    speech = fixture_model.front_end.encode(question_audio[question])
    with torch.inference_mode():
        embeds = network.embed_prompt(record["input_ids"], [speech])
        assert embeds.shape[1] == record["inputs_embeds_length"]
        cache = network.new_cache()
        step = network.step(embeds, cache)
        logits, hidden = [step.logits[0]], [step.hidden[0]]
        for token in record["generated_ids"][:-1]:
            step = network.step(network.embed_tokens(torch.tensor([[token]], device=fixture_model.device)), cache)
            logits.append(step.logits[0])
            hidden.append(step.hidden[0])
        hidden = torch.stack(hidden)
        torch.testing.assert_close(torch.stack(logits).cpu(), intermediates[f"{question}.step_logits"], atol=1e-3,
                                   rtol=1e-4)
        torch.testing.assert_close(hidden.cpu(), intermediates[f"{question}.ctc_hidden"], atol=1e-3, rtol=1e-4)
        # The decoder reads the reference's hidden states: each stage is held to its own tolerance. Fed our
        # own (within 1e-3 of them), it amplified fp32 reordering on an H200 to 7e-3 in a logit near zero.
        reference_hidden = intermediates[f"{question}.ctc_hidden"].to(fixture_model.device)
        ctc_logits = network.speech_generator(reference_hidden.unsqueeze(0))[0].cpu()
    torch.testing.assert_close(ctc_logits[:50], intermediates[f"{question}.ctc_logits_first50"], atol=1e-3, rtol=1e-4)
    frames = ctc_logits.argmax(-1).tolist()
    assert frames == record["ctc_pred_raw"]
    assert ctc_collapse(frames, network.speech_generator.blank_id) == record["units"]


@pytest.mark.parametrize("question", QUESTIONS)
def test_engine_reproduces_reference_generation(question, engine, question_audio, expected):
    record = expected["omni"][question]
    events = list(engine.generate(SpeechRequest(question_audio[question], GenerationOptions(max_new_tokens=MAX_NEW_TOKENS))))
    final = events[-1]
    assert isinstance(final, Finished)
    assert final.token_ids == record["generated_ids"]
    assert final.stopped_on_eos == record["stopped_on_eos"]
    assert final.units == record["units"]
    assert final.text.strip() == record["decoded_text_skip_special_strip"]
    per_step = [e.units for e in events if isinstance(e, UnitChunk)]
    assert per_step == [units for units in record["streaming"]["new_units_per_step"] if units]
    audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
    reference = np.load(FIXTURES / "vocoder-outputs" / f"{question}_all_units_dur.npy")
    assert audio.shape == reference.shape
    np.testing.assert_allclose(audio, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,use_durations", [("units60_dur", True), ("units60_nodur", False)])
def test_vocoder_matches_fairseq(name, use_durations, fixture_model, expected):
    model = fixture_model.vocoder.model
    units = torch.tensor([expected["vocoder"]["units_60"]], device=fixture_model.device)
    run = expected["vocoder"]["runs"][name]
    if use_durations:
        assert model.durations(units)[0].tolist() == run["durations"]
    audio = model(units, use_durations).cpu().numpy()
    assert audio.size == run["num_samples"]
    np.testing.assert_allclose(audio, np.load(FIXTURES / "vocoder-outputs" / f"{name}.npy"), atol=1e-5, rtol=0)


def test_reference_chunked_vocoding_is_reproduced_and_differs_from_whole(fixture_model, expected):
    """The reference's independent chunks (fixture) differ from whole-utterance audio; ours do not."""
    vocoder = fixture_model.vocoder
    units = expected["vocoder"]["units_60"]
    for size in (10, 40):
        independent = np.concatenate([vocoder.vocode(units[i : i + size]) for i in range(0, len(units), size)])
        reference = np.load(FIXTURES / "vocoder-outputs" / f"units60_stream_chunk{size}.npy")
        assert independent.shape == reference.shape
        np.testing.assert_allclose(independent, reference, atol=1e-5, rtol=0)
