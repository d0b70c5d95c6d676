"""Runnable entry of the web page: `python demo/app.py` opens it in front of a running controller.

    python demo/app.py --controller-url http://127.0.0.1:21001          # a stack you started already
    python demo/app.py --model-path DIR [--vocoder DIR]                  # start controller + CPU worker + page

The first form is `omni-serve web`; the second is `omni-serve launch --cpu-workers 1 --web`, which
starts the page itself. The page never loads a model either way.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from omni_serve.cli import main as omni_serve

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller-url", default="http://127.0.0.1:21001")
    parser.add_argument("--model-path", help="start a whole local stack on this model instead")
    parser.add_argument("--vocoder", help="vocoder folder for --model-path")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--player", choices=("live", "gradio"), default="live")
    args = parser.parse_args(argv)
    if args.model_path:
        command = ["launch", "--model-path", args.model_path, "--cpu-workers", "1", "--web",
                   "--web-port", str(args.port)]
        return omni_serve(command + (["--vocoder", args.vocoder] if args.vocoder else []))
    return omni_serve(["web", "--controller-url", args.controller_url, "--port", str(args.port),
                       "--player", args.player])


if __name__ == "__main__":
    sys.exit(main())
