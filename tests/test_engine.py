"""Engine behaviour: streaming vocoder exactness, batching, cancellation, multi-turn and text deltas."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from omni_serve.engine import AudioChunk, ErrorEvent, Finished, GenerationOptions, SpeechRequest, TextDelta
from omni_serve.engine.detokenizer import Detokenizer
from omni_serve.engine.sampling import penalized
from omni_serve.model.units import HiFiGANStream


@pytest.mark.parametrize("chunk", [1, 10, 40])
def test_streamed_vocoder_equals_whole_utterance(chunk, fixture_model, expected):
    units = expected["vocoder"]["units_60"]
    whole = np.load(FIXTURES / "vocoder-outputs" / "units60_dur.npy")
    stream = HiFiGANStream(fixture_model.vocoder.model)
    pieces = [stream.push(units[i : i + chunk], final=i + chunk >= len(units)) for i in range(0, len(units), chunk)]
    joined = np.concatenate(pieces)
    assert joined.shape == whole.shape
    np.testing.assert_allclose(joined, whole, atol=1e-4, rtol=0)
    assert sum(p.size > 0 for p in pieces) >= min(2, len(pieces))  # audio really arrives before the end


def test_receptive_field_bound_holds(fixture_model):
    """Changing one frame changes no sample farther than the stated receptive field."""
    model = fixture_model.vocoder.model
    with torch.inference_mode():
        frames = model.frames(torch.randint(0, 1000, (1, 120), device=fixture_model.device), None)
        base = model.synthesize(frames)
        changed = frames.clone()
        changed[:, :, 60] += 1.0
        diff = (model.synthesize(changed) - base).abs().cpu().numpy()
    touched = np.nonzero(diff > 1e-7)[0] // model.samples_per_frame
    reach = max(60 - touched.min(), touched.max() - 60)
    assert 0 < reach <= model.receptive_field_frames()


def _run(engine, audio, **options):
    return list(engine.generate(SpeechRequest(audio, GenerationOptions(**options))))


def test_concurrent_requests_equal_unbatched(engine, question_audio, expected):
    results: dict[str, list] = {}

    def worker(name, audio):
        results[name] = _run(engine, audio, max_new_tokens=24)

    threads = [threading.Thread(target=worker, args=(f"{q}-{i}", question_audio[q])) for i in range(3) for q in ("q1", "q2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for name, events in results.items():
        record = expected["omni"][name.split("-")[0]]
        assert events[-1].token_ids == record["generated_ids"]
        assert events[-1].units == record["units"]
    assert len(results) == 6


def test_sampling_is_reproducible_with_a_seed(engine, question_audio):
    first = _run(engine, question_audio["q1"], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)[-1]
    second = _run(engine, question_audio["q1"], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)[-1]
    other = _run(engine, question_audio["q1"], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=8)[-1]
    assert first.token_ids == second.token_ids
    assert first.token_ids != other.token_ids


def test_penalties_lower_the_logits_of_tokens_already_said():
    logits = torch.zeros(6)
    lowered = penalized(logits, [3, 3, 5], frequency_penalty=0.5, presence_penalty=1.0)
    assert lowered.tolist() == [0.0, 0.0, 0.0, -2.0, 0.0, -1.5]  # 2 x 0.5 + 1, 1 x 0.5 + 1
    assert penalized(logits, [], 0.5, 1.0) is logits
    with pytest.raises(ValueError, match="penalty"):
        GenerationOptions(presence_penalty=2.5)


def test_a_presence_penalty_stops_greedy_repeats_and_a_negative_one_adds_them(engine, question_audio):
    plain = _run(engine, question_audio["q2"], max_new_tokens=24, vocode=False)[-1].token_ids
    repeating = _run(engine, question_audio["q2"], max_new_tokens=24, frequency_penalty=-2.0,
                     vocode=False)[-1].token_ids
    distinct = _run(engine, question_audio["q2"], max_new_tokens=24, presence_penalty=2.0,
                    vocode=False)[-1].token_ids
    assert len(set(plain)) < len(plain)  # the fixture's greedy answer repeats tokens
    assert len(set(distinct)) == len(distinct) == 24 and distinct[:6] == plain[:6]
    assert len(set(repeating)) < len(set(plain))


def test_text_deltas_join_to_final_text(engine, question_audio):
    events = _run(engine, question_audio["q2"], max_new_tokens=24)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == events[-1].text


def test_detokenizer_never_splits_a_character(fixture_model):
    tokenizer = fixture_model.tokenizer
    text = "café über naïve"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detokenizer = Detokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in delta for delta in deltas)


def test_cancellation_stops_generation_and_frees_the_slot(engine, question_audio):
    stream = engine.generate(SpeechRequest(question_audio["q1"], GenerationOptions(max_new_tokens=2000)))
    next(stream)
    stream.close()  # consumer goes away
    deadline = time.time() + 5
    while engine.queue_length and time.time() < deadline:
        time.sleep(0.01)
    assert engine.queue_length == 0


def test_multi_turn_reuses_prefix_and_equals_recomputation(fixture_model, question_audio):
    from omni_serve.engine import Engine

    engine = Engine(fixture_model)
    try:
        first = _run_turn(engine, question_audio["q1"], "chat")
        second = _run_turn(engine, question_audio["q2"], "chat")
        conversation = engine._conversations["chat"]
        cached_positions = conversation.cache.get_seq_length()
        # Recompute the whole conversation from scratch: same ids and speech, no cache.
        network = fixture_model.network
        with torch.inference_mode():
            speech = [fixture_model.front_end.encode(question_audio[q]) for q in ("q1", "q2")]
            embeds = network.embed_prompt(conversation.ids, speech)
            assert embeds.shape[1] == cached_positions
            cache = network.new_cache()
            network.step(embeds[:, :-1], cache)
            last = network.step(embeds[:, -1:], cache)
        # The last fed position predicted the answer's last token.
        assert int(last.logits[0].argmax()) == second.token_ids[-1]
        assert first.token_ids != second.token_ids
        # Prefix reuse: the second turn's prefill covered only its new positions.
        assert conversation.ids[: len(first_prompt_ids(engine, fixture_model))] == first_prompt_ids(engine, fixture_model)
        assert engine.end_conversation("chat")
    finally:
        engine.close()


def first_prompt_ids(engine, model):
    from omni_serve.model.prompt import tokenize_speech_prompt

    return tokenize_speech_prompt(model.tokenizer, model.template.opening() + model.template.user_turn(), first=True)


def _run_turn(engine, audio, conversation_id):
    events = list(engine.generate(SpeechRequest(audio, GenerationOptions(max_new_tokens=8), conversation_id=conversation_id)))
    assert isinstance(events[-1], Finished)
    return events[-1]


def test_multi_turn_answer_equals_single_prefill_of_whole_history(fixture_model, question_audio):
    """Greedy second-turn answer with cache reuse == greedy answer after recomputing the history."""
    from omni_serve.engine import Engine

    engine = Engine(fixture_model)
    try:
        _run_turn(engine, question_audio["q1"], "a")
        reused = _run_turn(engine, question_audio["q2"], "a")
        _run_turn(engine, question_audio["q1"], "b")
        engine._conversations["b"].cache = None  # force a full recomputation of the history
        recomputed = _run_turn(engine, question_audio["q2"], "b")
        assert reused.token_ids == recomputed.token_ids
        assert reused.units == recomputed.units
    finally:
        engine.close()


def test_context_overflow_is_a_clear_error(fixture_model, question_audio):
    from omni_serve.engine import Engine

    engine = Engine(fixture_model, max_context=500)
    try:
        events = list(engine.generate(SpeechRequest(question_audio["q1"], GenerationOptions(max_new_tokens=200))))
        assert isinstance(events[-1], ErrorEvent) and events[-1].code == "context_full"
        assert "new conversation" in events[-1].message
    finally:
        engine.close()


def test_bad_audio_is_an_error_event(engine):
    events = list(engine.generate(SpeechRequest(np.zeros(16000, dtype=np.float32))))
    assert isinstance(events[-1], ErrorEvent) and events[-1].code == "bad_audio"
    assert "silent" in events[-1].message


def test_events_come_in_order_with_timings(engine, question_audio):
    events = _run(engine, question_audio["q1"], max_new_tokens=24, first_chunk_units=5, chunk_units=20)
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "Finished"
    assert kinds.index("AudioChunk") < len(kinds) - 2  # audio starts before the answer ends
    timings = events[-1].timings
    assert 0 < timings.first_token_s <= timings.first_audio_s <= timings.total_s
    audio = sum(e.samples.size for e in events if isinstance(e, AudioChunk))
    assert timings.audio_s == pytest.approx(audio / 16000)


def test_history_ids_equal_the_whole_conversation_rendered_at_once(fixture_model):
    from omni_serve.engine.prompting import PromptBuilder
    from omni_serve.model.prompt import tokenize_speech_prompt

    tokenizer, template = fixture_model.tokenizer, fixture_model.template
    builder = PromptBuilder(fixture_model, tokenizer.eos_token_id)
    content = builder.user_content(True, None)
    pieces = builder.turn_ids(content, True) + builder.answer_ids("Paris is the capital.") + builder.turn_ids(content, False)
    whole = (template.opening() + template.user_turn() + "Paris is the capital.<|eot_id|>"
             + template.after_answer + template.user_turn())
    assert pieces == tokenize_speech_prompt(tokenizer, whole, first=True)
    assert builder.user_content(False, "What is the capital of France?") == "What is the capital of France?"


def test_history_and_typed_text_requests(engine, question_audio):
    from omni_serve.engine import PastTurn

    plain = _run(engine, question_audio["q2"], max_new_tokens=8)[-1]
    history = [PastTurn(answer="Paris is the capital.", audio=question_audio["q1"])]
    events = list(engine.generate(SpeechRequest(question_audio["q2"], GenerationOptions(max_new_tokens=8), history=history)))
    assert isinstance(events[-1], Finished) and events[-1].token_ids != plain.token_ids
    typed = list(engine.generate(SpeechRequest(None, GenerationOptions(max_new_tokens=8), text="What is the capital of France?")))
    assert isinstance(typed[-1], Finished) and typed[-1].token_ids
    empty = list(engine.generate(SpeechRequest(None, GenerationOptions(max_new_tokens=8))))
    assert isinstance(empty[-1], ErrorEvent) and "audio or text" in empty[-1].message


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_path_runs_end_to_end(dtype, device, question_audio, expected):
    """The CUDA dtypes, on the tests' device (CPU in CI, where every module must still accept half inputs;
    `--device cuda` on a GPU host)."""
    from conftest import MODEL_DIR, VOCODER_DIR

    from omni_serve.engine import Engine

    engine = Engine.from_path(MODEL_DIR, vocoder=VOCODER_DIR, device=str(device), dtype=dtype)
    assert engine.placement == f"{device} {dtype}"
    try:
        events = _run(engine, question_audio["q1"], max_new_tokens=8)
    finally:
        engine.close()
    final = events[-1]
    assert isinstance(final, Finished), getattr(final, "message", "")
    assert final.token_ids[0] == expected["omni"]["q1"]["generated_ids"][0]  # first-step margin is 0.32
    assert any(isinstance(e, AudioChunk) for e in events)


@pytest.mark.parametrize("with_vocoder", [True, False])
def test_warm_up_answers_a_typed_and_a_spoken_request_and_changes_nothing(with_vocoder, device, question_audio,
                                                                         expected):
    """Its spoken request hears the typed answer's audio, or quiet noise without a vocoder; afterwards the
    engine answers exactly as a fresh one (the reference's tokens and units), and keeps no conversation."""
    from conftest import MODEL_DIR, VOCODER_DIR

    from omni_serve.engine import Engine, warm_up

    engine = Engine.from_path(MODEL_DIR, vocoder=VOCODER_DIR if with_vocoder else None, device=str(device),
                              dtype="float32")
    try:
        report = warm_up(engine)
        assert report.text_error is None and report.speech_error is None and report.seconds > 0
        assert engine._conversations == {}
        final = _run(engine, question_audio["q1"], max_new_tokens=24)[-1]
    finally:
        engine.close()
    assert isinstance(final, Finished), getattr(final, "message", "")
    assert final.token_ids == expected["omni"]["q1"]["generated_ids"]
    assert final.units == expected["omni"]["q1"]["units"]
