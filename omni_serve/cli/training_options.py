"""The options and the ending both training commands share (`train`, `train-transcriber`): steps, resume,
optimisation, schedule of evaluations and checkpoints, time limit, device and threads."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports torch only when a command runs
    from omni_serve.default.training_run import RunSettings


def add_run_arguments(parser: argparse.ArgumentParser, defaults: RunSettings, threads: int, threads_help: str) -> None:
    """`defaults`: the trainer's config dataclass, whose values become the options' defaults."""
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total steps (a resumed run counts on)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="steps of linear warm-up to --lr (a run from scratch at a large batch wants more)")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and checkpoint) after this long")
    parser.add_argument("--no-autocast", action="store_true", help="train in float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--seed", type=int, default=defaults.seed)


def run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the shared options set."""
    return {"learning_rate": args.lr, "warmup_steps": args.warmup_steps, "batch_size": args.batch_size,
            "steps": args.steps, "checkpoint_every": args.checkpoint_every, "eval_every": args.eval_every, "seed": args.seed,
            "autocast": not args.no_autocast}


def train_and_report(trainer: Any, args: argparse.Namespace) -> int:
    """Run the trainer within --max-minutes and print its last evaluation."""
    result = trainer.run(max_seconds=args.max_minutes * 60 if args.max_minutes else None)
    print(f"step {trainer.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return 0
