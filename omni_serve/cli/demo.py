"""Build the embedded default model if needed, then start controller + one CPU worker + web page.

This is what `make demo` runs: `omni-serve build-default` followed by
`omni-serve launch --model-path <built folder> --cpu-workers 1 --web`. Arguments after `--` go to
`launch` unchanged (for example `-- --web-port 8000`).
"""

from __future__ import annotations

import argparse
import os
import sys

HELP = "build the default model (once) and launch controller, CPU worker and web UI"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="serve this model folder instead of the built default")
    parser.add_argument("launch_args", nargs=argparse.REMAINDER, help="passed to `omni-serve launch` (after --)")


def launch_command(model_path: str, extra: list[str]) -> list[str]:
    extra = extra[1:] if extra[:1] == ["--"] else extra
    return [sys.executable, "-m", "omni_serve", "launch", "--model-path", model_path, "--cpu-workers", "1", "--web",
            *extra]


def run(args: argparse.Namespace) -> int:
    from omni_serve.default import build_default

    model_path = args.model_path or str(build_default())
    command = launch_command(model_path, args.launch_args)
    print("starting:", " ".join(command[1:]), flush=True)
    os.execv(command[0], command)  # launch prints the web page's URL and owns the terminal from here
    return 0
