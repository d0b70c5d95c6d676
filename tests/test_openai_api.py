"""The OpenAI-compatible API, exercised with the official `openai` client against a real controller + worker."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import openai
import pytest
import soundfile
from conftest import MODEL_DIR, VOCODER_DIR
from serve_helpers import MODEL_NAME, Q1_WAV, Q2_WAV, Stack, controller_process

from omni_serve.engine import AudioChunk, Engine, GenerationOptions, SpeechRequest, TextDelta, load_audio
from omni_serve.serve.openai_api import OpenAIError, unless_client_leaves
from omni_serve.serve.protocol import TextEvent

TOKEN = "openai-test-key"
PCM_STEP = 1 / 32768


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack.start(tmp_path_factory.mktemp("openai"), n_workers=1, token=TOKEN)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=f"{stack.controller.url}/v1", api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def in_process():
    """What the worker computes, computed here: the reference for text and samples."""
    engine = Engine.from_path(MODEL_DIR, vocoder=VOCODER_DIR, device="cpu")
    answers = {}
    for name, path in (("q1", Q1_WAV), ("q2", Q2_WAV)):
        events = list(engine.generate(SpeechRequest(load_audio(path), GenerationOptions(max_new_tokens=24))))
        audio = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
        answers[name] = (events[-1], np.frombuffer(AudioChunk(audio, 16000).pcm16(), "<i2") / 32768.0,
                         "".join(e.text for e in events if isinstance(e, TextDelta)))
    penalized = GenerationOptions(max_new_tokens=24, frequency_penalty=0.5, presence_penalty=2.0, vocode=False)
    answers["q2_penalized"] = list(engine.generate(SpeechRequest(load_audio(Q2_WAV), penalized)))[-1]
    engine.close()
    return answers


def audio_message(path, text=None):
    parts = [{"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"}}]
    if text:
        parts.insert(0, {"type": "text", "text": text})
    return {"role": "user", "content": parts}


def test_models_are_listed(client):
    assert MODEL_NAME in [model.id for model in client.models.list()]


def test_non_streaming_audio_answer_equals_the_workers_samples(client, in_process):
    final, samples, text = in_process["q1"]
    completion = client.chat.completions.create(
        model=MODEL_NAME, modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"},
        messages=[audio_message(Q1_WAV)], max_completion_tokens=24)
    audio = completion.choices[0].message.audio
    assert audio.transcript == final.text == text
    assert audio.id.startswith("audio_") and audio.expires_at > completion.created
    decoded, rate = soundfile.read(io.BytesIO(base64.b64decode(audio.data)), dtype="float64")
    assert rate == 16000 and decoded.shape == samples.shape
    np.testing.assert_allclose(decoded, samples, atol=1.01 * PCM_STEP, rtol=0)
    assert completion.usage.completion_tokens == 24
    assert completion.usage.prompt_tokens == 412  # 112 token ids + 300 speech positions
    assert completion.choices[0].finish_reason == "length"


def test_streaming_deltas_join_to_the_same_answer(client, in_process):
    final, samples, _ = in_process["q2"]
    stream = client.chat.completions.create(
        model=MODEL_NAME, modalities=["text", "audio"], audio={"voice": "alloy", "format": "pcm16"},
        messages=[audio_message(Q2_WAV)], max_tokens=24, stream=True)
    transcript, pcm, finish = [], bytearray(), None
    for chunk in stream:
        delta = chunk.choices[0].delta
        audio = getattr(delta, "audio", None) or (delta.model_extra or {}).get("audio")
        if audio is not None and not isinstance(audio, dict):
            audio = audio.model_dump()
        if audio:
            transcript.append(audio.get("transcript", "") or "")
            pcm += base64.b64decode(audio.get("data", "") or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(transcript) == final.text
    np.testing.assert_allclose(np.frombuffer(bytes(pcm), "<i2") / 32768.0, samples, atol=1.01 * PCM_STEP, rtol=0)
    assert finish == "stop"  # q2 ends on its end-of-turn token


def test_frequency_and_presence_penalties_reach_the_engine(client, in_process):
    penalized, plain = in_process["q2_penalized"], in_process["q2"][0]
    assert penalized.text != plain.text and len(set(penalized.token_ids)) > len(set(plain.token_ids))
    completion = client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q2_WAV)], max_tokens=24,
                                                frequency_penalty=0.5, presence_penalty=2.0)
    assert completion.choices[0].message.content == penalized.text
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q2_WAV)], frequency_penalty=2.5)


def test_text_only_modality_and_multi_turn_context(client):
    first = client.chat.completions.create(model=MODEL_NAME, modalities=["text", "audio"],
                                           audio={"voice": "alloy", "format": "wav"},
                                           messages=[audio_message(Q1_WAV)], max_tokens=8)
    by_id = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, messages=[
        audio_message(Q1_WAV), {"role": "assistant", "audio": {"id": first.choices[0].message.audio.id}},
        audio_message(Q2_WAV)])
    by_text = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, messages=[
        audio_message(Q1_WAV), {"role": "assistant", "content": first.choices[0].message.audio.transcript},
        audio_message(Q2_WAV)])
    single = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, messages=[audio_message(Q2_WAV)])
    assert by_id.choices[0].message.content == by_text.choices[0].message.content
    assert by_id.choices[0].message.audio is None
    assert by_id.usage.prompt_tokens > single.usage.prompt_tokens + 300  # the earlier turn is in the context


def test_errors_surface_as_the_clients_own_exceptions(client, stack):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"not audio at all" * 50).decode(), "format": "wav"}}]}])
    assert "audio" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[audio_message(Q1_WAV)])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.controller.url}/v1", api_key="wrong", max_retries=0).models.list()
    long_wav = io.BytesIO()
    soundfile.write(long_wav, np.tile(load_audio(Q1_WAV), 5), 16000, format="WAV")  # 14 s > the worker's 10 s cap
    with pytest.raises(openai.APIStatusError) as too_long:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(long_wav.getvalue()).decode(), "format": "wav"}}]}])
    assert too_long.value.status_code == 413


@pytest.mark.parametrize("message", [
    {"role": "user", "content": 5},
    {"role": "user", "content": ["hello"]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": "not an object"}]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": 7}}]},
    {"role": "user", "content": [{"type": "text", "text": 3}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
])
def test_malformed_messages_are_a_400_in_openais_shape(client, message):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[message])
    assert bad.value.body["type"] == "invalid_request_error" and "messages" in bad.value.body["message"]


def test_malformed_earlier_turns_huge_seeds_and_several_choices_are_a_400(client):
    for assistant in ({"role": "assistant", "content": ["hi"]}, {"role": "assistant", "audio": "an id"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL_NAME, messages=[
                {"role": "user", "content": "Hello"}, assistant, {"role": "user", "content": "And?"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV)], seed=2**64)
    assert "seed" in str(bad.value)
    with pytest.raises(openai.BadRequestError, match=r"n: Input should be 1"):  # said rather than ignored
        client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV)], n=2)


def test_a_bad_field_is_named_by_the_path_the_client_wrote(client):
    """Not by pydantic's union branches, and without the complaints of branches the client did not use."""
    empty = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV), empty])
    assert bad.value.body["param"] == "messages[1].content[0].input_audio.data"
    assert bad.value.body["message"].startswith("invalid request: messages[1].content[0].input_audio.data: ")
    assert "valid string" not in bad.value.body["message"]  # the content-as-a-string branch's complaint
    untagged = {"role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]}
    with pytest.raises(openai.BadRequestError) as missing:
        client.chat.completions.create(model=MODEL_NAME, messages=[untagged])
    assert missing.value.body["param"] == "messages[0].content[0].input_audio"
    assert "required" in missing.value.body["message"]


def test_tools_are_refused_and_system_messages_left_out(client):
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="tools are not supported"):
        client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV)], tools=[tool])
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    for history in ([{"role": "assistant", "content": None, "tool_calls": [call]}],
                    [{"role": "tool", "tool_call_id": "c1", "content": "sunny"}]):
        with pytest.raises(openai.BadRequestError, match="not supported") as bad:
            client.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV), *history])
        assert bad.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError, match="unknown message role 'robot'"):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "robot", "content": "hi"},
                                                                   audio_message(Q1_WAV)])
    plain = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, seed=3, messages=[audio_message(Q2_WAV)])
    with_system = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, seed=3, messages=[
        {"role": "system", "content": "Answer in French."}, {"role": "developer", "content": "Be brief."},
        audio_message(Q2_WAV)])
    assert with_system.choices[0].message.content == plain.choices[0].message.content
    assert with_system.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_collected_answer_is_cancelled_when_its_client_leaves():
    """Without a stream nothing is sent until the end, so the client's leaving is watched for."""
    closed = asyncio.Event()

    async def endless_events():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield TextEvent(text="word ")
        finally:
            closed.set()

    class LeavingClient:
        calls = 0

        async def is_disconnected(self) -> bool:
            self.calls += 1
            return self.calls >= 3

    async def scenario() -> None:
        events = endless_events()

        async def collect() -> dict:
            async for _ in events:
                pass
            return {}

        with pytest.raises(OpenAIError) as gone:
            await unless_client_leaves(LeavingClient(), collect(), events)
        assert gone.value.code == "cancelled" and closed.is_set()

    asyncio.run(scenario())


def test_no_worker_is_a_503(tmp_path):
    controller = controller_process(tmp_path, token=TOKEN).start()
    try:
        controller.wait("/health")
        lonely = openai.OpenAI(base_url=f"{controller.url}/v1", api_key=TOKEN, max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as error:
            lonely.chat.completions.create(model=MODEL_NAME, messages=[audio_message(Q1_WAV)])
        assert error.value.status_code == 503
        assert error.value.response.headers["Retry-After"] == "1"  # how the client paces its retries
    finally:
        controller.stop()
