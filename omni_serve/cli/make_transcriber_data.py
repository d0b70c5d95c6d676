"""Write training data for adapting Whisper to espeak-ng voices: texts spoken by training voices (plus clips
without speech), kept as Whisper encoder outputs in shards. The benchmark's held-out questions and their key
words are left out when `--exclude` names them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "write spoken-text data (Whisper encoder outputs) for adapting Whisper to espeak voices"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from omni_serve.default.transcriber_data import TextOptions

    defaults = TextOptions()
    parser.add_argument("--out", required=True, help="folder for the shards")
    parser.add_argument("--model-path", help="built omni-smol folder: its LLM picks the everyday words")
    parser.add_argument("--exclude", help="JSON list of {question, key}: texts with them are left out")
    parser.add_argument("--sentences", type=int, default=defaults.sentences, help="standard-library docstring sentences")
    parser.add_argument("--questions", type=int, default=defaults.template_questions,
                        help="template questions over docstring words")
    parser.add_argument("--everyday-questions", type=int, default=defaults.everyday_questions,
                        help="template questions over everyday words (needs --model-path)")
    parser.add_argument("--non-speech", type=int, default=defaults.non_speech, help="clips without speech")
    parser.add_argument("--workers", type=int, default=2, help="processes (one CPU thread each)")
    parser.add_argument("--seed", type=int, default=defaults.seed)


def load_everyday_words(model_path: str | None, patterns: tuple[str, ...] | None = None,
                        pieces: tuple[int, ...] = (1,)) -> list[str]:
    """Everyday words (and, with `patterns`, other kinds of whole words) of the built model's LLM, written
    by it in one of `pieces` tokens."""
    import torch
    import whisper
    from transformers import AutoTokenizer, LlamaForCausalLM

    from omni_serve.default.transcriber_data import EVERYDAY_WORD, everyday_words

    if not model_path:
        raise SystemExit("--everyday-questions needs --model-path (a built omni-smol folder)")
    llm = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer, whisper_tokenizer = AutoTokenizer.from_pretrained(model_path), whisper.tokenizer.get_tokenizer(False)
    return [word for pattern in patterns or (EVERYDAY_WORD,)
            for word in everyday_words(llm, tokenizer, whisper_tokenizer, pattern=pattern, pieces=pieces)]


def run(args: argparse.Namespace) -> int:
    import tempfile

    from omni_serve.default.build import convert_base_whisper
    from omni_serve.default.transcriber_data import Exclusions, TextOptions, training_texts, write_shards

    began = time.perf_counter()
    options = TextOptions(sentences=args.sentences, template_questions=args.questions,
                          everyday_questions=args.everyday_questions, non_speech=args.non_speech, seed=args.seed)
    exclusions = Exclusions.from_file(Path(args.exclude)) if args.exclude else Exclusions()
    texts = training_texts(options, exclusions, load_everyday_words(args.model_path) if args.everyday_questions else None)
    with tempfile.TemporaryDirectory() as scratch:
        whisper_path = convert_base_whisper(Path(scratch))
        paths = write_shards(texts, options.non_speech, Path(args.out), whisper_path, args.workers, args.seed)
    print(f"wrote {len(texts)} spoken texts and {options.non_speech} clips without speech in {len(paths)} shards "
          f"to {args.out} in {time.perf_counter() - began:.0f} s")
    return 0
