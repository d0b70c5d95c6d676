"""`omni-serve` command line: one subcommand per task, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = {
    "infer": "omni_serve.cli.infer",
    "make-tiny": "omni_serve.cli.make_tiny",
    "build-default": "omni_serve.cli.build_default",
    "demo": "omni_serve.cli.demo",
    "web": "omni_serve.cli.web",
    "launch": "omni_serve.cli.launch",
    "controller": "omni_serve.cli.controller",
    "worker": "omni_serve.cli.worker",
    "make-data": "omni_serve.cli.make_data",
    "train": "omni_serve.cli.train",
    "average-decoders": "omni_serve.cli.average_decoders",
    "make-transcriber-data": "omni_serve.cli.make_transcriber_data",
    "train-transcriber": "omni_serve.cli.train_transcriber",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni-serve", description="Serve LLaMA-Omni-style speech language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Import only the command being run (a controller or web process then never imports torch); all for --help.
    chosen = [argv[0]] if argv and argv[0] in SUBCOMMANDS else list(SUBCOMMANDS)
    for name in chosen:
        module_name = SUBCOMMANDS[name]
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
