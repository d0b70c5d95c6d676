"""Train a causal CTC speech decoder on data from `omni-serve make-data`; resumable, on CUDA when available."""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_serve.cli.training_options import add_run_arguments, run_fields, train_and_report

HELP = "train a CTC speech decoder on make-data output (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.ctc_train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", required=True, nargs="+", help="files written by make-data (joined)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, exported decoder")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--ffn", type=int, default=defaults.ffn)
    parser.add_argument("--upsample", type=int, default=defaults.upsample_factor, help="lambda: positions per token")
    parser.add_argument("--hidden-only", action="store_true", help="no token embedding beside the hidden state")
    add_run_arguments(parser, defaults, threads=1,
                      threads_help="CPU threads (1 by default: on a shared 2-core machine 2 threads ran 20x slower)")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.ctc_data import CTCData
    from omni_serve.default.ctc_train import TrainConfig, Trainer

    config = TrainConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                         upsample_factor=args.upsample, token_embedding=not args.hidden_only, **run_fields(args))
    trainer = Trainer.resume_or_new(CTCData.load_all([Path(path) for path in args.data]), Path(args.out), config, args.resume, args.device)
    return train_and_report(trainer, args)
