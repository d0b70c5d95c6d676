"""`omni-serve launch` as a user runs it: the whole stack up with one command, answering, then stopped
cleanly by SIGTERM; a model that cannot load stops the launch with a clear message. Plus the plan
(GPU pinning, thread division, token by environment) checked without starting anything.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
from conftest import MODEL_DIR, VOCODER_DIR
from serve_helpers import PRE_EXEC, Q2_WAV

from omni_serve.serve.client import ServeClient, collect, request_from_file
from omni_serve.serve.launcher import (
    MAX_WORKER_RESTARTS,
    Child,
    LaunchPlan,
    Stack,
    build_children,
    resolve_devices,
    supervise,
)
from omni_serve.serve.protocol import FinalEvent

TOKEN = "launch-test-token"
HAS_WEB = all(importlib.util.find_spec(name) is not None for name in ("omni_serve.serve.web", "gradio"))


class Launched:
    """The launcher process with its output read line by line on a thread."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "omni_serve", "launch", *args],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        text=True, bufsize=1, env=env, preexec_fn=PRE_EXEC)  # noqa: PLW1509
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, pattern: str, timeout_s: float) -> str | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                return None
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        return None

    def output(self) -> str:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return "".join(self.seen)
            if line is not None:
                self.seen.append(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("OMNI_SERVE_TOKEN", None)
    env.update(extra)
    return env


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2, trust_env=False)
        return True
    except httpx.HTTPError:
        return False


def test_launch_serves_and_stops_cleanly_on_sigterm(expected):
    args = ["--model-path", str(MODEL_DIR), "--vocoder", str(VOCODER_DIR), "--cpu-workers", "1",
            "--controller-port", "0", "--heartbeat-interval", "1"]
    if HAS_WEB:
        args += ["--web", "--web-port", "0"]
    launched = Launched(*args, env=_env(OMNI_SERVE_TOKEN=TOKEN))
    try:
        assert launched.wait_for_line(r"Press Ctrl-C to stop", timeout_s=180), launched.output()
        text = launched.output()
        urls = dict(re.findall(r"^\s+(controller|worker-0|web)\s+(http://\S+)", text, re.MULTILINE))
        assert set(urls) == {"controller", "worker-0", *(["web"] if HAS_WEB else [])}, text
        assert all(url.startswith("http://127.0.0.1:") for url in urls.values())
        assert "[worker-0]" in text and "[controller]" in text  # logs streamed with a prefix per process
        assert re.search(r"\[worker-0\].*loaded omni-tiny-ref on cpu float32", text), text
        assert re.search(r"\[worker-0\].*warmed up in [\d.]+ s$", text, re.MULTILINE), text  # before ready, no failure
        assert TOKEN not in text

        async def ask():
            async with ServeClient(urls["controller"], TOKEN) as client:
                return await collect(client.stream(request_from_file(Q2_WAV, max_new_tokens=24)))

        final, audio = asyncio.run(asyncio.wait_for(ask(), 60))
        assert isinstance(final, FinalEvent) and final.token_ids == expected["omni"]["q2"]["generated_ids"]
        assert audio.size > 0
        if HAS_WEB:
            assert httpx.get(urls["web"] + "/", timeout=10, trust_env=False).status_code < 500

        launched.process.send_signal(signal.SIGTERM)
        assert launched.process.wait(30) == 0
        assert launched.wait_for_line(r"\[launcher\] stopped", timeout_s=5) or "stopped" in launched.output()
        assert not any(_answers(url + "/health") for url in urls.values())  # every child is gone
    finally:
        launched.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run on a GPU host")
def test_launch_puts_one_worker_on_each_visible_gpu_in_half_precision():
    """The default launch on a GPU host: no --cpu-workers, no --gpus; a worker per GPU, each pinned to its
    own card and loaded in bf16 (fp16 where the card lacks bf16), answering through the controller."""
    count = torch.cuda.device_count()
    half = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    env = _env()
    env.pop("CUDA_VISIBLE_DEVICES")
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    launched = Launched("--model-path", str(MODEL_DIR), "--vocoder", str(VOCODER_DIR), "--controller-port", "0",
                        "--heartbeat-interval", "1", env=env)
    try:
        assert launched.wait_for_line(r"Press Ctrl-C to stop", timeout_s=180), launched.output()
        text = launched.output()
        workers = re.findall(r"^\s+(worker-\d+)\s+http://\S+\s+\(GPU (\d+)\)", text, re.MULTILINE)
        assert len(workers) == count and len({gpu for _, gpu in workers}) == count, text
        assert len(re.findall(rf"\[worker-\d+\].*loaded .* on cuda {half}", text)) == count, text
        controller = re.search(r"^\s+controller\s+(http://\S+)", text, re.MULTILINE).group(1)

        async def ask():
            async with ServeClient(controller) as client:
                return await collect(client.stream(request_from_file(Q2_WAV, max_new_tokens=24)))

        final, audio = asyncio.run(asyncio.wait_for(ask(), 60))
        assert isinstance(final, FinalEvent) and final.token_ids and audio.size > 0
        launched.process.send_signal(signal.SIGTERM)
        assert launched.process.wait(30) == 0
    finally:
        launched.stop()


def test_a_model_that_cannot_load_stops_the_launch_with_its_reason(tmp_path):
    launched = Launched("--model-path", str(tmp_path / "missing"), "--cpu-workers", "1", "--controller-port", "0",
                        env=_env())
    try:
        assert launched.process.wait(120) == 1
        text = launched.output()
        assert "start-up failed" in text and "[worker-0] error:" in text, text
        assert "Traceback" not in text
    finally:
        launched.stop()


def test_plan_pins_one_gpu_per_worker_and_divides_cpu_threads():
    assert resolve_devices("auto", 3) == (None, None, None)
    assert resolve_devices("0,2", None) == ("0", "2")
    assert resolve_devices("auto", None, gpu_count=lambda: 2) == ("0", "1")
    assert resolve_devices("auto", None, gpu_count=lambda: 0) == (None,)
    with pytest.raises(ValueError):
        resolve_devices(",", None)

    gpu = build_children(LaunchPlan(model_path="m", devices=("0", "3"), controller_port=21001, web_port=7860,
                                    token="secret"))
    names = [child.name for child in gpu]
    assert names == ["controller", "worker-0", "worker-1", "web"]
    assert [child.env["CUDA_VISIBLE_DEVICES"] for child in gpu[1:3]] == ["0", "3"]
    assert all(child.argv[child.argv.index("--device") + 1] == "cuda" for child in gpu[1:3])
    assert all("secret" not in " ".join(child.argv) and child.env["OMNI_SERVE_TOKEN"] == "secret" for child in gpu)
    assert all(child.argv[child.argv.index("--controller-url") + 1] == "http://127.0.0.1:21001" for child in gpu[1:3])
    assert gpu[3].argv[3:] == ["web", "--controller-url", "http://127.0.0.1:21001", "--host", "127.0.0.1",
                               "--port", "7860"]

    cpu = build_children(LaunchPlan(model_path="m", devices=(None, None)))
    for child in cpu[1:]:
        assert child.argv[child.argv.index("--device") + 1] == "cpu" and child.env["CUDA_VISIBLE_DEVICES"] == ""
        assert int(child.argv[child.argv.index("--num-threads") + 1]) >= 1
    assert "OMNI_SERVE_TOKEN" not in cpu[0].env


def test_supervisor_restarts_a_dead_worker_a_few_times_then_gives_up():
    plan = LaunchPlan(model_path="m")
    out = io.StringIO()
    stack = Stack(plan, out)
    crash = [sys.executable, "-c", "print('started'); raise SystemExit(3)"]
    stack.start(Child("worker-0", crash, dict(os.environ), "http://127.0.0.1:9/ready"))
    try:
        assert supervise(stack, threading.Event()) == 1
    finally:
        stack.stop()
    assert stack.children[0].restarts == MAX_WORKER_RESTARTS
    text = out.getvalue()
    assert text.count("[worker-0] started") == MAX_WORKER_RESTARTS + 1
    assert "exited with code 3; stopping everything" in text


def test_a_worker_that_ran_for_a_while_is_restarted_every_time(monkeypatch):
    """Deaths far apart are not a crash loop: each one finds the count reset."""
    monkeypatch.setattr("omni_serve.serve.launcher.STABLE_AFTER_S", 0.0)
    out, stop = io.StringIO(), threading.Event()
    stack = Stack(LaunchPlan(model_path="m"), out)
    crash = [sys.executable, "-c", "print('started'); raise SystemExit(3)"]
    stack.start(Child("worker-0", crash, dict(os.environ), "http://127.0.0.1:9/ready"))
    deaths = MAX_WORKER_RESTARTS + 2

    def stop_after_deaths() -> None:
        while out.getvalue().count("restarting it") < deaths:
            time.sleep(0.05)
        stop.set()

    watcher = threading.Thread(target=stop_after_deaths, daemon=True)
    watcher.start()
    try:
        assert supervise(stack, stop) == 0  # stopped by us, not given up
    finally:
        stop.set()
        stack.stop()
    assert "stopping everything" not in out.getvalue()
