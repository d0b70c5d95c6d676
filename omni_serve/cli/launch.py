"""Start the whole stack with one command: controller, one worker per GPU (or N CPU workers), web UI.

Examples:
  omni-serve launch --model-path checkpoints/Llama-3.1-8B-Omni --vocoder checkpoints/vocoder --web
  omni-serve launch --model-path DIR --cpu-workers 2 --controller-port 0      (0: any free port)

Everything listens on 127.0.0.1 unless --host says otherwise. Ctrl-C or SIGTERM stops every part.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from omni_serve.serve.settings import DEFAULT_CONTROLLER_PORT, HEARTBEAT_INTERVAL_S, LOOPBACK, TOKEN_ENV, resolve_token

HELP = "start controller, workers (one per GPU or N on CPU) and optionally the web UI"
DEFAULT_WEB_PORT = 7860


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.cli.infer import DTYPE_CHOICES, DTYPE_HELP

    parser.add_argument("--model-path", required=True, help="model folder in the published LLaMA-Omni layout")
    parser.add_argument("--vocoder", help="fairseq unit HiFi-GAN folder (config.json + g_XXXXXXXX)")
    parser.add_argument("--speech-encoder", help="Whisper checkpoint; overrides the config's speech_encoder")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    parser.add_argument("--gpus", default="auto", help="auto (every visible GPU; none: one CPU worker) or ids: 0,1")
    parser.add_argument("--cpu-workers", type=int, default=None, help="run N CPU workers instead of GPU workers")
    parser.add_argument("--host", default=LOOPBACK, help="address every part listens on (default loopback only)")
    parser.add_argument("--controller-port", type=int, default=None,
                        help=f"default {DEFAULT_CONTROLLER_PORT} when free, else any; 0: any free port")
    parser.add_argument("--web", action="store_true", help="also start the web UI")
    parser.add_argument("--web-port", type=int, default=None, help=f"default {DEFAULT_WEB_PORT} when free, else any")
    parser.add_argument("--token", default=None, help=f"shared token for workers and clients (default ${TOKEN_ENV})")
    parser.add_argument("--dispatch", choices=("shortest_queue", "lottery"), default="shortest_queue")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S,
                        help="worker heartbeat period; the controller forgets a worker after two missed")
    parser.add_argument("--limit-concurrency", type=int, default=None, help="per worker, before 503")
    parser.add_argument("--max-batch-size", type=int, default=None, help="per worker")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for each part")


def run(args: argparse.Namespace) -> int:
    from omni_serve.serve.launcher import (
        LaunchPlan,
        free_port,
        launch,
        port_is_free,
        resolve_devices,
    )

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll or probe
    try:
        devices = resolve_devices(args.gpus, args.cpu_workers)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def port(requested: int | None, preferred: int) -> int:
        if requested is None:
            return preferred if port_is_free(args.host, preferred) else free_port(args.host)
        if requested and not port_is_free(args.host, requested):
            raise OSError(f"port {requested} on {args.host} is in use")
        return requested or free_port(args.host)

    try:
        plan = LaunchPlan(
            model_path=args.model_path, vocoder=args.vocoder, speech_encoder=args.speech_encoder, dtype=args.dtype,
            devices=devices, host=args.host, controller_port=port(args.controller_port, DEFAULT_CONTROLLER_PORT),
            web_port=port(args.web_port, DEFAULT_WEB_PORT) if args.web else None, token=resolve_token(args.token),
            heartbeat_interval_s=args.heartbeat_interval, dispatch=args.dispatch,
            limit_concurrency=args.limit_concurrency, max_batch_size=args.max_batch_size,
            startup_timeout_s=args.startup_timeout)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return launch(plan, stop_event=stop)
