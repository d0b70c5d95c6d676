"""Start the web page: speak to a model served by a running controller and its workers.

The page loads no model; it asks the controller at --controller-url for workers and streams from them.
`omni-serve launch ... --web` runs this command for you.
"""

from __future__ import annotations

import argparse

HELP = "start the Gradio web page in front of a running controller"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.serve.web import DEFAULT_CONTROLLER_URL, DEFAULT_WEB_PORT

    parser.add_argument("--controller-url", default=DEFAULT_CONTROLLER_URL, help="the controller's base URL")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to share on a network)")
    parser.add_argument("--port", type=int, default=DEFAULT_WEB_PORT)
    parser.add_argument("--token", default=None,
                        help="the serving token sent to the controller and workers (default $OMNI_SERVE_TOKEN)")
    parser.add_argument("--player", choices=("live", "gradio"), default="live",
                        help="live: Web Audio player that starts with the first chunk (default); "
                             "gradio: Gradio's HLS streaming player (starts about a second later)")


def run(args: argparse.Namespace) -> int:
    import logging

    from omni_serve.serve.settings import resolve_token
    from omni_serve.serve.web import WebSettings, serve

    settings = WebSettings(controller_url=args.controller_url, host=args.host, port=args.port,
                           token=resolve_token(args.token), player=args.player)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request to the controller and workers
    serve(settings)
    return 0
