"""Adapt Whisper tiny.en to espeak-ng voices: train LoRA updates of its text decoder on make-transcriber-data
output (resumable, on CUDA when available); the exported updates go into checkpoints/omni-smol/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train the Whisper adaptation (decoder LoRA) on make-transcriber-data output (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.transcriber_train import TranscriberTrainConfig

    defaults = TranscriberTrainConfig()
    parser.add_argument("--data", required=True, help="folder written by make-transcriber-data")
    parser.add_argument("--exclude", help="JSON list of {question, key}: clips whose text has them are left out")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, exported updates")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total steps (a resumed run counts on)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=float, default=defaults.alpha)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.build import convert_base_whisper
    from omni_serve.default.transcriber_data import Exclusions, TranscriberData
    from omni_serve.default.transcriber_train import TranscriberTrainConfig, TranscriberTrainer

    config = TranscriberTrainConfig(rank=args.rank, alpha=args.alpha, learning_rate=args.lr,
                                    batch_size=args.batch_size, steps=args.steps,
                                    checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                                    seed=args.seed, autocast=not args.no_autocast)
    data = TranscriberData.load(Path(args.data), Exclusions.from_file(Path(args.exclude)) if args.exclude else Exclusions())
    with tempfile.TemporaryDirectory() as scratch:
        trainer = TranscriberTrainer.resume_or_new(data, convert_base_whisper(Path(scratch)), Path(args.out), config,
                                                   args.resume, args.device)
    result = trainer.run(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return 0
