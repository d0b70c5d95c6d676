"""Average the weights of CTC decoder runs that continue one another (same shape) into one exported decoder."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "average trained CTC decoders of one shape into one (weight averaging)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="run folders of `omni-serve train` (or exported decoders), two or more")
    parser.add_argument("--out", required=True, help="folder for the averaged ctc_decoder.safetensors and .json")


def run(args: argparse.Namespace) -> int:
    from omni_serve.default.decoder_average import average_decoders

    try:
        record = average_decoders([Path(run) for run in args.runs], Path(args.out))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"average-decoders: {exc}") from exc
    runs = ", ".join(f"{item['run']} (step {item['step']})" for item in record["averaged_from"])
    print(f"averaged {runs} into {args.out}")
    return 0
