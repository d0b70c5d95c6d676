"""One command, the whole stack: a controller, one worker per GPU (or N CPU workers), optionally the web UI.

Each part runs as its own child process (`python -m omni_serve controller|worker|web`), exactly as in a
manual deployment, so what the launcher starts is what an operator would run by hand. The launcher
picks free ports, waits for each part to be ready before starting what depends on it, prefixes every
log line with the part's name, restarts a worker that dies, and on Ctrl-C or SIGTERM stops them all.
Children are started in their own session (a terminal's Ctrl-C reaches only the launcher, which stops
them in order) and are told by the kernel to exit if the launcher itself is killed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from omni_serve.serve.server import wait_until_ready
from omni_serve.serve.settings import HEARTBEAT_INTERVAL_S, LOOPBACK, TOKEN_ENV

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 10.0
MAX_WORKER_RESTARTS = 3  # in a row: deaths each within STABLE_AFTER_S of the worker's start (a crash loop)
STABLE_AFTER_S = 300.0  # a worker that ran this long before dying starts its count afresh


@dataclass(frozen=True)
class LaunchPlan:
    """What to start: the model, the workers' devices (GPU ids, or None for each CPU worker), ports, options."""

    model_path: str
    vocoder: str | None = None
    speech_encoder: str | None = None
    dtype: str = "auto"
    devices: tuple[str | None, ...] = (None,)  # "0", "1" ... pin a GPU; None: a CPU worker
    host: str = LOOPBACK
    controller_port: int = 0
    web_port: int | None = None  # None: no web UI
    token: str | None = None
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    dispatch: str = "shortest_queue"
    limit_concurrency: int | None = None
    max_batch_size: int | None = None
    startup_timeout_s: float = 600.0
    extra_worker_args: tuple[str, ...] = ()


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str
    any_answer: bool = False  # the web UI is ready when its port answers at all
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    pump: threading.Thread | None = None


@dataclass
class Stack:
    """The running children; `stop()` ends them all (web first, controller last)."""

    plan: LaunchPlan
    out: TextIO = sys.stdout
    children: list[Child] = field(default_factory=list)
    urls: dict[str, str] = field(default_factory=dict)
    _print_lock: threading.Lock = field(default_factory=threading.Lock)
    _pre_exec: Callable[[], None] | None = field(default_factory=lambda: die_with_parent_hook())

    def say(self, line: str) -> None:
        with self._print_lock:
            self.out.write(line if line.endswith("\n") else line + "\n")
            self.out.flush()

    def start(self, child: Child) -> None:
        child.started_at = time.monotonic()
        child.process = subprocess.Popen(
            child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, errors="replace", start_new_session=True,
            preexec_fn=self._pre_exec)  # noqa: PLW1509 - one system call, libc loaded before the fork
        child.pump = threading.Thread(target=self._pump, args=(child, child.process), daemon=True,
                                      name=f"log-{child.name}")
        child.pump.start()
        if child not in self.children:
            self.children.append(child)

    def _pump(self, child: Child, process: subprocess.Popen) -> None:
        for line in process.stdout:
            self.say(f"[{child.name}] {line}")

    def wait_ready(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for child in children:
            wait_until_ready(child.ready_url, max(1.0, deadline - time.monotonic()),
                             alive=lambda child=child: child.process.poll() is None, any_answer=child.any_answer)

    def stop(self) -> None:
        running = [c for c in reversed(self.children) if c.process is not None and c.process.poll() is None]
        for child in running:
            _signal(child.process, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in running:
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"[launcher] {child.name} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it")
                _signal(child.process, signal.SIGKILL)
                child.process.wait()
        for child in self.children:
            if child.pump is not None:
                child.pump.join(timeout=2)


def launch(plan: LaunchPlan, out: TextIO = sys.stdout, stop_event: threading.Event | None = None) -> int:
    """Start everything, print the URLs, supervise until `stop_event` (set on SIGINT/SIGTERM); 0 on a clean stop."""
    stop_event = stop_event or threading.Event()
    stack = Stack(plan, out)
    try:
        children = build_children(plan)
        controller, workers, web = children[0], children[1:1 + len(plan.devices)], children[1 + len(plan.devices):]
        stack.start(controller)
        stack.wait_ready([controller], plan.startup_timeout_s)
        for worker in workers:
            stack.start(worker)
        stack.wait_ready(workers, plan.startup_timeout_s)
        controller_url = controller.ready_url.rsplit("/", 1)[0]
        wait_until_ready(f"{controller_url}/ready", plan.startup_timeout_s,
                         alive=lambda: controller.process.poll() is None)
        for child in web:
            stack.start(child)
        stack.wait_ready(web, plan.startup_timeout_s)
    except (RuntimeError, TimeoutError, OSError) as exc:
        stack.say(f"[launcher] start-up failed: {exc}")
        stack.stop()
        return 1
    stack.say(summary(stack.children, plan))
    try:
        return supervise(stack, stop_event)
    finally:
        stack.say("[launcher] stopping")
        stack.stop()
        stack.say("[launcher] stopped")


def supervise(stack: Stack, stop_event: threading.Event) -> int:
    """Wait for a stop; restart workers that die; give up when the controller or web UI dies, or a worker crash-loops.

    A worker that served for a while before it died (killed for memory, a driver fault) is restarted
    every time; one that keeps dying soon after each start has a problem a restart will not fix.
    """
    while not stop_event.wait(0.5):
        for child in stack.children:
            code = child.process.poll()
            if code is None:
                continue
            if time.monotonic() - child.started_at >= STABLE_AFTER_S:
                child.restarts = 0
            if not child.name.startswith("worker") or child.restarts >= MAX_WORKER_RESTARTS:
                stack.say(f"[launcher] {child.name} exited with code {code}; stopping everything")
                return 1
            child.restarts += 1
            stack.say(f"[launcher] {child.name} exited with code {code}; restarting it "
                      f"({child.restarts}/{MAX_WORKER_RESTARTS} in a row)")
            stack.start(child)
    return 0


def build_children(plan: LaunchPlan) -> list[Child]:
    """Controller, then one worker per device, then the web UI; ports chosen now, URLs known to all."""
    python = [sys.executable, "-m", "omni_serve"]
    host = plan.host
    url_host = LOOPBACK if host in ("0.0.0.0", "::", "") else host
    base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    base_env.pop(TOKEN_ENV, None)
    if plan.token:
        base_env[TOKEN_ENV] = plan.token  # by environment, so the token never shows in `ps`
    controller_port = plan.controller_port or free_port(host)
    controller_url = f"http://{url_host}:{controller_port}"
    children = [Child("controller", python + [
        "controller", "--host", host, "--port", str(controller_port), "--dispatch", plan.dispatch,
        "--heartbeat-expiry", str(2 * plan.heartbeat_interval_s)], base_env, f"{controller_url}/health")]
    cpu_workers = sum(device is None for device in plan.devices)
    threads = max(1, available_cores() // max(1, cpu_workers))
    for index, device in enumerate(plan.devices):
        port = free_port(host)
        argv = python + ["worker", "--model-path", plan.model_path, "--dtype", plan.dtype,
                         "--host", host, "--port", str(port), "--worker-address", f"http://{url_host}:{port}",
                         "--controller-url", controller_url, "--heartbeat-interval", str(plan.heartbeat_interval_s)]
        for flag, value in (("--vocoder", plan.vocoder), ("--speech-encoder", plan.speech_encoder),
                            ("--limit-concurrency", plan.limit_concurrency), ("--max-batch-size", plan.max_batch_size)):
            if value is not None:
                argv += [flag, str(value)]
        env = dict(base_env)
        if device is None:
            argv += ["--device", "cpu", "--num-threads", str(threads)]
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            argv += ["--device", "cuda"]
            env["CUDA_VISIBLE_DEVICES"] = device
        children.append(Child(f"worker-{index}", argv + list(plan.extra_worker_args), env,
                              f"http://{url_host}:{port}/ready"))
    if plan.web_port is not None:
        port = plan.web_port or free_port(host)
        children.append(Child("web", python + ["web", "--controller-url", controller_url, "--host", host,
                                               "--port", str(port)], base_env, f"http://{url_host}:{port}/",
                              any_answer=True))
    return children


def summary(children: list[Child], plan: LaunchPlan) -> str:
    lines = ["", "omni_serve is up:"]
    for child in children:
        url = child.ready_url.rsplit("/", 1)[0] if not child.any_answer else child.ready_url.rstrip("/")
        where = ""
        if child.name.startswith("worker"):
            device = plan.devices[int(child.name.split("-")[1])]
            where = "  (cpu)" if device is None else f"  (GPU {device})"
        lines.append(f"  {child.name:<11} {url}{where}")
    if plan.token:
        lines.append(f"  token: set (clients send 'Authorization: Bearer <token>'; ${TOKEN_ENV})")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)


def resolve_devices(gpus: str, cpu_workers: int | None,
                    gpu_count: Callable[[], int] | None = None) -> tuple[str | None, ...]:
    """`--cpu-workers N` wins; else `--gpus 0,1` as given, or `auto`: every visible GPU, or one CPU worker."""
    if cpu_workers is not None:
        if cpu_workers < 1:
            raise ValueError("--cpu-workers must be at least 1")
        return (None,) * cpu_workers
    if gpus != "auto":
        ids = tuple(part.strip() for part in gpus.split(",") if part.strip())
        if not ids:
            raise ValueError("--gpus needs 'auto' or a list of GPU ids such as 0,1")
        return ids
    visible = visible_gpus() if gpu_count is None else [str(i) for i in range(gpu_count())]
    return tuple(visible) if visible else (None,)


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES when set, else what nvidia-smi lists."""
    declared = os.environ.get("CUDA_VISIBLE_DEVICES")
    if declared is not None:
        return [part.strip() for part in declared.split(",") if part.strip() and part.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(line for line in listing.splitlines() if line.startswith("GPU "))]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def free_port(host: str = LOOPBACK) -> int:
    """A port free right now (the OS picks it); the child binds it a moment later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("", "0.0.0.0") else LOOPBACK, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def _signal(process: subprocess.Popen, signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass


def die_with_parent_hook() -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send the child SIGTERM when the launcher dies, even by SIGKILL.

    libc is loaded here, in the parent: the hook itself only makes one system call between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
