"""How well omni-smol's transcription front end hears espeak-ng questions, by Whisper adaptation strength.

The default's understanding is bounded by what Whisper hears, and its decoding settings (beam, LLM
rescoring, how much of the trained adaptation is merged) were chosen here, on questions and voices
kept apart from `bench/quality.py`'s held-out set, so that the quality benchmark stays untuned:
- dev: 22 everyday questions;
- unseen words: 30 questions whose content words no text of the adaptation's training data holds
  ("What is a volcano?"), which shows whether the adaptation generalises beyond its vocabulary;
each spoken by three espeak-ng voices that no training used (`en-us+m3`@145, `en-us+f4`@150,
`en+m1`@150). Per strength (0 = Whisper tiny.en as shipped, 1 = the whole trained update): exact
transcripts (the typed question, capitals and mark included), word error rate, and seconds per
transcription (beam 10 with LLM rescoring, as served). Also per strength, the no-speech rule the
default serves with: how many of 4 clips without speech (white noise, a hum, silence) are refused,
and the highest no-speech probability among the dev questions spoken quietly (peak 0.1), which must
stay below the rule's threshold. And, since no training used people's voices: on the four recordings
of people speaking that Gradio ships (`gradio/media_assets/audio`, film lines), how many words of each
strength's transcript differ from Whisper as shipped (trained on people's speech, so the reference here).

    python bench/transcription.py [--quick] [--json] [--strengths 0,0.5,1]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import emit_json, machine_note, median, parse_args, print_table

import numpy as np
import torch
import whisper
from quality import espeak, words

from omni_serve.default.build import CHECKPOINT_DIR, WHISPER_ADAPTATION_STRENGTH, build_default, convert_base_whisper
from omni_serve.default.ctc_train import edit_distance
from omni_serve.default.whisper_lora import merge_lora
from omni_serve.model.audio import load_audio
from omni_serve.model.errors import AudioError
from omni_serve.model.loader import load_model
from omni_serve.model.speech_encoder import load_whisper_checkpoint, log_mel_windows

# Kept apart from bench/heldout_questions.json (a test checks), and spoken by voices no training used.
DEV_FILE = Path(__file__).with_name("transcription_dev.json")
DEV_SETS = json.loads(DEV_FILE.read_text())
VOICES = [(voice["name"], voice["speed"]) for voice in DEV_SETS["voices"]]
QUICK_QUESTIONS = 6
QUIET_PEAK = 0.1


def non_speech_clips() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(48_000, dtype=np.float32) / 16_000
    return {"white noise 0.05": rng.normal(0, 0.05, 48_000).astype(np.float32),
            "white noise 0.2": rng.normal(0, 0.2, 64_000).astype(np.float32),
            "hum 50 Hz": (0.3 * sum(np.sin(2 * np.pi * 50 * h * t) / h for h in range(1, 5))).astype(np.float32),
            "silence": np.zeros(32_000, dtype=np.float32)}


def human_recordings() -> dict[str, np.ndarray]:
    """Recordings of people that the gradio package ships (empty if a Gradio release drops them)."""
    import gradio

    folder = Path(gradio.__file__).parent / "media_assets" / "audio"
    names = ("cate_blanch.mp3", "cate_blanch_2.mp3", "heath_ledger.mp3", "recording1.wav")
    return {name: load_audio(folder / name) for name in names if (folder / name).is_file()}


def strength_state(shipped: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    return {key: value.float() for key, value in merge_lora(shipped, CHECKPOINT_DIR, strength).items()}


def transcript(front_end, audio: np.ndarray) -> str:
    try:
        return front_end.transcribe(audio)
    except AudioError:
        return ""


def measure(front_end, sets: dict[str, list[tuple[str, np.ndarray]]], quiet: list[np.ndarray],
            people: dict[str, np.ndarray]) -> dict:
    figures: dict = {"people": {name: transcript(front_end, audio) for name, audio in people.items()}}
    for name, items in sets.items():
        exact, errors, total, seconds = 0, 0, 0, []
        for question, audio in items:
            began = time.perf_counter()
            heard = transcript(front_end, audio)
            seconds.append(time.perf_counter() - began)
            exact += heard == question
            errors += edit_distance(words(question), words(heard))
            total += len(words(question))
        figures[name] = {"exact": exact, "utterances": len(items), "wer": errors / total,
                         "median_s": median(seconds)}
    refused = 0
    for clip in non_speech_clips().values():
        try:
            front_end.transcribe(clip)
        except AudioError:
            refused += 1
    figures["non_speech_refused"] = refused
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    figures["quiet_speech_max_no_speech_prob"] = max(
        whisper.decode(front_end.model, log_mel_windows(clip, 80)[:1], options)[0].no_speech_prob for clip in quiet)
    return figures


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda parser: parser.add_argument(
        "--strengths", default=f"0,0.3,{WHISPER_ADAPTATION_STRENGTH},0.7,1",
        help="merge strengths of the Whisper adaptation to compare, comma-separated"))
    strengths = sorted({0.0} | {float(value) for value in args.strengths.split(",")})  # 0: the people's reference
    model = load_model(build_default(progress=not args.json))
    front_end = model.front_end
    with tempfile.TemporaryDirectory() as scratch:
        _, shipped = load_whisper_checkpoint(convert_base_whisper(Path(scratch)))
    count = QUICK_QUESTIONS if args.quick else None
    voices = VOICES[:1] if args.quick else VOICES
    sets = {name: [(question, espeak(question, voice, speed)) for voice, speed in voices for question in questions[:count]]
            for name, questions in (("dev", DEV_SETS["dev"]), ("unseen_words", DEV_SETS["unseen_words"]))}
    people = human_recordings()
    quiet = [audio * (QUIET_PEAK / max(1e-6, float(np.abs(audio).max()))) for _, audio in sets["dev"]]
    front_end.transcribe(sets["dev"][0][1])  # warm-up
    results = {}
    for strength in strengths:
        front_end.model.load_state_dict(strength_state(shipped, strength))
        results[strength] = measure(front_end, sets, quiet, people)
    reference = results[0.0]["people"]
    for figures in results.values():
        figures["people_words_changed"] = sum(edit_distance(words(reference[name]), words(heard))
                                              for name, heard in figures["people"].items())
    reference_words = sum(len(words(text)) for text in reference.values())
    threshold = front_end.options.no_speech_threshold
    if args.json:
        emit_json({"bench": "transcription", "no_speech_threshold": threshold, "served_strength":
                   WHISPER_ADAPTATION_STRENGTH, "people_reference_words": reference_words,
                   "by_strength": {str(k): v for k, v in results.items()}})
        return
    rows = [[strength, f"{r['dev']['exact']}/{r['dev']['utterances']}", r["dev"]["wer"],
             f"{r['unseen_words']['exact']}/{r['unseen_words']['utterances']}", r["unseen_words"]["wer"],
             r["dev"]["median_s"], f"{r['non_speech_refused']}/4", r["quiet_speech_max_no_speech_prob"],
             f"{r['people_words_changed']}/{reference_words}"]
            for strength, r in results.items()]
    print_table(f"Transcription by Whisper adaptation strength (served: {WHISPER_ADAPTATION_STRENGTH}; "
                f"no speech above {threshold})",
                ["strength", "dev exact", "dev WER", "unseen exact", "unseen WER", "median s", "noise refused",
                 "quiet speech max p(no speech)", "people: words changed"], rows)
    print(f"\n{machine_note()}")


if __name__ == "__main__":
    main()
