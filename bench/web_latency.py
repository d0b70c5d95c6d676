"""Perceived latency of the web page, measured in a real headless Chromium on the whole local stack.

For each player of the page (`live`: the Web Audio player fed by one HTTP stream; `gradio`: Gradio's
`gr.Audio(streaming=True, autoplay=True)`, AAC over HLS) and each request:
- click->sound: from the Send click to the answer's audio playing (`currentTime > 0`), in the page;
- worker first audio: the worker's own time to first audio for the same request (its `final.timings`,
  shown in the page's status line); page adds = click->sound - worker first audio (goal: <= 0.5 s);
- stalls: seconds the playback stood still during the first LISTEN seconds (wall time since the first
  sound minus the player's currentTime);
- gaps: what the player really played, recorded in the page (a Web Audio tap) as a 10 ms loudness
  envelope and aligned with the answer's own audio: runs of >= 30 ms of silence where the answer
  is not silent (a codec's priming silence at chunk joins, or a chunk that came late).
The stack is the fixture model (random tiny weights: gibberish, but real streaming) with one CPU worker.

    python bench/web_latency.py [--quick] [--json] [--repeats N] [--players live,gradio]
                                [--model-path DIR --vocoder DIR] [--screenshot docs/web-ui.png]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (
    FIXTURE_MODEL,
    FIXTURE_VOCODER,
    QUESTIONS,
    emit_json,
    machine_note,
    median,
    parse_args,
    print_table,
    spread,
)

from omni_serve.serve.web_probe import (
    ENVELOPE_FRAME_S,
    LocalStack,
    PageDriver,
    chromium_path,
    envelope_match,
    launch_chromium,
    loudness_envelope,
    read_audio,
    silent_gaps,
)

GOAL_S = 0.5
LISTEN_S = 4.0  # seconds of each answer listened to for stalls and gaps
MAX_NEW_TOKENS = 96  # keeps each answer short on CPU; the audio still spans many chunk joins


def measure_request(driver: PageDriver, question: Path, listen_s: float, screenshot: Path | None = None,
                    new_conversation: bool = True) -> dict:
    if new_conversation:  # comparable requests: the tiny model's 2048-position context fills in a few turns
        driver.page.locator("#new_conversation").click()
        driver.page.wait_for_function("document.querySelectorAll('#chat [data-testid=user]').length === 0")
    driver.upload(question)
    driver.send()
    driver.wait_sound(timeout_s=30)
    if screenshot is not None:  # the page answering: text streaming, speech playing
        driver.page.wait_for_function("document.querySelector('#chat [data-testid=bot] .md')", timeout=30_000)
        time.sleep(0.5)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.page.screenshot(path=str(screenshot))
        listen_s = max(0.0, listen_s - 0.5)
    time.sleep(listen_s)
    since_sound, played_s = driver.playback_position()
    driver.wait_done(timeout_s=120)
    driver.stop_recording_tap()
    result = driver.result()
    underruns = driver.page.evaluate("window.omniLive ? window.omniLive.stats().gaps.length : null")
    played, _ = driver.played_envelope()
    clip, rate = read_audio(driver.last_clip_bytes())
    reference = loudness_envelope(clip, rate)
    heard = min(len(reference), int(min(since_sound, played_s) / ENVELOPE_FRAME_S))
    correlation, lag = envelope_match(played, reference[:max(heard, 10)])
    gaps = silent_gaps(played, reference[:heard], lag)
    return {
        "click_to_sound_s": result.click_to_sound_s,
        "worker_first_audio_s": result.worker_first_audio_s,
        "page_server_first_audio_s": result.page_first_audio_s,
        "page_adds_s": result.page_adds_s,
        "stall_s": max(0.0, min(since_sound, len(clip) / rate) - played_s),
        "gaps": len(gaps),
        "gap_ms": sum(length for _, length in gaps) * ENVELOPE_FRAME_S * 1000,
        "envelope_r": correlation,
        "live_player_underruns": underruns,  # the live player's own count of chunks that came late
        "answer_audio_s": len(clip) / rate,
        "reference_silent_frames": int((reference[:heard] < -50).sum()),
    }


def run_player(browser, url: str, player: str, requests: int, listen_s: float,
               screenshot: Path | None = None) -> list[dict]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        driver = PageDriver(context.new_page(), url)
        driver.open()
        driver.set_setting("max_new_tokens", MAX_NEW_TOKENS)
        if player == "gradio":
            driver.tap_gradio_player()
        measure_request(driver, QUESTIONS[1], 1.0)  # warm-up: first request of a page and of the worker
        rows = [measure_request(driver, QUESTIONS[i % 2], listen_s) for i in range(requests)]
        if screenshot is not None:
            measure_request(driver, QUESTIONS[0], 1.0, screenshot, new_conversation=False)  # a second turn
        return rows
    finally:
        context.close()


def summarize(rows: list[dict]) -> dict:
    def values(key: str) -> list[float]:
        return [row[key] for row in rows if row[key] is not None]

    summary = {key: median(values(key)) for key in ("click_to_sound_s", "worker_first_audio_s",
                                                    "page_server_first_audio_s", "page_adds_s", "stall_s",
                                                    "envelope_r")}
    summary["gaps"] = sum(row["gaps"] for row in rows)
    summary["gap_ms"] = sum(row["gap_ms"] for row in rows)
    summary["meets_goal"] = summary["page_adds_s"] <= GOAL_S
    summary["requests"] = rows
    return summary


def main() -> None:
    def options(parser) -> None:
        parser.add_argument("--players", default="live,gradio", help="comma-separated: live, gradio")
        parser.add_argument("--model-path", type=Path, default=FIXTURE_MODEL, help="default: the fixture model")
        parser.add_argument("--vocoder", type=Path, default=None, help="default: the fixture vocoder")
        parser.add_argument("--screenshot", type=Path, default=None,
                            help="also save the live page answering a second question here (README picture)")

    args = parse_args(__doc__.splitlines()[0], add=options)
    vocoder = args.vocoder or (FIXTURE_VOCODER if args.model_path == FIXTURE_MODEL else None)
    if chromium_path() is None:
        raise SystemExit("Debian's chromium is needed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    players = tuple(p.strip() for p in args.players.split(",") if p.strip())
    requests = args.repeats or (2 if args.quick else 5)
    listen_s = 3.0 if args.quick else LISTEN_S
    with tempfile.TemporaryDirectory(prefix="web-latency-") as logs:
        stack = LocalStack(args.model_path, vocoder, log_dir=Path(logs), players=players)
        stack.start(timeout_s=300)
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                try:
                    results = {player: summarize(run_player(
                        browser, stack.web_urls[player], player, requests, listen_s,
                        args.screenshot if player == "live" else None)) for player in players}
                finally:
                    browser.close()
        finally:
            stack.stop()

    figures = {"model": str(args.model_path), "goal_page_adds_s": GOAL_S, "listen_s": listen_s,
               "max_new_tokens": MAX_NEW_TOKENS,
               "machine": machine_note(), "players": results}
    if args.json:
        emit_json(figures)
        return
    rows = []
    for player, summary in results.items():
        requests_ = summary["requests"]
        rows.append([player, len(requests_), spread([r["click_to_sound_s"] for r in requests_]),
                     spread([r["worker_first_audio_s"] for r in requests_ if r["worker_first_audio_s"] is not None]),
                     spread([r["page_adds_s"] for r in requests_ if r["page_adds_s"] is not None]),
                     summary["meets_goal"], spread([r["stall_s"] for r in requests_]),
                     f"{summary['gaps']} ({summary['gap_ms']:.0f} ms)", f"{summary['envelope_r']:.2f}"])
    print_table(f"Web page latency, Send click to answer audio playing (seconds; median (min..max); "
                f"goal: page adds <= {GOAL_S} s)",
                ["player", "n", "click->sound", "worker 1st audio", "page adds", "goal", "stalled",
                 f"gaps in {listen_s:.0f} s", "played~answer r"], rows)
    print(f"\n{machine_note()}")


if __name__ == "__main__":
    main()
