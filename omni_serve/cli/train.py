"""Train a causal CTC speech decoder on data from `omni-serve make-data`; resumable, on CUDA when available."""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_serve.cli.training_options import add_run_arguments, run_fields, train_and_report

HELP = "train a CTC speech decoder on make-data output (resumable)"
# the decoder's shape options: (flag, TrainConfig field, help prefix); unset, they follow --init-from
SHAPE_OPTIONS = (("--layers", "layers", ""), ("--hidden", "hidden", ""), ("--heads", "heads", ""), ("--ffn", "ffn", ""),
                 ("--upsample", "upsample_factor", "lambda, positions per token; "))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.ctc_train import TrainConfig

    defaults = TrainConfig()
    parser.add_argument("--data", required=True, nargs="+", help="files written by make-data (joined)")
    parser.add_argument("--out", required=True, help="run folder: checkpoint, log.jsonl, exported decoder")
    for flag, field, extra in SHAPE_OPTIONS:
        parser.add_argument(flag, type=int, default=None,
                            help=f"{extra}default: the --init-from decoder's, else {getattr(defaults, field)}")
    parser.add_argument("--hidden-only", action="store_true", help="no token embedding beside the hidden state")
    parser.add_argument("--spelling", type=int, default=defaults.token_spelling,
                        help="characters of each chosen token the decoder reads (0: none; needs --model-path)")
    parser.add_argument("--spelling-context", type=int, nargs=2, metavar=("BEFORE", "AFTER"),
                        default=(defaults.spelling_before, defaults.spelling_after),
                        help="also read the spelling of this many tokens before and after each token "
                             "(streaming then holds AFTER tokens back)")
    parser.add_argument("--number-places", action="store_true",
                        help="spell each digit by its place in its number (the 1 of 149 as 100; streaming "
                             "then holds a number's digits back until it ends)")
    parser.add_argument("--init-from", default=None,
                        help="start a new run from another run's decoder: its folder's checkpoint, or an exported "
                             "decoder such as checkpoints/omni-smol (same shape; the spelling context may grow)")
    parser.add_argument("--model-path", default=None, help="model folder that made the data (its tokenizer spells tokens)")
    add_run_arguments(parser, defaults, threads=1,
                      threads_help="CPU threads (1 by default: on a shared 2-core machine 2 threads ran 20x slower)")


def decoder_shape(args: argparse.Namespace) -> dict[str, int]:
    """The shape options given; those not given from the --init-from decoder (so that fine-tuning a
    decoder of another shape than the defaults, such as the shipped one, needs no shape flags), else
    the defaults."""
    from omni_serve.default.ctc_train import saved_decoder

    given = {field: getattr(args, flag[2:]) for flag, field, _ in SHAPE_OPTIONS}
    if args.init_from and None in given.values():
        try:
            inherited = saved_decoder(Path(args.init_from))[1]
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--init-from: {exc}") from exc
        given = {field: inherited[field] if value is None else value for field, value in given.items()}
    return {field: value for field, value in given.items() if value is not None}


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.ctc_data import CTCData
    from omni_serve.default.ctc_train import TrainConfig, Trainer
    from omni_serve.model.loader import load_tokenizer

    config = TrainConfig(**decoder_shape(args), token_embedding=not args.hidden_only,
                         token_spelling=args.spelling, spelling_before=args.spelling_context[0],
                         spelling_after=args.spelling_context[1], number_places=args.number_places,
                         **run_fields(args))
    if args.spelling and not args.model_path:
        raise SystemExit("--spelling needs --model-path: the model folder whose tokenizer made the data")
    if (any(args.spelling_context) or args.number_places) and not args.spelling:
        raise SystemExit("--spelling-context and --number-places need --spelling")
    if min(args.spelling_context) < 0:
        raise SystemExit("--spelling-context takes two counts of tokens, 0 or more")
    data = CTCData.load_all([Path(path) for path in args.data])
    tokenizer = load_tokenizer(Path(args.model_path)) if args.model_path else None
    trainer = Trainer.resume_or_new(data, Path(args.out), config, args.resume, args.device, tokenizer)
    if args.init_from and trainer.step == 0:  # a resumed run already holds its own weights
        try:
            trainer.warm_start(Path(args.init_from))
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--init-from: {exc}") from exc
    return train_and_report(trainer, args)
