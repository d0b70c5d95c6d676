"""Adapt Whisper tiny.en to espeak-ng voices: train LoRA updates of its text decoder on make-transcriber-data
output (resumable, on CUDA when available); the exported updates go into checkpoints/omni-smol/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_serve.cli.training_options import add_run_arguments, run_fields, train_and_report

HELP = "train the Whisper adaptation (decoder LoRA) on make-transcriber-data output (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.transcriber_train import TranscriberTrainConfig

    defaults = TranscriberTrainConfig()
    parser.add_argument("--data", required=True, help="folder written by make-transcriber-data")
    parser.add_argument("--exclude", help="JSON list of {question, key}: clips whose text has them are left out")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, exported updates")
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    add_run_arguments(parser, defaults, threads=2, threads_help="CPU threads")


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.build import convert_base_whisper
    from omni_serve.default.transcriber_data import Exclusions, TranscriberData
    from omni_serve.default.transcriber_train import TranscriberTrainConfig, TranscriberTrainer

    config = TranscriberTrainConfig(rank=args.rank, alpha=args.alpha, **run_fields(args))
    data = TranscriberData.load(Path(args.data), Exclusions.from_file(Path(args.exclude)) if args.exclude else Exclusions())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = TranscriberTrainer.resume_or_new(data, convert_base_whisper(Path(scratch)), Path(args.out), config,
                                                   args.resume, args.device)
    return train_and_report(trainer, args)
