"""The web page's event functions, in-process with a scripted gateway: no browser, no model, no network.

What is checked: the answer generator yields the question, then text growing token by token, then the
whole answer with a replayable clip; audio reaches the live player's channel (or Gradio's streaming
player) in order and complete; every failure becomes a plain notice; Stop and cancellation end the
worker's stream. The browser tests (`test_web_browser.py`) cover the same paths in a real page.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import wave
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from omni_serve.serve.protocol import AudioEvent, ErrorEvent, FinalEvent, TextEvent
from omni_serve.serve.web import (
    CURSOR,
    STOPPED_MARK,
    AnswerProgress,
    WebSettings,
    WebUI,
    create_app,
    create_demo,
    error_text,
    wav_bytes,
)
from omni_serve.serve.web_live import LiveAudioHub, add_live_route, decode_frames

FIXTURES = Path(__file__).parent / "fixtures" / "llama-omni-ref"

QUESTION = FIXTURES / "inputs" / "q1.wav"
KEY = "0123456789abcdef0123456789abcdef"
RATE = 16000
DEFAULTS = {"model": None, "temperature": 0.0, "top_p": 1.0, "frequency_penalty": 0.0, "max_new_tokens": 64,
            "first_chunk_units": 10, "chunk_units": 40}


def pcm_chunk(seed: int, seconds: float = 0.2) -> bytes:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(RATE * seconds)) * 3000).astype("<i2").tobytes()


def audio_event(pcm: bytes) -> AudioEvent:
    return AudioEvent(pcm16=base64.b64encode(pcm).decode("ascii"), sample_rate=RATE)


def final_event(text: str) -> FinalEvent:
    return FinalEvent(text=text, token_ids=[1, 2, 3], units=[4, 5], stopped_on_eos=True,
                      timings={"first_audio_s": 0.12, "tokens_per_s": 42.0, "total_s": 0.5})


class ScriptedGateway:
    """Plays back a fixed list of events (with an optional pause before each) and records what it saw."""

    def __init__(self, events: list, pause_s: float = 0.0, models: list[str] | None = None) -> None:
        self.events, self.pause_s = events, pause_s
        self.models = ["omni-tiny"] if models is None else models
        self.requests: list = []
        self.closed = 0

    async def list_models(self) -> list[str]:
        return list(self.models)

    async def stream(self, request):
        self.requests.append(request)
        try:
            for event in self.events:
                await asyncio.sleep(self.pause_s)
                yield event
        finally:
            self.closed += 1


class BrokenController:
    async def list_models(self) -> list[str]:
        raise httpx.ConnectError("connection refused")

    async def stream(self, request):
        raise AssertionError("never called")
        yield  # pragma: no cover


SCRIPT_TEXT = ["Hello", " there", ",", " friend", "."]
SCRIPT_AUDIO = [pcm_chunk(1), pcm_chunk(2, 0.8), pcm_chunk(3, 0.5)]


def answer_script() -> list:
    return [TextEvent(text=SCRIPT_TEXT[0]), TextEvent(text=SCRIPT_TEXT[1]), audio_event(SCRIPT_AUDIO[0]),
            TextEvent(text=SCRIPT_TEXT[2]), audio_event(SCRIPT_AUDIO[1]), TextEvent(text=SCRIPT_TEXT[3]),
            TextEvent(text=SCRIPT_TEXT[4]), audio_event(SCRIPT_AUDIO[2]), final_event("".join(SCRIPT_TEXT))]


def make_ui(gateway, player: str = "live", **settings) -> WebUI:
    return WebUI(WebSettings(player=player, **settings), gateway, LiveAudioHub())


async def run_answer(ui: WebUI, audio_path, history=None, conversation_id="", key=KEY) -> list[tuple]:
    args = dict(DEFAULTS)
    return [values async for values in ui.answer(key, None if audio_path is None else str(audio_path), history,
                                                 conversation_id, args["model"], args["temperature"],
                                                 args["top_p"], args["frequency_penalty"], args["max_new_tokens"],
                                                 args["first_chunk_units"],
                                                 args["chunk_units"])]


async def read_channel(hub: LiveAudioHub, key: str = KEY) -> bytes:
    return b"".join([frame async for frame in hub.frames(key)])


def text_of(message: dict) -> str:
    return message["content"] if isinstance(message["content"], str) else ""


def notice_text(update: dict) -> str:
    return update.get("value", "") if update.get("visible") else ""


def clip_pcm(message: dict) -> bytes:
    component = message["content"]
    assert isinstance(component, gr.Audio)
    path = component.value["path"]
    with wave.open(path, "rb") as wav:
        return wav.readframes(wav.getnframes())


# --- the answer stream ------------------------------------------------------------------------------


def test_answer_streams_text_then_clip_and_live_audio_in_order():
    gateway = ScriptedGateway(answer_script(), pause_s=0.01)
    ui = make_ui(gateway)

    async def scenario():
        reader = asyncio.create_task(read_channel(ui.hub))  # the page opens its fetch at the click
        updates = await run_answer(ui, QUESTION)
        return updates, await asyncio.wait_for(reader, 5)

    updates, stream = asyncio.run(scenario())
    first_history, first_status = updates[0][0], updates[0][1]
    assert first_history[0]["role"] == "user" and isinstance(first_history[0]["content"], gr.Audio)
    assert first_history[1] == {"role": "assistant", "content": CURSOR}
    assert "Listening" in first_status

    streamed = [text_of(values[0][1]) for values in updates[1:-1]]
    assert streamed, "no intermediate text updates"
    assert all(text.endswith(CURSOR) for text in streamed)
    texts = [text[:-len(CURSOR)] for text in streamed]
    assert all("".join(SCRIPT_TEXT).startswith(text) for text in texts)
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(texts)), "text must only grow"

    history, status, notice = updates[-1][0], updates[-1][1], updates[-1][2]
    assert [m["role"] for m in history] == ["user", "assistant", "assistant"]
    assert history[1]["content"] == "".join(SCRIPT_TEXT)
    assert clip_pcm(history[2]) == b"".join(SCRIPT_AUDIO)
    assert "first audio after" in status and "(worker 0.12 s)" in status and "42.0" in status
    assert notice_text(notice) == ""
    assert updates[-1][3], "a conversation id is made for the first turn"

    frames = decode_frames(stream)
    assert [rate for rate, _ in frames] == [RATE] * 3
    assert [pcm for _, pcm in frames] == SCRIPT_AUDIO
    assert len(ui.hub) == 0, "the channel is forgotten once read and closed"

    request = gateway.requests[0]
    assert base64.b64decode(request.audio_b64) == QUESTION.read_bytes()
    assert (request.first_chunk_units, request.chunk_units, request.max_new_tokens) == (10, 40, 64)


def test_gradio_player_gets_wav_chunks_that_join_to_the_answer():
    ui = make_ui(ScriptedGateway(answer_script(), pause_s=0.01), player="gradio")
    updates = asyncio.run(run_answer(ui, QUESTION))
    chunks = [values[6] for values in updates if values[6] is not None]
    assert chunks, "no audio chunk reached the streaming player"
    joined = b""
    for chunk in chunks:
        with wave.open(io.BytesIO(chunk), "rb") as wav:
            assert wav.getframerate() == RATE and wav.getnchannels() == 1
            joined += wav.readframes(wav.getnframes())
    assert joined == b"".join(SCRIPT_AUDIO)
    first_audio = next(i for i, values in enumerate(updates) if values[6] is not None)
    assert first_audio < len(updates) - 1, "audio must stream before the answer ends"


def test_conversation_id_is_kept_across_turns():
    gateway = ScriptedGateway(answer_script())
    ui = make_ui(gateway)
    first = asyncio.run(run_answer(ui, QUESTION))
    conversation = first[-1][3]
    second = asyncio.run(run_answer(ui, QUESTION, history=first[-1][0], conversation_id=conversation))
    assert second[-1][3] == conversation
    assert [r.conversation_id for r in gateway.requests] == [conversation, conversation]
    assert [m["role"] for m in second[-1][0]].count("user") == 2


# --- failures are plain messages --------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing", "empty", "too_long"])
def test_bad_input_is_refused_before_calling_the_worker(case, tmp_path):
    gateway = ScriptedGateway(answer_script())
    ui = make_ui(gateway, max_audio_seconds=1.0)
    path = {"missing": None, "empty": tmp_path / "empty.wav", "too_long": QUESTION}[case]
    if case == "empty":
        path.write_bytes(b"")
    updates = asyncio.run(run_answer(ui, path, history=[]))
    assert len(updates) == 1 and gateway.requests == []
    message = notice_text(updates[0][2])
    expected = {"missing": "Nothing to send", "empty": "recording is empty", "too_long": "too long"}[case]
    assert expected in message
    assert updates[0][4] == gr.update(interactive=True)


def test_worker_failing_mid_answer_keeps_partial_text_and_says_so():
    script = [TextEvent(text="Half an"), audio_event(pcm_chunk(7)),
              ErrorEvent(code="worker_failed", message="the worker http://127.0.0.1:1 failed mid-answer")]
    ui = make_ui(ScriptedGateway(script))
    updates = asyncio.run(run_answer(ui, QUESTION))
    history, status, notice = updates[-1][0], updates[-1][1], updates[-1][2]
    assert history[1]["content"] == "Half an" + STOPPED_MARK
    assert len(history) == 3, "the audio that did arrive stays replayable"
    assert "stopped in the middle of the answer" in notice_text(notice)
    assert "cut off" in status


@pytest.mark.parametrize("code,expected", [
    ("no_worker", "No worker is available"), ("busy", "busy"), ("too_long", "too long"),
    ("bad_audio", "could not be used"), ("controller_unreachable", "Cannot reach the controller"),
])
def test_error_before_any_text_shows_notice_and_no_empty_bubble(code, expected):
    ui = make_ui(ScriptedGateway([ErrorEvent(code=code, message="detail from the server")]))
    updates = asyncio.run(run_answer(ui, QUESTION))
    history, notice, button = updates[-1][0], updates[-1][2], updates[-1][4]
    assert [m["role"] for m in history] == ["user"]
    assert expected in notice_text(notice) and "detail from the server" in notice_text(notice)
    assert button == gr.update(interactive=True)


def test_error_text_does_not_repeat_itself():
    assert error_text(ErrorEvent(code="no_worker", message="")) == error_text(
        ErrorEvent(code="no_worker", message="No worker is available for this model right now."))
    assert "Something went wrong" in error_text(ErrorEvent(code="strange", message="x"))


def test_unexpected_gateway_exception_becomes_a_notice():
    class Exploding(ScriptedGateway):
        async def stream(self, request):
            yield TextEvent(text="a")
            raise RuntimeError("boom")

    updates = asyncio.run(run_answer(make_ui(Exploding([])), QUESTION))
    assert "boom" in notice_text(updates[-1][2])
    assert updates[-1][4] == gr.update(interactive=True)


# --- stop, cancel, new conversation ----------------------------------------------------------------


def test_closing_the_answer_cancels_the_worker_stream_and_ends_the_live_channel():
    gateway = ScriptedGateway(answer_script(), pause_s=0.2)
    ui = make_ui(gateway)

    async def scenario():
        reader = asyncio.create_task(read_channel(ui.hub))
        generator = ui.answer(KEY, str(QUESTION), [], "", *DEFAULTS.values())
        await generator.__anext__()
        await generator.__anext__()  # some text arrived: the answer is streaming
        await generator.aclose()  # what Gradio does when Stop cancels the event
        return await asyncio.wait_for(reader, 5)

    asyncio.run(scenario())
    assert gateway.closed == 1
    assert len(ui.hub) == 0


def test_stop_marks_the_cut_off_answer_and_reenables_send():
    ui = make_ui(ScriptedGateway([]))
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Half an" + CURSOR}]
    new_history, status, _, button = ui.stop(history)
    assert new_history[-1]["content"] == "Half an" + STOPPED_MARK
    assert status == "Stopped." and button == gr.update(interactive=True)
    # after a Gradio round trip a message's content is a list of parts
    round_trip = [{"role": "assistant", "content": [{"type": "text", "text": CURSOR.strip()}]}]
    assert ui.stop(round_trip)[0] == []
    finished = [{"role": "assistant", "content": "Done."}]
    assert ui.stop(finished)[0] == finished


@pytest.mark.parametrize("stop_first", [True, False])
def test_stop_keeps_the_question_the_page_has_not_drawn_yet(stop_first):
    """Audio reaches the live player before the page draws the new question, so Stop can arrive with a
    chat that lacks it. Stop uses the answer's own record of the turn, whichever of the cancellation and
    Stop's handler runs first; after a finished answer or a new conversation, the page's chat again."""
    gateway = ScriptedGateway(answer_script(), pause_s=0.2)
    ui = make_ui(gateway)
    session = gr.Request(session_hash="tab-1")
    earlier = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "First answer."}]

    async def scenario():
        generator = ui.answer(KEY, str(QUESTION), earlier, "conv", *DEFAULTS.values(), session=session)
        await generator.__anext__()
        await generator.__anext__()  # "Hello" arrived; the page may still show only `earlier`
        if stop_first:
            stopped = ui.stop(list(earlier), session)
            await generator.aclose()
        else:
            await generator.aclose()  # what Gradio does when Stop cancels the event
            stopped = ui.stop(list(earlier), session)
        return stopped

    history, status, _, button = asyncio.run(scenario())
    assert history[:2] == earlier
    assert history[2]["role"] == "user" and isinstance(history[2]["content"], gr.Audio)
    assert history[3] == {"role": "assistant", "content": SCRIPT_TEXT[0] + STOPPED_MARK}
    assert status == "Stopped." and button == gr.update(interactive=True)
    assert ui.stop(list(earlier), session)[0] == earlier  # read once: a later Stop has no answer to cut

    finished = make_ui(ScriptedGateway(answer_script()))

    async def finish():
        return [u async for u in finished.answer(KEY, str(QUESTION), [], "", *DEFAULTS.values(), session=session)]

    page = asyncio.run(finish())[-1][0]
    assert finished.stop(page, session)[0] == page  # a finished answer leaves nothing behind for Stop
    cut = make_ui(ScriptedGateway(answer_script(), pause_s=0.2))

    async def cut_then_new_conversation():
        generator = cut.answer(KEY, str(QUESTION), [], "", *DEFAULTS.values(), session=session)
        await generator.__anext__()
        await generator.aclose()
        cut.new_conversation(session)
        return cut.stop([], session)[0]

    assert asyncio.run(cut_then_new_conversation()) == []


def test_new_conversation_clears_chat_and_id():
    chat, conversation, _, _, button = make_ui(ScriptedGateway([])).new_conversation()
    assert chat == [] and conversation == "" and button == gr.update(interactive=True)


# --- model selector ---------------------------------------------------------------------------------


@pytest.mark.parametrize("models,visible", [(["a"], False), (["a", "b"], True)])
def test_model_selector_is_shown_only_with_a_choice(models, visible):
    dropdown, notice = asyncio.run(make_ui(ScriptedGateway([], models=models)).load_models())
    assert dropdown["choices"] == models and dropdown["value"] == models[0]
    assert dropdown["visible"] is visible and notice_text(notice) == ""


def test_model_list_failures_are_notices():
    _, notice = asyncio.run(make_ui(ScriptedGateway([], models=[])).load_models())
    assert "No worker is available" in notice_text(notice)
    _, notice = asyncio.run(make_ui(BrokenController()).load_models())
    assert "Cannot reach the controller" in notice_text(notice)


def test_model_choice_and_settings_are_sent_to_the_worker():
    gateway = ScriptedGateway(answer_script())
    ui = make_ui(gateway)

    async def scenario():
        return [v async for v in ui.answer(KEY, str(QUESTION), [], "", "omni-b", 0.7, 0.9, 0.5, 32, 5, 20)]

    asyncio.run(scenario())
    request = gateway.requests[0]
    assert (request.model, request.temperature, request.top_p, request.max_new_tokens) == ("omni-b", 0.7, 0.9, 32)
    assert request.frequency_penalty == 0.5
    assert (request.first_chunk_units, request.chunk_units) == (5, 20)


# --- the live-audio channel -------------------------------------------------------------------------


def test_live_hub_buffers_until_read_and_rejects_bad_keys():
    hub = LiveAudioHub()

    async def scenario():
        hub.publish(KEY, b"\x01\x00" * 4, RATE)  # the publisher may come first
        hub.publish("not a key", b"\x01\x00", RATE)
        hub.publish(KEY, b"\x02\x00" * 2, 24000)
        hub.close(KEY)
        hub.publish(KEY, b"late", RATE)  # after close: dropped
        return await read_channel(hub)

    frames = decode_frames(asyncio.run(scenario()))
    assert frames == [(RATE, b"\x01\x00" * 4), (24000, b"\x02\x00" * 2)]
    assert len(hub) == 0


def test_live_hub_reader_gives_up_when_nothing_comes():
    hub = LiveAudioHub(idle_timeout_s=0.05)
    assert asyncio.run(read_channel(hub)) == b""


def test_live_route_streams_frames():
    hub = LiveAudioHub()
    app = FastAPI()
    add_live_route(app, hub)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as http:
            missing = await http.get("/omni/live/short")
            hub.publish(KEY, b"\x05\x00" * 3, RATE)
            hub.close(KEY)
            response = await http.get(f"/omni/live/{KEY}")
            return missing.status_code, response

    status, response = asyncio.run(scenario())
    assert status == 404
    assert response.headers["cache-control"] == "no-store"
    assert decode_frames(response.content) == [(RATE, b"\x05\x00" * 3)]


# --- building the page ------------------------------------------------------------------------------


@pytest.mark.parametrize("player", ["live", "gradio"])
def test_page_builds_with_both_players(player):
    demo = create_demo(WebSettings(player=player), gateway=ScriptedGateway([]))
    ids = {block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert {"chat", "mic_in", "submit", "stop", "new_conversation", "status", "notice", "settings"} <= ids
    assert ("audio_out" in ids) is (player == "gradio") and ("live_player" in ids) is (player == "live")


def test_app_serves_page_health_and_live_route():
    app = create_app(WebSettings(), gateway=ScriptedGateway([]))
    paths = {getattr(route, "path", None) for route in app.routes}
    assert "/omni/live/{key}" in paths and "/healthz" in paths


def test_wav_bytes_and_progress_helpers():
    pcm = pcm_chunk(5)
    with wave.open(io.BytesIO(wav_bytes(pcm, RATE)), "rb") as wav:
        assert wav.readframes(wav.getnframes()) == pcm
    progress = AnswerProgress()
    assert progress.add(TextEvent(text="a")) is None and progress.live_status() == "Answering…"
    assert progress.add(audio_event(pcm)) == pcm and progress.chunks == 1
    assert "Speaking" in progress.live_status()
    progress.add(final_event("ab"))
    assert progress.done and progress.text == "ab" and "0.2 s of speech" in progress.final_status()


def test_web_command_is_registered():
    from omni_serve.cli import SUBCOMMANDS

    assert SUBCOMMANDS["web"] == "omni_serve.cli.web"
    assert Path(__file__).parent.parent.joinpath("omni_serve", "cli", "web.py").is_file()


# --- the measuring tools the browser test and the benchmark rely on --------------------------------


def test_gap_detector_finds_an_inserted_silence_and_nothing_else():
    from omni_serve.serve.web_probe import (
        envelope_match,
        loudness_envelope,
        silent_gaps,
    )

    rng = np.random.default_rng(0)
    rate = 16000
    loudness = np.repeat(rng.uniform(0.02, 0.3, 60), rate * 3 // 60)  # syllable-like, not periodic
    answer = (rng.standard_normal(rate * 3) * loudness).astype(np.float32)
    lead = np.zeros(int(0.25 * rate), dtype=np.float32)  # the click-to-sound delay in a recording
    clean = np.concatenate([lead, answer])
    join = rate  # a 70 ms hole at the chunk join at 1 s, as an AAC priming frame would make
    holed = np.concatenate([lead, answer[:join], np.zeros(int(0.07 * rate), dtype=np.float32), answer[join:]])
    reference = loudness_envelope(answer, rate)
    for played, expected in ((clean, 0), (holed, 1)):
        envelope = loudness_envelope(played, rate)
        correlation, lag = envelope_match(envelope, reference)
        gaps = silent_gaps(envelope, reference, lag)
        assert len(gaps) == expected
        if expected:  # aligned on the part before the hole (lag 25) or after it (lag 32)
            start, length = gaps[0]
            assert lag in (25, 32) and 92 <= start <= 100 and 5 <= length <= 8
        else:
            assert lag == 25 and correlation > 0.99


def test_page_head_carries_the_live_player():
    from omni_serve.serve.web import asset_text, page_head

    assert "window.omniLive" in page_head() and page_head().startswith("<script>")
    assert "#notice" in asset_text("web.css")
