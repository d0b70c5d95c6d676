"""Run the controller alone: workers on this or other machines register with it, clients ask it for one.

By default it listens on 127.0.0.1 and accepts workers on loopback addresses only; for workers on other
machines, listen on a reachable address (--host) and allow their hosts (--allow-worker-hosts), and
set a token (--token or $OMNI_SERVE_TOKEN) that workers and clients must send.
"""

from __future__ import annotations

import argparse
import logging

from omni_serve.serve.settings import (
    DEFAULT_CONTROLLER_PORT,
    HEARTBEAT_EXPIRY_S,
    LOOPBACK,
    LOOPBACK_HOSTS,
    TOKEN_ENV,
    ControllerSettings,
    resolve_token,
)

HELP = "run the controller that registers workers and dispatches requests to them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=LOOPBACK, help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=DEFAULT_CONTROLLER_PORT)
    parser.add_argument("--dispatch", choices=("shortest_queue", "lottery"), default="shortest_queue")
    parser.add_argument("--heartbeat-expiry", type=float, default=HEARTBEAT_EXPIRY_S,
                        help="seconds without a heartbeat after which a worker is dropped")
    parser.add_argument("--allow-worker-hosts", default=",".join(LOOPBACK_HOSTS),
                        help="comma-separated networks, addresses or host names workers may register from")
    parser.add_argument("--token", default=None,
                        help=f"shared token workers and clients must send (default ${TOKEN_ENV})")
    parser.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    from omni_serve.serve.controller import create_app
    from omni_serve.serve.server import run_server

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness poll or probe
    allowed = tuple(part.strip() for part in args.allow_worker_hosts.split(",") if part.strip())
    settings = ControllerSettings(host=args.host, port=args.port, dispatch=args.dispatch,
                                  heartbeat_expiry_s=args.heartbeat_expiry, token=resolve_token(args.token),
                                  allowed_worker_hosts=allowed)
    run_server(create_app(settings), settings.host, settings.port, log_level=args.log_level)
    return 0
