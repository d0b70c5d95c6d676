"""Train a causal CTC speech decoder on data from `omni-serve make-data`; resumable, on CUDA when available."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train a CTC speech decoder on make-data output (resumable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.ctc_train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", required=True, help="file written by make-data")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, exported decoder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total steps (a resumed run counts on)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--ffn", type=int, default=defaults.ffn)
    parser.add_argument("--upsample", type=int, default=defaults.upsample_factor, help="lambda: positions per token")
    parser.add_argument("--hidden-only", action="store_true", help="no token embedding beside the hidden state")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 by default: on a shared 2-core machine 2 threads ran 20x slower)")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.ctc_data import CTCData
    from omni_serve.default.ctc_train import TrainConfig, Trainer

    config = TrainConfig(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                         upsample_factor=args.upsample, token_embedding=not args.hidden_only,
                         learning_rate=args.lr, batch_size=args.batch_size, steps=args.steps,
                         checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, seed=args.seed,
                         autocast=not args.no_autocast)
    trainer = Trainer.resume_or_new(CTCData.load(Path(args.data)), Path(args.out), config, args.resume, args.device)
    result = trainer.run(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return 0
