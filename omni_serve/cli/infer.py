"""Answer audio files offline: for each input X, write OUT/X.json (text, token_ids, units, timings) and OUT/X.wav.

Inputs are audio files, or JSONL manifests (`.jsonl`, one {"audio": PATH, "id": NAME} per line).
All inputs are submitted at once so the engine decodes them as one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

import numpy as np
import soundfile

from omni_serve.engine import (
    AudioChunk,
    Engine,
    ErrorEvent,
    Finished,
    GenerationOptions,
    OmniError,
    SpeechRequest,
    load_audio,
)
from omni_serve.model.loader import DTYPES

HELP = "answer audio files offline and write text, units and speech"
DTYPE_CHOICES = ("auto", *DTYPES)
DTYPE_HELP = ("auto: bf16 (else fp16) on CUDA; on CPU fp32, or the model's config.json `cpu_dtype` (omni-smol: "
              "bfloat16) where the CPU has native bf16 (AVX512-BF16 or AMX)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every command that loads a model shares."""
    parser.add_argument("--model-path", required=True, help="model folder in the published LLaMA-Omni layout")
    parser.add_argument("--vocoder", help="fairseq unit HiFi-GAN folder (config.json + g_XXXXXXXX)")
    parser.add_argument("--speech-encoder", help="Whisper checkpoint; overrides the config's speech_encoder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--output-dir", default="omni_out", help="where X.json and X.wav go")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0,
                        help="-2 to 2: lowers a token's logit by this much per earlier use in the answer "
                             "(against loops)")
    parser.add_argument("--presence-penalty", type=float, default=0.0,
                        help="-2 to 2: lowers the logit of any token already in the answer by this much")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("inputs", nargs="+", help="audio files or .jsonl manifests")


def expand_inputs(inputs: list[str]) -> list[tuple[str, Path]]:
    """(output name, audio path) for each input; manifest paths are relative to the manifest."""
    items = []
    for entry in inputs:
        path = Path(entry)
        if path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    record = json.loads(line)
                    audio = (path.parent / record["audio"]).resolve()
                    items.append((str(record.get("id", audio.stem)), audio))
        else:
            items.append((path.stem, path))
    return items


def run(args: argparse.Namespace) -> int:
    try:
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, frequency_penalty=args.frequency_penalty,
                                    presence_penalty=args.presence_penalty, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        engine = Engine.from_path(args.model_path, args.vocoder, args.speech_encoder, args.device, args.dtype)
    except OmniError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    pending = []
    for name, audio_path in expand_inputs(args.inputs):
        try:
            audio = load_audio(audio_path)
        except (OmniError, OSError) as exc:
            failures += 1
            print(f"error: {audio_path}: {exc}", file=sys.stderr)
            continue
        collected: list = []
        done = threading.Event()

        def emit(event, collected=collected, done=done):
            collected.append(event)
            if isinstance(event, (Finished, ErrorEvent)):
                done.set()

        engine.submit(SpeechRequest(audio, options), emit)
        pending.append((name, audio_path, collected, done))
    for name, audio_path, collected, done in pending:
        done.wait()
        final = collected[-1]
        if isinstance(final, ErrorEvent):
            failures += 1
            print(f"error: {audio_path}: {final.message}", file=sys.stderr)
            continue
        write_result(out_dir, name, final, [e for e in collected if isinstance(e, AudioChunk)])
        print(f"{audio_path} -> {out_dir / name}.json: {final.text!r}")
    engine.close()
    return 1 if failures else 0


def write_result(out_dir: Path, name: str, final: Finished, audio: list[AudioChunk]) -> None:
    record = {"text": final.text, "token_ids": final.token_ids, "units": final.units,
              "stopped_on_eos": final.stopped_on_eos, "timings": final.timings.as_dict()}
    (out_dir / f"{name}.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))
    if audio:
        samples = np.concatenate([chunk.samples for chunk in audio])
        soundfile.write(out_dir / f"{name}.wav", samples, audio[0].sample_rate, subtype="FLOAT")
