"""Run one model worker: load the model once, serve it over HTTP, register with a controller.

On a multi-GPU machine run one worker per GPU, each pinned with CUDA_VISIBLE_DEVICES (`omni-serve launch`
does this for you). For a worker on another machine than the controller, give the address the controller
should call (--worker-address) and listen on a reachable interface (--host).
"""

from __future__ import annotations

import argparse
import logging
import sys

from omni_serve.serve.settings import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_WORKER_PORT,
    HEARTBEAT_INTERVAL_S,
    LOOPBACK,
    TOKEN_ENV,
    MiB,
    WorkerSettings,
    resolve_token,
)

HELP = "run a model worker that serves one model over HTTP"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.cli.infer import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_WORKER_PORT)
    parser.add_argument("--worker-address", default=None, help="URL the controller calls (default http://HOST:PORT)")
    parser.add_argument("--controller-url", default=f"http://{LOOPBACK}:{DEFAULT_CONTROLLER_PORT}")
    parser.add_argument("--no-register", action="store_true", help="serve without a controller")
    parser.add_argument("--model-name", default=None, help="name to advertise (default the model folder's)")
    parser.add_argument("--token", default=None, help=f"shared token (default ${TOKEN_ENV})")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_INTERVAL_S)
    parser.add_argument("--limit-concurrency", type=int, default=None,
                        help="requests streaming at once before 503 (default 2 x --max-batch-size)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-audio-seconds", type=float, default=120.0)
    parser.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body accepted")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (launch divides the cores)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="report ready right after loading; the first request then pays the one-off costs")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    import torch

    from omni_serve.engine import AudioLimits, Engine, OmniError, warm_up
    from omni_serve.serve.server import run_server
    from omni_serve.serve.worker import create_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per heartbeat
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    settings = WorkerSettings(
        host=args.host, port=args.port, worker_address=args.worker_address,
        controller_url=None if args.no_register else args.controller_url, model_name=args.model_name,
        token=resolve_token(args.token), heartbeat_interval_s=args.heartbeat_interval,
        limit_concurrency=args.limit_concurrency or 2 * args.max_batch_size,
        max_body_bytes=int(args.max_body_mb * MiB), max_audio_seconds=args.max_audio_seconds)
    try:
        engine = Engine.from_path(args.model_path, args.vocoder, args.speech_encoder, args.device, args.dtype,
                                  max_batch_size=args.max_batch_size,
                                  audio_limits=AudioLimits(max_seconds=args.max_audio_seconds))
    except OmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"loaded {engine.model_name} on {engine.placement}", file=sys.stderr, flush=True)
    if not args.no_warm_up:
        report = warm_up(engine)
        refused = "; ".join(f"{kind} request failed: {error}" for kind, error in
                            (("typed", report.text_error), ("spoken", report.speech_error)) if error)
        print(f"warmed up in {report.seconds:.1f} s" + (f" ({refused})" if refused else ""), file=sys.stderr,
              flush=True)
    try:
        run_server(create_app(settings, engine), settings.host, settings.port, log_level=args.log_level)
    finally:
        engine.close()
    return 0
