"""Starting the controller and workers as real processes on loopback ports for the serving tests.

Every process writes its log to a file (a full pipe could stall it), is started with the kernel told to
end it if the test process dies, and is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from conftest import FIXTURES, MODEL_DIR, VOCODER_DIR

from omni_serve.serve.launcher import die_with_parent_hook, free_port
from omni_serve.serve.server import wait_until_ready

MODEL_NAME = MODEL_DIR.name
Q1_WAV = FIXTURES / "inputs" / "q1.wav"
Q2_WAV = FIXTURES / "inputs" / "q2.wav"
START_TIMEOUT_S = 120.0
PRE_EXEC = die_with_parent_hook()


@dataclass
class ServerProcess:
    name: str
    url: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=PRE_EXEC)  # noqa: PLW1509
        return self

    def wait(self, path: str = "/ready", timeout_s: float = START_TIMEOUT_S) -> ServerProcess:
        try:
            wait_until_ready(self.url + path, timeout_s, alive=self.alive)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{self.name} did not start: {exc}\n--- log ---\n{self.log()[-3000:]}") from exc
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye (a crash)."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _env(token: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("OMNI_SERVE_TOKEN", None)
    if token:
        env["OMNI_SERVE_TOKEN"] = token
    return env


def controller_process(log_dir: Path, *, port: int | None = None, token: str | None = None, expiry_s: float = 5.0,
                       extra: tuple[str, ...] = ()) -> ServerProcess:
    port = port or free_port()
    argv = [sys.executable, "-m", "omni_serve", "controller", "--port", str(port),
            "--heartbeat-expiry", str(expiry_s), "--log-level", "warning", *extra]
    log_path = log_dir / f"controller-{port}.log"
    return ServerProcess("controller", f"http://127.0.0.1:{port}", argv, _env(token), log_path)


def worker_process(log_dir: Path, controller_url: str, *, token: str | None = None, interval_s: float = 1.0,
                   extra: tuple[str, ...] = ()) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "omni_serve", "worker", "--model-path", str(MODEL_DIR), "--vocoder", str(VOCODER_DIR),
            "--device", "cpu", "--num-threads", "1", "--port", str(port), "--controller-url", controller_url,
            "--heartbeat-interval", str(interval_s), "--max-audio-seconds", "10", "--max-body-mb", "2",
            "--limit-concurrency", "4", "--max-batch-size", "4", "--log-level", "warning", *extra]
    return ServerProcess(f"worker-{port}", f"http://127.0.0.1:{port}", argv, _env(token),
                         log_dir / f"worker-{port}.log")


@dataclass
class Stack:
    """A controller and its workers, started together (workers load their models in parallel)."""

    controller: ServerProcess
    workers: list[ServerProcess] = field(default_factory=list)
    token: str | None = None

    @classmethod
    def start(cls, log_dir: Path, n_workers: int, token: str | None = None, interval_s: float = 1.0,
              expiry_s: float = 5.0) -> Stack:
        controller = controller_process(log_dir, token=token, expiry_s=expiry_s).start()
        stack = cls(controller, token=token)
        try:
            controller.wait("/health")
            stack.workers = [worker_process(log_dir, controller.url, token=token, interval_s=interval_s).start()
                             for _ in range(n_workers)]
            for worker in stack.workers:
                worker.wait("/ready")
            stack.wait_registered(n_workers)
        except BaseException:
            stack.stop()
            raise
        return stack

    def wait_registered(self, count: int, timeout_s: float = 30.0) -> float:
        """Poll /list_workers until `count` workers are listed; the seconds it took."""
        began = time.monotonic()
        while time.monotonic() - began < timeout_s:
            try:
                if len(self.listed_workers()) >= count:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"fewer than {count} workers registered within {timeout_s} s")

    def listed_workers(self) -> list[str]:
        response = httpx.get(f"{self.controller.url}/list_workers", timeout=5, trust_env=False)
        return [entry["name"] for entry in response.json()["workers"]]

    def stop(self) -> None:
        for process in [*self.workers, self.controller]:
            process.stop()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


def worker_status(url: str) -> dict:
    return httpx.post(f"{url}/worker_get_status", timeout=5, trust_env=False).json()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.05, what: str = "condition", show=None) -> float:
    """Poll until `predicate()` is true; the seconds it took (raises TimeoutError past the bound).

    `show()`, when given, describes the state in the timeout message.
    """
    began = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - began
        if time.monotonic() - began > timeout_s:
            state = f" (last: {show()})" if show is not None else ""
            raise TimeoutError(f"{what} not reached within {timeout_s} s{state}")
        time.sleep(interval_s)
