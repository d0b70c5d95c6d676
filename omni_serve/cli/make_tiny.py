"""Write a random model folder in the published layout (config, safetensors, tokenizer, Whisper file, vocoder).

`--shape tiny` is a complete, loadable model for tests; `--shape 8b` writes the published shapes'
config (weights are made in memory by the benchmarks) for planning memory and latency on a GPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_serve.model.tiny import make_model_folder

HELP = "write a random model folder for tests or GPU planning"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    folder = make_model_folder(Path(args.out), args.shape, args.seed)
    print(f"wrote {args.shape} model folder to {folder}")
    return 0
