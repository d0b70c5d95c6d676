"""The web page in a real headless Chromium, on the whole stack (controller, CPU worker, page) with the fixture model.

A person's path through the page: record a question through the (fake) microphone, send it, see the
answer's text and hear its audio; upload a file instead and keep talking; stop an answer; use
Gradio's own streaming player; meet a stopped worker and get a plain message, then carry on once it is
back. Screenshots go to test-artifacts/web/. Speed is measured by bench/web_latency.py, not asserted here.
Needs Debian's chromium (`apt-get install chromium`; CI installs it); skipped without it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from omni_serve.serve.web_probe import (
    LocalStack,
    PageDriver,
    chromium_path,
    envelope_match,
    launch_chromium,
    loudness_envelope,
    read_audio,
    write_fake_mic_wav,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llama-omni-ref"
ARTIFACTS = ROOT / "test-artifacts" / "web"
Q1, Q2 = FIXTURES / "inputs" / "q1.wav", FIXTURES / "inputs" / "q2.wav"

pytestmark = pytest.mark.skipif(chromium_path() is None, reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = LocalStack(FIXTURES / "omni-tiny-ref", FIXTURES / "vocoder-tiny-ref",
                       log_dir=tmp_path_factory.mktemp("web-stack"), players=("live", "gradio"))
    stack.start(timeout_s=240)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def fake_mic(tmp_path_factory) -> Path:
    return write_fake_mic_wav(Q1, tmp_path_factory.mktemp("mic") / "question-48k.wav")


@pytest.fixture(scope="module")
def browser(fake_mic):
    with sync_api.sync_playwright() as playwright:
        browser = launch_chromium(playwright, fake_mic)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, request):
    """A fresh page on one of the stack's web UIs; screenshot saved at the end whatever happened."""
    contexts = []

    def open_page(url: str) -> PageDriver:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        driver = PageDriver(context.new_page(), url, ARTIFACTS)
        driver.open()
        return driver

    yield open_page
    for index, context in enumerate(contexts):
        for page in context.pages:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-end{index}.png"), full_page=True)
        context.close()


def assert_answered(driver: PageDriver) -> None:
    result = driver.result()
    assert result.notice == "", f"unexpected notice: {result.notice}"
    assert result.text.strip(), "no answer text in the chat"
    assert "first audio after" in result.status and "tokens/s" in result.status, result.status
    assert result.clip_seconds and result.clip_seconds > 0, "the answer has no replayable clip"


def test_microphone_question_gets_streamed_text_and_audio(stack, open_page):
    driver = open_page(stack.web_urls["live"])
    driver.screenshot("01-page-open")
    recorded_path = driver.record(seconds=3.6)

    # The fake microphone must really have recorded the question (bad wav formats record silence).
    samples, rate = soundfile.read(recorded_path, dtype="float32", always_2d=True)
    recorded = loudness_envelope(samples.mean(axis=1), rate)
    source, source_rate = soundfile.read(str(Q1), dtype="float32")
    correlation, _ = envelope_match(recorded, loudness_envelope(source, source_rate))
    assert recorded.max() > -30, "the recording is silent"
    assert correlation > 0.6, f"the recording does not sound like the question (envelope r={correlation:.2f})"

    driver.send()
    driver.wait_sound(timeout_s=60)
    assert driver.page.evaluate("window.omniLive.stats().chunks") >= 1
    driver.page.wait_for_function("document.querySelector('#chat [data-testid=bot] .md')", timeout=30_000)
    driver.screenshot("02-answer-streaming")
    driver.wait_done()
    assert_answered(driver)
    played, _ = driver.played_envelope()
    assert len(played) and played.max() > -40, "the live player played only silence"
    clip, clip_rate = read_audio(driver.last_clip_bytes())
    assert len(clip) / clip_rate == pytest.approx(driver.page.evaluate("window.omniLive.stats().scheduledSeconds"),
                                                  abs=0.05), "the player got less audio than the clip holds"
    driver.screenshot("03-answered")


def test_uploaded_file_continues_the_conversation_and_stop_cancels(stack, open_page):
    driver = open_page(stack.web_urls["live"])
    driver.upload(Q2)
    driver.send()
    driver.wait_sound(timeout_s=60)
    driver.wait_done()
    assert_answered(driver)

    driver.upload(Q1)  # second turn, same conversation, long enough that Stop lands mid-answer
    driver.set_setting("temperature", 1.0)
    driver.set_setting("max_new_tokens", 1024)
    driver.send()
    driver.wait_sound(timeout_s=60)
    driver.page.locator("#stop").click()
    driver.page.wait_for_function("document.querySelector('#status').innerText.startsWith('Stopped')",
                                  timeout=20_000)
    assert driver.page.evaluate("window.omniLive.playing") is False, "audio kept playing after Stop"
    assert driver.page.locator("#chat [data-testid=user]").count() == 2
    assert driver.page.locator("#submit").is_enabled()
    driver.screenshot("04-stopped")


def test_gradio_streaming_player_plays_the_answer(stack, open_page):
    driver = open_page(stack.web_urls["gradio"])
    driver.upload(Q1)
    driver.send()
    driver.wait_sound(timeout_s=60)  # currentTime > 0 on #audio_out audio
    driver.wait_done()
    assert_answered(driver)
    player = driver.page.locator("#audio_out audio")
    assert player.get_attribute("src").startswith("blob:"), "the streaming player got no HLS stream"
    driver.screenshot("05-gradio-player")


def test_stopped_worker_gives_plain_message_and_page_recovers(stack, open_page):
    driver = open_page(stack.web_urls["live"])
    stack.stop_worker()
    driver.upload(Q1)
    driver.send()
    notice = driver.page.locator("#notice")
    notice.wait_for(state="visible", timeout=60_000)
    assert "No worker is available" in notice.inner_text(), notice.inner_text()
    assert driver.page.locator("#submit").is_enabled()
    driver.screenshot("06-no-worker")

    stack.start_worker(timeout_s=180)
    deadline = time.monotonic() + 60
    while True:  # the question went back into the input: Send again is all it takes
        driver.send()
        driver.wait_done(timeout_s=120)
        if not driver.page.locator("#notice").is_visible() or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert_answered(driver)
    assert np.isfinite(driver.result().clip_seconds)
    driver.screenshot("07-recovered")
