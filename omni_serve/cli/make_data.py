"""Write training data for a learned CTC unit generator: teacher-forced LLM hidden states, chosen tokens
and espeak-ng unit targets of English texts (files, standard-library docstrings, the LLM's greedy answers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "write hidden-state / unit data for training a CTC speech decoder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", required=True, help="model folder whose LLM makes the hidden states")
    parser.add_argument("--out", required=True, help="safetensors file to write")
    parser.add_argument("--texts", nargs="*", default=[], help="text files; blank-line-separated paragraphs")
    parser.add_argument("--doc-texts", type=int, default=0, help="paragraphs of Python standard-library docstrings")
    parser.add_argument("--answers", type=int, default=0, help="greedy answers of the LLM to built-in questions")
    parser.add_argument("--vocabulary", type=int, default=0, metavar="PER_WORD",
                        help="sentences holding each everyday word and name of the LLM's vocabulary this many times")
    parser.add_argument("--word-answers", type=int, default=0,
                        help="greedy answers of the LLM to questions about this many everyday words")
    parser.add_argument("--word-pieces", type=int, nargs="+", default=[1], metavar="N",
                        help="the vocabulary's words are those the LLM writes in N tokens (1: its whole-word tokens; "
                        "2 3: longer, rarer words it spells in parts)")
    parser.add_argument("--numbers", type=int, default=0, help="sentences that read numbers (digits, decimals, years...); "
                        "for a decoder trained with --number-places")
    parser.add_argument("--seed", type=int, default=1,
                        help="shuffle of the vocabulary and number sentences and of the word questions (another seed: others)")
    parser.add_argument("--exclude", type=Path, help="JSON of held-out questions whose key words no text may hold")
    parser.add_argument("--max-tokens", type=int, default=64, help="longest text, in tokens (cut at a word)")
    parser.add_argument("--answer-tokens", type=int, default=64, help="longest greedy answer, in tokens")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1 by default: on a shared 2-core machine 2 threads ran 20x slower)")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from omni_serve.default.ctc_data import (
        DataOptions,
        HiddenStateCapture,
        docstring_texts,
        number_texts,
        read_text_files,
        save_samples,
        vocabulary_texts,
        word_questions,
    )
    from omni_serve.default.transcriber_data import Exclusions
    from omni_serve.model.loader import load_model

    began = time.perf_counter()
    model = load_model(args.model_path, device=args.device)
    options = DataOptions(max_tokens=args.max_tokens, answers=args.answers, answer_tokens=args.answer_tokens,
                          doc_texts=args.doc_texts)
    texts = read_text_files([Path(p) for p in args.texts]) + docstring_texts(args.doc_texts)
    exclusions = Exclusions.from_file(args.exclude) if args.exclude else Exclusions()
    questions: list[str] = []
    if args.vocabulary or args.word_answers:
        from omni_serve.cli.make_transcriber_data import load_everyday_words
        from omni_serve.default.transcriber_data import EVERYDAY_WORD, NAME

        words = load_everyday_words(args.model_path, (EVERYDAY_WORD, NAME), tuple(args.word_pieces))
        texts += [text for text in vocabulary_texts(words, args.vocabulary, seed=args.seed) if exclusions.allows(text)]
        questions = [q for q in word_questions(words, args.word_answers, seed=args.seed) if exclusions.allows(q)]
        print(f"vocabulary: {len(words)} words")
    texts += [text for text in number_texts(args.numbers, seed=args.seed) if exclusions.allows(text)]
    samples = HiddenStateCapture(model, options).collect(texts, questions, exclusions.allows)
    save_samples(samples, Path(args.out), model)
    tokens = sum(len(s.token_ids) for s in samples)
    units = sum(len(s.units) for s in samples)
    print(f"wrote {len(samples)} samples ({tokens} tokens, {units} units) to {args.out} "
          f"in {time.perf_counter() - began:.0f} s")
    return 0
