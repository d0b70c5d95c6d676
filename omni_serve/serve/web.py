"""The Gradio web page: speak (or upload), hear the answer while it streams, read its text beside it.

The page never loads a model. For each question it asks the controller for a worker and streams the
worker's NDJSON events (`omni_serve.serve.protocol`) with httpx; text goes into the chat token by token
and audio goes to the page's player the moment it arrives. Two players exist:

- `live` (default): a small Web Audio player (`web_assets/live_player.js`) fed through one plain HTTP
  stream per answer (`web_live.py`). It starts within a few tens of milliseconds of the first chunk.
- `gradio`: Gradio's own `gr.Audio(streaming=True, autoplay=True)`, which re-encodes to AAC and plays via
  HLS; it starts about a second later (measured by `bench/web_latency.py`), so it is kept for comparison.

Build it with `create_demo(settings)` (the Blocks) or `create_app(settings)` (a FastAPI app that also
serves the live-audio route); `serve(settings)` runs the latter with uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
import uuid
import wave
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import gradio as gr
from fastapi import FastAPI

from omni_serve.serve.protocol import (
    AudioEvent,
    ErrorEvent,
    FinalEvent,
    GenerateRequest,
    StreamEvent,
    TextEvent,
)
from omni_serve.serve.web_gateway import ControllerGateway, Gateway
from omni_serve.serve.web_live import LiveAudioHub, add_live_route

log = logging.getLogger(__name__)

PlayerKind = Literal["live", "gradio"]
DEFAULT_CONTROLLER_URL = "http://127.0.0.1:21001"
DEFAULT_WEB_PORT = 7860
CURSOR = " ▌"  # marks the answer that is still streaming; the Stop handler looks for it
STOPPED_MARK = " — *stopped*"
OPEN_TURNS_KEPT = 256  # sessions whose cut-off answer Stop has not read yet (a closed page never reads its own)
UI_UPDATE_INTERVAL_S = 0.05  # at most ~20 chat updates a second; audio does not wait for them
_KEEP = object()  # "leave this output as it is", where None is a real value (an emptied input)
MAX_UPLOAD = "24mb"  # its base64 must fit the worker's 32 MiB request cap (120 s of 48 kHz stereo wav is 23 MB)


@dataclass(frozen=True)
class AnswerDefaults:
    """The settings accordion's starting values: greedy decoding and the engine's chunking."""

    temperature: float = 0.0
    top_p: float = 1.0
    frequency_penalty: float = 0.0  # the model's own choices by default; a user may raise it against loops
    max_new_tokens: int = 256
    first_chunk_units: int = 10  # small first chunk: speech starts sooner
    chunk_units: int = 40  # larger later chunks: fewer joins, smoother playback


@dataclass(frozen=True)
class WebSettings:
    """Everything the page needs: where the controller is, where to listen, which player to use."""

    controller_url: str = DEFAULT_CONTROLLER_URL
    host: str = "127.0.0.1"
    port: int = DEFAULT_WEB_PORT
    token: str | None = None  # the serving token, sent to the controller and workers
    player: PlayerKind = "live"
    defaults: AnswerDefaults = field(default_factory=AnswerDefaults)
    max_audio_seconds: float = 120.0  # the model core's limit; checked here too to fail before uploading
    concurrency: int = 32  # answers streaming at once (the workers batch them)
    title: str = "omni_serve — talk to a speech LLM"


# --- plain messages for every failure -------------------------------------------------------------

ERROR_MESSAGES = {
    "no_worker": "No worker is available for this model right now. Start one (omni-serve launch …) and ask again.",
    "controller_unreachable": "Cannot reach the controller. Is `omni-serve launch` still running?",
    "worker_failed": "The worker stopped in the middle of the answer. What arrived is kept; please ask again.",
    "busy": "The server is busy right now. Please ask again in a moment.",
    "too_long": "That recording is too long.",
    "bad_audio": "That audio could not be used.",
    "empty_audio": "The recording is empty. Record your question (or upload a file) and press Send.",
    "no_audio": "Nothing to send yet: record your question with the microphone or upload an audio file.",
    "context_full": "This conversation has grown too long for the model. Press “New conversation” to start over.",
    "unknown_model": "That model is not served any more. Pick another model.",
    "unauthorized": "The server refused the page's token. Start the page with the serving token (--token).",
    "cancelled": "The answer was cancelled.",
}


def error_text(event: ErrorEvent) -> str:
    """One plain sentence (or two) for the page: what happened, and the server's own detail if it adds any."""
    base = ERROR_MESSAGES.get(event.code, "Something went wrong while answering.")
    detail = (event.message or "").strip()
    if detail and detail.rstrip(".").lower() not in base.lower():
        return f"{base} ({detail.rstrip('.')}.)"
    return base


# --- small helpers --------------------------------------------------------------------------------


def wav_bytes(pcm16: bytes, sample_rate: int) -> bytes:
    """A mono 16-bit wav file around raw PCM, for the replayable clip and Gradio's streaming player."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm16)
    return buffer.getvalue()


def audio_seconds(path: str | Path) -> float | None:
    """Duration of an audio file if soundfile can tell cheaply, else None (the worker checks anyway)."""
    try:
        import soundfile

        return float(soundfile.info(str(path)).duration)
    except Exception:  # noqa: BLE001 - what soundfile cannot read, the worker's ffmpeg decodes
        return None


@dataclass
class AnswerProgress:
    """One answer as it streams in: text so far, audio so far, when audio started, how it ended."""

    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    pcm: bytearray = field(default_factory=bytearray)
    sample_rate: int = 16000
    chunks: int = 0
    first_audio_s: float | None = None  # seen by the page's server, from the request's start
    final: FinalEvent | None = None
    error: ErrorEvent | None = None

    @property
    def done(self) -> bool:
        return self.final is not None or self.error is not None

    @property
    def audio_seconds(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate

    def add(self, event: StreamEvent) -> bytes | None:
        """Take one event; returns the new PCM when it was audio."""
        if isinstance(event, TextEvent):
            self.text += event.text
        elif isinstance(event, AudioEvent):
            chunk = base64.b64decode(event.pcm16)
            if self.first_audio_s is None:
                self.first_audio_s = time.perf_counter() - self.started
            self.sample_rate = event.sample_rate
            self.pcm += chunk
            self.chunks += 1
            return chunk
        elif isinstance(event, FinalEvent):
            self.final = event
            self.text = event.text or self.text
        elif isinstance(event, ErrorEvent):
            self.error = event
        return None

    def live_status(self) -> str:
        if self.first_audio_s is None:
            return "Answering…"
        return f"Speaking… (first audio after {self.first_audio_s:.2f} s)"

    def final_status(self) -> str:
        """The status line: time to first audio (page and worker) and decoding speed of the answer."""
        if self.error is not None:
            return "Last answer failed." if not self.text else "Last answer was cut off."
        timings = self.final.timings if self.final is not None else {}
        parts = []
        worker_first = timings.get("first_audio_s")
        if self.first_audio_s is not None:
            part = f"first audio after **{self.first_audio_s:.2f} s**"
            parts.append(part + (f" (worker {worker_first:.2f} s)" if worker_first is not None else ""))
        if timings.get("tokens_per_s"):
            parts.append(f"**{timings['tokens_per_s']:.1f}** tokens/s")
        if self.audio_seconds > 0:
            parts.append(f"{self.audio_seconds:.1f} s of speech")
        if timings.get("total_s"):
            parts.append(f"answered in {timings['total_s']:.2f} s")
        return "Last answer: " + " · ".join(parts) if parts else ""


def _notice(message: str | None) -> dict:
    if not message:
        return gr.update(value="", visible=False)
    return gr.update(value=message, visible=True)


def _assistant_text(history: list, text: str) -> None:
    """Replace the streaming answer's text message (the last message) in place."""
    history[-1] = {"role": "assistant", "content": text}


# --- the page's event functions -------------------------------------------------------------------


class WebUI:
    """The page's event functions, bound to one gateway and one live-audio hub (one per app)."""

    def __init__(self, settings: WebSettings, gateway: Gateway, hub: LiveAudioHub) -> None:
        self.settings = settings
        self.gateway = gateway
        self.hub = hub
        # The chat of each session's answer in progress. Stop reads it rather than the page's chat: audio
        # reaches the live player before the page has drawn the new question, so a Stop pressed at the first
        # sound sent a chat without it, and the question vanished from the page.
        self._open_turns: OrderedDict[str, list] = OrderedDict()

    async def load_models(self) -> tuple[dict, dict]:
        """Fill the model selector at page load; it is shown only when there is a choice."""
        try:
            models = await self.gateway.list_models()
        except Exception as exc:  # noqa: BLE001 - the page must open even when the controller is down
            log.warning("listing models failed: %s", exc)
            return gr.update(choices=[], value=None, visible=False), _notice(error_text(
                ErrorEvent(code="controller_unreachable", message=str(exc))))
        if not models:
            return gr.update(choices=[], value=None, visible=False), _notice(ERROR_MESSAGES["no_worker"])
        return gr.update(choices=models, value=models[0], visible=len(models) > 1), _notice(None)

    async def answer(self, live_key: str | None, audio_path: str | None, history: list | None,
                     conversation_id: str | None, model: str | None, temperature: float, top_p: float,
                     frequency_penalty: float, max_new_tokens: float, first_chunk_units: float, chunk_units: float,
                     session: gr.Request | None = None) -> AsyncIterator[tuple]:
        """Stream one answer: yields (chat, status, notice, conversation id, send button, input[, audio chunk]).

        Text is appended to the chat as each delta arrives; audio goes to the live player's channel (or
        is yielded as a wav chunk to Gradio's streaming player). When the answer ends, the chat gets the
        whole answer as a replayable clip. Every failure ends as a plain notice and the page stays usable.
        """
        history = list(history or [])
        gradio_player = self.settings.player == "gradio"
        busy, idle = gr.update(interactive=False), gr.update(interactive=True)

        def out(status: Any = None, notice: Any = None, button: Any = None, mic: Any = _KEEP,
                chunk: bytes | None = None) -> tuple:
            """One update of the page; outputs not given stay as they are."""
            status, notice, button = (gr.skip() if value is None else value for value in (status, notice, button))
            values = (list(history), status, notice, conversation_id, button, gr.skip() if mic is _KEEP else mic)
            return values + (chunk,) if gradio_player else values

        try:
            problem = self._check_input(audio_path)
            if problem is not None:
                yield out(notice=_notice(error_text(problem)), button=idle)
                return
            conversation_id = conversation_id or uuid.uuid4().hex
            request = GenerateRequest(
                model=model or None, audio_b64=base64.b64encode(Path(audio_path).read_bytes()).decode("ascii"),
                conversation_id=conversation_id, temperature=float(temperature), top_p=float(top_p),
                frequency_penalty=float(frequency_penalty), max_new_tokens=int(max_new_tokens),
                first_chunk_units=int(first_chunk_units), chunk_units=int(chunk_units))
            answer = AnswerProgress()
            changed = asyncio.Event()
            # the request goes out before the page's first update, which costs a round of rendering
            pump = asyncio.create_task(self._pump(request, answer, changed, None if gradio_player else live_key))
            try:
                history.append({"role": "user", "content": gr.Audio(value=audio_path, show_label=False, buttons=[])})
                history.append({"role": "assistant", "content": CURSOR})
                self._open_turn(session, history)
                yield out(status="Listening to your question…", notice=_notice(None), button=busy, mic=None)
                shown_text, shown_bytes = "", 0
                while True:
                    await changed.wait()  # the pump sets it last thing before it ends, so this never hangs
                    changed.clear()
                    finished = pump.done()
                    new_text, new_audio = answer.text != shown_text, len(answer.pcm) > shown_bytes
                    if new_text or (new_audio and (gradio_player or shown_bytes == 0)):
                        shown_text = answer.text
                        _assistant_text(history, shown_text + CURSOR)
                        chunk = wav_bytes(bytes(answer.pcm[shown_bytes:]), answer.sample_rate) \
                            if gradio_player and new_audio else None
                        shown_bytes = len(answer.pcm)
                        yield out(status=answer.live_status(), chunk=chunk)
                        await asyncio.sleep(UI_UPDATE_INTERVAL_S)  # coalesce fast tokens into fewer updates
                    elif new_audio:
                        shown_bytes = len(answer.pcm)
                    if finished:
                        break
                await pump  # re-raises what went wrong in it
            finally:
                if not pump.done():  # cancelled (Stop, New conversation, page closed): end the worker's answer
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
            self._close_turn(session)  # not reached when Stop cancels the answer: Stop reads and closes it

            if answer.text:
                _assistant_text(history, answer.text + (STOPPED_MARK if answer.error is not None else ""))
            elif answer.error is not None:
                history.pop()  # no answer text arrived: drop the empty bubble, the notice explains
            else:
                _assistant_text(history, "*(the model answered with no text)*")
            if answer.pcm:
                history.append({"role": "assistant", "content": gr.Audio(
                    value=wav_bytes(bytes(answer.pcm), answer.sample_rate), show_label=False,
                    buttons=["download"], elem_classes=["answer-clip"])})
            notice = error_text(answer.error) if answer.error is not None else None
            # a question that got no answer at all goes back into the input: pressing Send again retries it
            retry = audio_path if answer.error is not None and not answer.text else _KEEP
            yield out(status=answer.final_status(), notice=_notice(notice), button=idle, mic=retry)
        except Exception as exc:  # a bug must not leave the page stuck in "Answering…"
            log.exception("answer failed")
            self._close_turn(session)
            yield out(status="Last answer failed.", notice=_notice(f"Unexpected error in the web page: {exc}"),
                      button=idle)
        finally:
            self.hub.close(live_key)

    async def _pump(self, request: GenerateRequest, answer: AnswerProgress, changed: asyncio.Event,
                    live_key: str | None) -> None:
        """Read the worker's stream into `answer`, sending audio to the live player the moment it arrives.

        It runs beside the generator that updates the page, so audio never waits for the chat to re-render.
        """
        try:
            async with aclosing(self.gateway.stream(request)) as events:  # closing it cancels the answer
                async for event in events:
                    chunk = answer.add(event)
                    if chunk is not None and live_key:
                        self.hub.publish(live_key, chunk, answer.sample_rate)
                    changed.set()
                    if answer.done:
                        break
            if not answer.done:
                answer.add(ErrorEvent(code="worker_failed", message="the answer stream ended early"))
        finally:
            if live_key:
                self.hub.close(live_key)
            changed.set()

    def _check_input(self, audio_path: str | None) -> ErrorEvent | None:
        """Refuse what the worker would refuse anyway, before uploading it: nothing, empty, too long."""
        if not audio_path:
            return ErrorEvent(code="no_audio", message="")
        path = Path(audio_path)
        if not path.is_file() or path.stat().st_size == 0:
            return ErrorEvent(code="empty_audio", message="")
        seconds = audio_seconds(path)
        if seconds is not None and seconds <= 0.0:
            return ErrorEvent(code="empty_audio", message="")
        if seconds is not None and seconds > self.settings.max_audio_seconds:
            return ErrorEvent(code="too_long", message=(
                f"it lasts {seconds:.0f} s and the limit is {self.settings.max_audio_seconds:.0f} s"))
        return None

    def _open_turn(self, session: gr.Request | None, history: list) -> None:
        if session is not None and session.session_hash:
            self._open_turns[session.session_hash] = history
            self._open_turns.move_to_end(session.session_hash)
            while len(self._open_turns) > OPEN_TURNS_KEPT:
                self._open_turns.popitem(last=False)

    def _close_turn(self, session: gr.Request | None) -> list | None:
        """The session's answer in progress (None if none), forgotten."""
        return self._open_turns.pop(session.session_hash, None) if session is not None else None

    def stop(self, history: list | None, session: gr.Request | None = None) -> tuple:
        """After Stop cancelled the answer: mark the cut-off text and make the page ready again. The chat
        is the answer's own record of it when there is one (the page's may not show the question yet)."""
        open_turn = self._close_turn(session)
        history = list(open_turn if open_turn is not None else history or [])
        if history and history[-1].get("role") == "assistant":
            content = history[-1].get("content")
            text = content if isinstance(content, str) else _first_text(content)
            if text is not None and text.rstrip().endswith(CURSOR.strip()):
                text = text.rstrip()[:-len(CURSOR.strip())].rstrip()
                if text:
                    _assistant_text(history, text + STOPPED_MARK)
                else:
                    history.pop()
        return history, "Stopped.", _notice(None), gr.update(interactive=True)

    def new_conversation(self, session: gr.Request | None = None) -> tuple:
        """A fresh conversation id; the engine keeps the old context until it ages out."""
        self._close_turn(session)
        return [], "", "", _notice(None), gr.update(interactive=True)


def _first_text(content: Any) -> str | None:
    """The text of a message as Gradio hands it back (a list of parts after a round trip)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                return part["text"]
    if isinstance(content, dict) and isinstance(content.get("text"), str):
        return content["text"]
    return None


# --- the page -------------------------------------------------------------------------------------

# Runs in the Submit click itself (a user gesture, so audio may start); its first input is the live key.
SUBMIT_JS = """(...args) => {
  const live = window.omniLive;
  args[0] = live ? live.begin() : "";
  return args;
}"""
STOP_JS = """(...args) => { if (window.omniLive) window.omniLive.stop(); return args; }"""
LIVE_PLAYER_HTML = """<div class="omni-live" role="status" aria-live="polite">
  <span class="omni-live-dot"></span><span class="omni-live-label">Ready</span>
</div>"""
INTRO = """# Talk to a speech LLM
Press **Record**, ask your question, press **Stop**, then **Send** — or upload an audio file.
The answer streams back as speech and text; keep talking to continue the conversation."""


def asset_text(name: str) -> str:
    """A file from `web_assets/` (the live player's JS, the page's CSS)."""
    return resources.files("omni_serve.serve").joinpath("web_assets", name).read_text(encoding="utf-8")


def page_head() -> str:
    """What goes into the page's <head>: the live player, loaded once before Gradio renders."""
    return f"<script>{asset_text('live_player.js')}</script>"


def create_demo(settings: WebSettings, gateway: Gateway | None = None, hub: LiveAudioHub | None = None) -> gr.Blocks:
    """The Blocks of the page. `gateway` defaults to the controller at `settings.controller_url`.

    The live player needs the `/omni/live/{key}` route of `create_app`; a Blocks launched on its own
    (`demo.launch()`) should use `player="gradio"`.
    """
    gateway = gateway if gateway is not None else ControllerGateway(settings.controller_url, settings.token)
    ui = WebUI(settings, gateway, hub if hub is not None else LiveAudioHub())
    defaults = settings.defaults
    gradio_player = settings.player == "gradio"

    with gr.Blocks(title=settings.title, delete_cache=(1800, 3600), analytics_enabled=False) as demo:
        conversation = gr.State("")
        live_key = gr.Textbox(visible=False, elem_id="live_key")
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                chat = gr.Chatbot(label="Conversation", elem_id="chat", height=460, buttons=["copy"],
                                  placeholder="Your conversation appears here.", feedback_options=None)
                if gradio_player:
                    audio_out = gr.Audio(label="Answer", streaming=True, autoplay=True, elem_id="audio_out",
                                         interactive=False, buttons=["download"])
                else:
                    gr.HTML(LIVE_PLAYER_HTML, elem_id="live_player", js_on_load=None)
                status = gr.Markdown("", elem_id="status")
                notice = gr.Markdown("", elem_id="notice", visible=False)
            with gr.Column(scale=1, min_width=280):
                mic = gr.Audio(sources=["microphone", "upload"], type="filepath", label="Your question",
                               elem_id="mic_in", buttons=[])
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="submit", scale=2)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
                new = gr.Button("New conversation", elem_id="new_conversation", variant="secondary")
                model = gr.Dropdown(label="Model", choices=[], elem_id="model", visible=False, interactive=True)
                with gr.Accordion("Settings", open=False, elem_id="settings"):
                    temperature = gr.Slider(0.0, 1.5, value=defaults.temperature, step=0.05, label="Temperature",
                                            info="0 = always the most likely words", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top_p")
                    repetition = gr.Slider(0.0, 2.0, value=defaults.frequency_penalty, step=0.1,
                                           label="Repetition penalty", elem_id="frequency_penalty",
                                           info="raise (about 0.5) if answers repeat themselves")
                    max_new_tokens = gr.Slider(16, 1024, value=defaults.max_new_tokens, step=16,
                                               label="Max new tokens", info="longest answer, in text tokens",
                                               elem_id="max_new_tokens")
                    first_chunk = gr.Slider(2, 100, value=defaults.first_chunk_units, step=1,
                                            label="First audio chunk (units)", info="smaller: speech starts sooner",
                                            elem_id="first_chunk_units")
                    chunk = gr.Slider(5, 200, value=defaults.chunk_units, step=5, label="Later chunks (units)",
                                      info="larger: fewer joins, smoother speech", elem_id="chunk_units")

        outputs = [chat, status, notice, conversation, send, mic] + ([audio_out] if gradio_player else [])
        answering = send.click(
            ui.answer, inputs=[live_key, mic, chat, conversation, model, temperature, top_p, repetition,
                               max_new_tokens, first_chunk, chunk],
            outputs=outputs, js=None if gradio_player else SUBMIT_JS, concurrency_limit=settings.concurrency,
            show_progress="hidden")
        quiet = {"js": STOP_JS, "queue": False, "show_progress": "hidden"}
        stop.click(ui.stop, inputs=[chat], outputs=[chat, status, notice, send], cancels=[answering], **quiet)
        reset = [chat, conversation, status, notice, send]  # a question already recorded stays, ready to send
        new.click(ui.new_conversation, outputs=reset, cancels=[answering], **quiet)
        chat.clear(ui.new_conversation, outputs=reset, cancels=[answering], **quiet)  # the chat's own bin icon
        # `.input`, not `.change`: filling the selector at page load must not reset anything
        model.input(ui.new_conversation, outputs=reset, cancels=[answering], **quiet)
        demo.load(ui.load_models, outputs=[model, notice], show_progress="hidden")
    return demo


def create_app(settings: WebSettings, gateway: Gateway | None = None) -> FastAPI:
    """A FastAPI app serving the page at / plus the live-audio route its player reads."""
    hub = LiveAudioHub()
    app = FastAPI(title="omni_serve web", docs_url=None, redoc_url=None, openapi_url=None)
    add_live_route(app, hub)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"ok": True}

    demo = create_demo(settings, gateway, hub)
    head = page_head() if settings.player == "live" else None
    return gr.mount_gradio_app(app, demo, path="/", head=head, css=asset_text("web.css"),
                               theme=gr.themes.Soft(), footer_links=[], ssr_mode=False, max_file_size=MAX_UPLOAD)


def serve(settings: WebSettings) -> None:
    """Run the page with uvicorn until interrupted."""
    from omni_serve.serve.server import run_server

    app = create_app(settings)
    log.info("web page on http://%s:%d (controller %s, %s player)", settings.host, settings.port,
             settings.controller_url, settings.player)
    run_server(app, settings.host, settings.port, log_level="warning")
