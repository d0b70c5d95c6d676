"""Drive the web page in a real headless Chromium: shared by the browser tests and `bench/web_latency.py`.

Why it lives in the package: the test and the benchmark must measure the same thing the same way
(start a local stack, feed a fake microphone, click Send, time the sound). Nothing here runs in
production; Playwright (a test extra) is imported only by the functions that need it.

Measured facts this relies on are in the project's browser-testing notes: Debian's chromium driven
by Playwright's Python client with `executable_path` (never `playwright install`), a fake microphone
fed from a PCM16 wav padded with silence, and the upload race (the recording is uploaded only after
Stop; wait for the POST to /gradio_api/upload before clicking Send).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
FAKE_MIC_RATE = 48_000  # PCM16 at 22.05/44.1/48 kHz records; 24-bit or mp3 silently record silence
FAKE_MIC_PAD_S = 0.5  # after the file ends Chromium repeats a ~100 Hz buzz; pad so Stop lands in silence
ENVELOPE_FRAME_S = 0.01
SILENT_DB = -50.0


def chromium_path() -> str | None:
    """Debian's chromium, or None when it is not installed (the browser tests then skip)."""
    for candidate in (shutil.which("chromium"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a local stack: controller, one CPU worker, web pages -----------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    ready_url: str
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        from omni_serve.serve.launcher import die_with_parent_hook

        hook = die_with_parent_hook()  # the child dies with us, even if we are killed outright (one prctl call)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=hook)  # noqa: PLW1509

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers; always waits, so nothing is left behind."""
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait()
        else:
            _signal_group(self.process, signal.SIGKILL)  # children it may have left
        self.process = None


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class LocalStack:
    """`python -m omni_serve controller|worker|web` as children on free loopback ports, as an operator runs them.

    Started by hand rather than through `omni-serve launch` because the tests need to stop the worker
    (the launcher would restart it) and to run a second page with the other player.
    """

    model_path: Path
    vocoder: Path | None
    log_dir: Path
    players: tuple[str, ...] = ("live",)
    token: str | None = "web-test-token"
    heartbeat_s: float = 1.0
    worker_threads: int = 1
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        python = [sys.executable, "-m", "omni_serve"]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.controller_url = f"http://127.0.0.1:{free_port()}"
        self.worker_url = f"http://127.0.0.1:{free_port()}"
        controller_port, worker_port = self.controller_url.rsplit(":", 1)[1], self.worker_url.rsplit(":", 1)[1]
        self.procs["controller"] = Proc("controller", python + [
            "controller", "--port", controller_port, "--heartbeat-expiry", str(4 * self.heartbeat_s),
            "--log-level", "warning"], f"{self.controller_url}/health", self.log_dir / "controller.log")
        worker = python + ["worker", "--model-path", str(self.model_path), "--port", worker_port,
                           "--controller-url", self.controller_url, "--heartbeat-interval", str(self.heartbeat_s),
                           "--num-threads", str(self.worker_threads), "--log-level", "warning"]
        if self.vocoder is not None:
            worker += ["--vocoder", str(self.vocoder)]
        self.procs["worker"] = Proc("worker", worker, f"{self.worker_url}/ready", self.log_dir / "worker.log")
        self.web_urls: dict[str, str] = {}
        for player in self.players:
            port = free_port()
            self.web_urls[player] = f"http://127.0.0.1:{port}/"
            self.procs[f"web-{player}"] = Proc(f"web-{player}", python + [
                "web", "--controller-url", self.controller_url, "--port", str(port), "--player", player],
                f"http://127.0.0.1:{port}/healthz", self.log_dir / f"web-{player}.log")

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
        env.pop("OMNI_SERVE_TOKEN", None)
        if self.token:
            env["OMNI_SERVE_TOKEN"] = self.token  # every part reads it, as the launcher passes it
        return env

    def start(self, timeout_s: float = 180.0) -> None:
        """Start everything at once (the parts retry their connections) and wait until all answer."""
        try:
            for proc in self.procs.values():
                proc.start(self.env)
            for proc in self.procs.values():
                self.wait_ready(proc, timeout_s)
            self.wait_models(timeout_s)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, proc: Proc, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited; see {proc.log_path}:\n{self.tail(proc)}")
                try:
                    if http.get(proc.ready_url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"{proc.name} not ready after {timeout_s:.0f} s:\n{self.tail(proc)}")

    def wait_models(self, timeout_s: float, present: bool = True) -> None:
        """Until the controller lists a model (or, with present=False, lists none)."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                try:
                    models = http.post(f"{self.controller_url}/list_models").json()["models"]
                    if bool(models) is present:
                        return
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"the controller did not {'list' if present else 'drop'} the model in {timeout_s:.0f} s")

    def stop_worker(self) -> None:
        self.procs["worker"].stop()

    def start_worker(self, timeout_s: float = 180.0) -> None:
        proc = self.procs["worker"]
        proc.start(self.env)
        self.wait_ready(proc, timeout_s)
        self.wait_models(timeout_s)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    @staticmethod
    def tail(proc: Proc, lines: int = 30) -> str:
        try:
            return "\n".join(proc.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- audio checks ----------------------------------------------------------------------------------


def write_fake_mic_wav(source: Path, out: Path, rate: int = FAKE_MIC_RATE, pad_s: float = FAKE_MIC_PAD_S) -> Path:
    """The question as Chromium's fake microphone needs it: PCM16 mono at a browser rate, padded with silence."""
    from scipy.signal import resample_poly

    samples, source_rate = soundfile.read(str(source), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if source_rate != rate:
        divisor = np.gcd(source_rate, rate)
        mono = resample_poly(mono, rate // divisor, source_rate // divisor).astype(np.float32)
    padded = np.concatenate([mono, np.zeros(int(pad_s * rate), dtype=np.float32)])
    soundfile.write(str(out), padded, rate, subtype="PCM_16")
    return out


def loudness_envelope(samples: np.ndarray, rate: int, frame_s: float = ENVELOPE_FRAME_S) -> np.ndarray:
    """dB RMS per frame: what "it sounds the same" is compared on (robust to resampling, codecs and gain)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    size = max(1, int(rate * frame_s))
    frames = len(samples) // size
    if frames == 0:
        return np.zeros(0)
    rms = np.sqrt(np.mean(samples[:frames * size].reshape(frames, size) ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-6))


def envelope_match(recorded: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Best Pearson correlation of two envelopes over lags, and the lag (frames) where it is reached."""
    if len(recorded) < 10 or len(reference) < 10:
        return 0.0, 0
    best, best_lag = -1.0, 0
    span = len(reference)
    for lag in range(max(1, len(recorded) - span // 2)):
        window = recorded[lag:lag + span]
        n = min(len(window), span)
        if n < span // 2:
            break
        a, b = window[:n], reference[:n]
        if a.std() < 1e-9 or b.std() < 1e-9:
            continue
        value = float(np.corrcoef(a, b)[0, 1])
        if value > best:
            best, best_lag = value, lag
    return best, best_lag


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode wav/flac/ogg bytes (soundfile) or anything else (ffmpeg) to mono float32."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples.mean(axis=1), rate
    except (RuntimeError, soundfile.LibsndfileError):
        completed = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "f32le", "-ac", "1", "-ar", "16000",
                                    "pipe:1"], input=data, capture_output=True, check=True, timeout=60)
        return np.frombuffer(completed.stdout, dtype=np.float32), 16000


def silent_gaps(played: np.ndarray, reference: np.ndarray, lag: int, min_frames: int = 3) -> list[tuple[int, int]]:
    """Runs of at least `min_frames` silent frames in what played where the reference is not silent.

    Both are loudness envelopes; `lag` aligns them (played[i + lag] ~ reference[i]). A gap at a chunk
    join (codec priming, late chunk) shows up as such a run; silence the model itself made does not.
    """
    gaps, start = [], None
    for i in range(len(reference)):
        j = i + lag
        if j >= len(played):
            break
        hole = played[j] < SILENT_DB and reference[i] > SILENT_DB + 10
        if hole and start is None:
            start = i
        elif not hole and start is not None:
            if i - start >= min_frames:
                gaps.append((start, i - start))
            start = None
    if start is not None and len(reference) - start >= min_frames and start + lag < len(played) - min_frames:
        gaps.append((start, len(reference) - start))
    return gaps


# --- the page -------------------------------------------------------------------------------------

# Installed before the page's own scripts: times the Send click and the first moment the answer's audio
# plays (currentTime > 0, polled every 5 ms), for either player, and records what is played (a
# ScriptProcessor tap on the live player's output or on Gradio's <audio> element) as a loudness envelope.
PROBE_JS = r"""
(() => {
  const probe = window.__omniProbe = { clickAt: null, soundAt: null, srcAtClick: null, keyAtClick: null,
                                       frames: [], rate: null,
                                       recording: false, tapped: new WeakSet(), busy: false, answers: 0 };
  const FRAME_S = %FRAME_S%;
  let acc = 0, count = 0, frameSize = 0;
  function tapInto(ctx, node) {
    const processor = ctx.createScriptProcessor(1024, 1, 1);
    probe.rate = ctx.sampleRate;
    frameSize = Math.max(1, Math.round(ctx.sampleRate * FRAME_S));
    processor.onaudioprocess = (event) => {
      const input = event.inputBuffer.getChannelData(0);
      if (!probe.recording) return;
      for (let i = 0; i < input.length; i++) {
        acc += input[i] * input[i]; count++;
        if (count === frameSize) {
          probe.frames.push(10 * Math.log10(Math.max(acc / count, 1e-12)));
          acc = 0; count = 0;
        }
      }
    };
    node.connect(processor);
    processor.connect(ctx.destination);  // outputs silence; keeps the processor running
    probe.processor = processor;
  }
  probe.tapLive = () => {
    const live = window.omniLive;
    if (!live || probe.tapped.has(live)) return;
    probe.tapped.add(live);
    const ensure = live.ensureContext.bind(live);
    live.ensureContext = (rate) => {
      const fresh = !live.ctx;
      ensure(rate);
      if (fresh && live.ctx) tapInto(live.ctx, live.output);
    };
  };
  probe.tapElement = (el) => {
    if (probe.tapped.has(el)) return;
    probe.tapped.add(el);
    const ctx = probe.elementCtx || (probe.elementCtx = new AudioContext());
    const source = ctx.createMediaElementSource(el);
    source.connect(ctx.destination);
    tapInto(ctx, source);
  };
  probe.answerTime = answerTime;
  function answerTime() {
    const live = window.omniLive;
    // The previous answer's key and time stay until the Send click's script begins the new answer.
    if (live && live.key) return live.key !== probe.keyAtClick ? live.currentTime : 0;
    const el = document.querySelector("#audio_out audio");
    if (el && el.src && el.src !== probe.srcAtClick) return el.currentTime;
    return 0;
  }
  document.addEventListener("click", (event) => {
    if (!event.target.closest || !event.target.closest("#submit")) return;
    probe.clickAt = performance.now();
    probe.soundAt = null;
    probe.frames = []; acc = 0; count = 0;
    probe.recording = true;
    const el = document.querySelector("#audio_out audio");
    probe.srcAtClick = el ? el.src : null;
    probe.keyAtClick = window.omniLive ? window.omniLive.key : null;
    if (probe.elementCtx) probe.elementCtx.resume();
  }, true);
  setInterval(() => {
    probe.tapLive();
    const el = document.querySelector("#audio_out audio");
    if (el && probe.wantElementTap) probe.tapElement(el);
    if (probe.clickAt !== null && probe.soundAt === null && answerTime() > 0) probe.soundAt = performance.now();
    const send = document.querySelector("#submit");
    if (send && send.disabled) probe.busy = true;       // the page disables Send while it answers
    else if (send && probe.busy) { probe.busy = false; probe.answers += 1; }
  }, 5);
})();
""".replace("%FRAME_S%", str(ENVELOPE_FRAME_S))


def launch_chromium(playwright: Any, fake_mic: Path | None = None, executable: str | None = None) -> Any:
    """Headless Debian chromium with a fake microphone playing `fake_mic` once (`%noloop`)."""
    args = ["--autoplay-policy=no-user-gesture-required"]
    if fake_mic is not None:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={fake_mic}%noloop"]
    return playwright.chromium.launch(executable_path=executable or chromium_path(), args=args, headless=True)


@dataclass
class AnswerResult:
    """What the page showed for one answer."""

    text: str
    status: str
    notice: str
    click_to_sound_s: float | None  # Send click to the answer's audio playing (currentTime > 0)
    worker_first_audio_s: float | None  # the worker's own time to first audio, from the status line
    page_first_audio_s: float | None  # first audio at the page's server, from the status line
    clip_seconds: float | None  # duration of the replayable clip the chat got

    @property
    def page_adds_s(self) -> float | None:
        if self.click_to_sound_s is None or self.worker_first_audio_s is None:
            return None
        return self.click_to_sound_s - self.worker_first_audio_s


class PageDriver:
    """One browser page on the web UI, with the actions a person takes and what they would see."""

    def __init__(self, page: Any, url: str, artifacts: Path | None = None) -> None:
        self.page, self.url, self.artifacts = page, url, artifacts
        self._answers = 0
        page.add_init_script(PROBE_JS)

    def open(self, timeout_s: float = 60.0) -> None:
        self.page.goto(self.url, timeout=timeout_s * 1000)
        self.page.wait_for_selector("#submit", timeout=timeout_s * 1000)
        self.page.wait_for_selector("#mic_in", timeout=timeout_s * 1000)

    def screenshot(self, name: str) -> Path | None:
        if self.artifacts is None:
            return None
        self.artifacts.mkdir(parents=True, exist_ok=True)
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def _uploaded(self) -> Any:
        return self.page.expect_response(
            lambda r: "/gradio_api/upload" in r.url and "progress" not in r.url and r.request.method == "POST",
            timeout=60_000)

    def record(self, seconds: float) -> str:
        """Record `seconds` from the (fake) microphone; returns the server-side path of the uploaded take."""
        mic = self.page.locator("#mic_in")
        if mic.get_by_role("button", name="Record", exact=True).count() == 0:
            mic.get_by_role("button", name="Record audio").click()  # switch back from upload mode
        mic.get_by_role("button", name="Record", exact=True).click()
        self.page.wait_for_selector("#mic_in button.stop-button", timeout=10_000)
        time.sleep(seconds)
        with self._uploaded() as upload:
            self.page.locator("#mic_in button.stop-button").click()
        self.page.wait_for_selector("#mic_in [data-testid=waveform-controls]", timeout=20_000)
        return upload.value.json()[0]

    def upload(self, path: Path) -> str:
        mic = self.page.locator("#mic_in")
        if self.page.locator("#mic_in input[type=file]").count() == 0:
            mic.get_by_role("button", name="Upload file").click()
        with self._uploaded() as upload:
            self.page.locator("#mic_in input[type=file]").set_input_files(str(path))
        self.page.wait_for_selector("#mic_in [data-testid=waveform-controls]", timeout=20_000)
        return upload.value.json()[0]

    def tap_gradio_player(self) -> None:
        """Record what Gradio's <audio> plays (the live player is tapped automatically)."""
        self.page.evaluate("window.__omniProbe.wantElementTap = true")

    def send(self) -> None:
        """Click Send; `wait_done` then waits for this answer (not an earlier one) to end."""
        self._answers = self.page.evaluate("window.__omniProbe.answers")
        self.page.locator("#submit").click()

    def wait_sound(self, timeout_s: float = 60.0) -> float:
        """Seconds from the Send click to the answer's audio playing, measured in the page."""
        self.page.wait_for_function("window.__omniProbe.soundAt !== null", timeout=timeout_s * 1000, polling=20)
        return self.page.evaluate("(window.__omniProbe.soundAt - window.__omniProbe.clickAt) / 1000")

    def wait_done(self, timeout_s: float = 120.0) -> None:
        """Until the answer sent last ended: Send was disabled while it ran and is usable again."""
        self.page.wait_for_function("(n) => window.__omniProbe.answers > n", arg=self._answers,
                                    timeout=timeout_s * 1000, polling=50)

    def result(self) -> AnswerResult:
        status = self.page.inner_text("#status")
        notice_box = self.page.locator("#notice")
        notice = notice_box.inner_text() if notice_box.count() and notice_box.is_visible() else ""
        text = self.answer_text()
        sound = self.page.evaluate("(p => p.soundAt === null ? null : (p.soundAt - p.clickAt) / 1000)"
                                   "(window.__omniProbe)")
        return AnswerResult(text=text, status=status, notice=notice, click_to_sound_s=sound,
                            worker_first_audio_s=_number(r"worker (\d+\.\d+) s", status),
                            page_first_audio_s=_number(r"first audio after \**(\d+\.\d+) s", status),
                            clip_seconds=self.last_clip_seconds())

    def answer_text(self) -> str:
        """The text of the last assistant message ("" before any)."""
        bubbles = self.page.locator("#chat [data-testid=bot] .md")
        return bubbles.last.inner_text() if bubbles.count() else ""

    def chat_clips(self) -> Any:
        return self.page.locator("#chat audio")

    def last_clip_seconds(self) -> float | None:
        clips = self.chat_clips()
        if clips.count() == 0:
            return None
        handle = clips.last
        try:
            handle.evaluate("(el) => el.duration > 0 || new Promise((ok) => {"
                            " el.addEventListener('loadedmetadata', ok, {once: true});"
                            " el.load(); setTimeout(ok, 5000); })")
            duration = handle.evaluate("(el) => el.duration")
        except Exception:  # noqa: BLE001 - a page that re-rendered meanwhile: report no clip
            return None
        return float(duration) if duration and np.isfinite(duration) else None

    def last_clip_bytes(self) -> bytes:
        """The last answer clip's file, fetched by the page itself (its src may be a blob: URL)."""
        encoded = self.chat_clips().last.evaluate("""async (el) => {
            const data = new Uint8Array(await (await fetch(el.currentSrc || el.src)).arrayBuffer());
            let text = "";
            for (let i = 0; i < data.length; i += 0x8000) text += String.fromCharCode(...data.subarray(i, i + 0x8000));
            return btoa(text); }""")
        return base64.b64decode(encoded)

    def played_envelope(self) -> tuple[np.ndarray, float | None]:
        """Loudness envelope (dB per 10 ms) of what the player actually played since the last Send."""
        frames, rate = self.page.evaluate("[window.__omniProbe.frames, window.__omniProbe.rate]")
        return np.asarray(frames, dtype=np.float64), rate

    def playback_position(self) -> tuple[float, float]:
        """(seconds since the answer's sound started, seconds of it played): their difference is time stalled."""
        return tuple(self.page.evaluate(
            "[(performance.now() - window.__omniProbe.soundAt) / 1000, window.__omniProbe.answerTime()]"))

    def set_setting(self, elem_id: str, value: float) -> None:
        """Type a value into one of the Settings sliders (opening the accordion if needed)."""
        box = self.page.locator(f"#{elem_id} input[type=number]")
        opened = not box.is_visible()
        if opened:
            self.page.locator("#settings").get_by_text("Settings").first.click()
            box.wait_for(state="visible", timeout=10_000)
        box.fill(str(value))
        box.press("Enter")
        if opened:  # leave the page as it was
            self.page.locator("#settings").get_by_text("Settings").first.click()
            box.wait_for(state="hidden", timeout=10_000)

    def stop_recording_tap(self) -> None:
        self.page.evaluate("window.__omniProbe.recording = false")


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None
