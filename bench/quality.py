"""Quality of the embedded default model (omni-smol): understanding, speech, latency, memory.

Every held-out question is spoken by espeak-ng voices that no part of the model was trained or
tuned on, answered through the engine (the serving path: transcription front end, LLM, unit
stream, vocoder), and compared with:
- understanding: the LLM's answer to the same question typed as text (same prompt, greedy):
  exact match, ROUGE-L F1, and whether the question's key word appears in the answer;
- speech: Whisper tiny.en's transcript of the spoken answer against the answer's text (WER),
  beside the WER of espeak-ng reading that text directly (same voice settings as the vocoder);
  Whisper tiny.en as its pip package ships it judges alone (not the front end's espeak-adapted
  Whisper; the front end's beam, without its LLM rescoring, which would favour fluent text);
  and, with no judge in between, the unit error of the answer's units against espeak-ng's phonemes
  of its text (the learned decoder's training target): Whisper's hearing of single answers swings
  by whole sentences (a dropped sentence, a loop), so this says how far the units themselves are off;
- latency: time from the request to its first audio chunk, in-process through the engine, and
  with `--stack` also through the full stack (`omni-serve launch`: controller + one CPU worker,
  HTTP streaming), where the worker's own peak RSS is read too;
- memory: peak RSS of this process (models, engine and benchmark together, a high-water mark over
  the generators measured so far; `--stack` reads one worker's own).
Both unit generators are measured on the same questions and voices, side by side: (b) the trained
CTC speech decoder (the default) and (a) espeak-ng phonemes of the streamed text (built with
`omni-serve build-default --unit-generator espeak_text`). Their LLM and front end are the same, so
understanding should agree; speech and latency are what differ.
Every figure is printed as measured over the whole set; nothing is selected.

    python bench/quality.py [--quick] [--json] [--stack] [--samples OUT.json] [--generators learned,espeak_text]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch
from whisper.model import Whisper
from whisper.normalizers import EnglishTextNormalizer

from omni_serve.engine import (
    AudioChunk,
    AudioError,
    Engine,
    ErrorEvent,
    Finished,
    GenerationOptions,
    SpeechRequest,
    prepare_waveform,
)
from omni_serve.default.build import convert_base_whisper
from omni_serve.default.ctc_train import edit_distance
from omni_serve.model.espeak import EspeakSettings, phonemizer_for, wav_samples
from omni_serve.model.loader import OmniModel, load_model
from omni_serve.model.prompt import tokenize_speech_prompt
from omni_serve.model.speech_encoder import load_whisper_checkpoint
from omni_serve.model.transcription import TranscriptionFrontEnd, TranscriptionOptions

# Written for this benchmark; no training run has seen them, nor any text with one of their key words
# (`omni-serve make-transcriber-data --exclude bench/heldout_questions.json`).
HELDOUT_FILE = Path(__file__).with_name("heldout_questions.json")
QUESTIONS = [(item["question"], item["key"]) for item in json.loads(HELDOUT_FILE.read_text())]
QUICK_QUESTIONS = 8


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice variant and speed; the default model's own vocoder voice is en-us at 150."""

    name: str
    speed: int


VOICES = [Voice("en-us+f3", 135), Voice("en-gb-x-rp+m7", 160)]
NORMALIZE = EnglishTextNormalizer()


@dataclass
class Sample:
    question: str
    voice: str
    key: str
    typed_answer: str
    question_transcript: str = ""
    answer: str = ""
    exact: bool = False
    rouge_l: float = 0.0
    key_in_answer: bool = False
    key_in_typed: bool = False
    answer_words: int = 0
    speech_errors: int = 0
    direct_errors: int = 0
    reference_units: int = 0  # espeak-ng's phonemes of the answer text
    unit_errors: int = 0  # edit distance of the answer's units to them
    speech_heard: str = ""  # the judge's transcript of the spoken answer
    direct_heard: str = ""  # ... and of espeak-ng reading the answer's text
    first_audio_s: float | None = None
    timings: dict = field(default_factory=dict)


def words(text: str) -> list[str]:
    return NORMALIZE(text).split()


def rouge_l_f1(reference: str, candidate: str) -> float:
    ref, cand = words(reference), words(candidate)
    if not ref or not cand:
        return float(ref == cand)
    lengths = [0] * (len(cand) + 1)
    for r in ref:
        diagonal = 0
        for j, c in enumerate(cand, 1):
            diagonal, lengths[j] = lengths[j], diagonal + 1 if r == c else max(lengths[j], lengths[j - 1])
    lcs = lengths[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(cand), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """16 kHz samples of espeak-ng reading plain text."""
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", "--stdin"], input=text.encode(),
                            capture_output=True, check=True)
    return prepare_waveform(wav_samples(result.stdout), 22_050)


@torch.inference_mode()
def typed_answer(model: OmniModel, question: str, max_new_tokens: int) -> str:
    """Greedy answer of the LLM to the question as typed text, in the model's own prompt format."""
    prompt = model.template.opening() + model.template.user_turn(question)
    ids = tokenize_speech_prompt(model.tokenizer, prompt, first=True)
    network, cache = model.network, model.network.new_cache()
    step = network.step(network.embed_prompt(ids, []), cache)
    eos = model.end_token_ids
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(step.logits[0].argmax())
        tokens.append(token)
        if token in eos:
            break
        step = network.step(network.embed_tokens(torch.tensor([[token]], device=model.device)), cache)
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def spoken_answer(engine: Engine, audio: np.ndarray, max_new_tokens: int) -> tuple[Finished, np.ndarray]:
    chunks, final = [], None
    for event in engine.generate(SpeechRequest(audio, GenerationOptions(max_new_tokens=max_new_tokens))):
        if isinstance(event, AudioChunk):
            chunks.append(event.samples)
        elif isinstance(event, Finished):
            final = event
        elif isinstance(event, ErrorEvent):
            raise RuntimeError(event.message)
    return final, (np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32))


@dataclass
class SharedResults:
    """What does not depend on the unit generator, computed once for all of them."""

    typed: dict[str, str] = field(default_factory=dict)  # question -> typed answer
    direct_heard: dict[str, str] = field(default_factory=dict)  # answer text -> what the judge heard espeak read


def shipped_whisper_judge(front_end: TranscriptionFrontEnd) -> TranscriptionFrontEnd:
    """Whisper tiny.en as its pip package ships it (not the front end's espeak-adapted one), with the front
    end's beam, without the LLM's rescoring and with Whisper's own no-speech rule: the issue's judge of
    speech, Whisper alone."""
    with tempfile.TemporaryDirectory() as scratch:
        dims, state = load_whisper_checkpoint(convert_base_whisper(Path(scratch)))
    model = Whisper(dims)
    model.load_state_dict(state, strict=True)
    return TranscriptionFrontEnd(model.float().eval(), front_end.embed_tokens, front_end.tokenizer,
                                 TranscriptionOptions(beam_size=front_end.options.beam_size))


def heard(judge: TranscriptionFrontEnd, speech: np.ndarray) -> str:
    """What the judge hears; nothing, if it hears no speech at all (every word then counts as an error)."""
    try:
        return judge.transcribe(speech)
    except AudioError:
        return ""


def evaluate(model_path: Path, label: str, questions: list[tuple[str, str]], voices: list[Voice],
             max_new_tokens: int, shared: SharedResults) -> dict:
    model = load_model(model_path, device="cpu")
    front_end = model.front_end
    judge = shipped_whisper_judge(front_end)
    engine = Engine(model, max_batch_size=1)
    espeak_settings = EspeakSettings.from_extras(model.config.extras)  # the vocoder's voice, speed and units
    # Only a model whose units are espeak-ng phonemes has a unit reference (not HiFi-GAN's HuBERT units).
    phonemizer = phonemizer_for(espeak_settings) if model.config.vocoder == "espeak" else None
    samples: list[Sample] = []
    direct_cache = shared.direct_heard
    try:
        typed = shared.typed
        for question, _ in questions:
            if question not in typed:
                typed[question] = typed_answer(model, question, max_new_tokens)
        for voice in voices:
            for question, key in questions:
                audio = espeak(question, voice.name, voice.speed)
                sample = Sample(question=question, voice=f"{voice.name}@{voice.speed}", key=key,
                                typed_answer=typed[question])
                sample.question_transcript = front_end.transcribe(audio)
                final, speech = spoken_answer(engine, audio, max_new_tokens)
                sample.answer = final.text
                sample.timings = final.timings.as_dict()
                sample.first_audio_s = final.timings.first_audio_s
                sample.exact = NORMALIZE(final.text) == NORMALIZE(sample.typed_answer)
                sample.rouge_l = rouge_l_f1(sample.typed_answer, final.text)
                sample.key_in_answer = key in words(final.text)
                sample.key_in_typed = key in words(sample.typed_answer)
                reference = words(final.text)
                sample.answer_words = len(reference)
                sample.speech_heard = heard(judge, speech) if speech.size else ""
                sample.speech_errors = edit_distance(reference, words(sample.speech_heard))
                if final.text not in direct_cache:
                    direct_speech = espeak(final.text, espeak_settings.voice, espeak_settings.speed)
                    direct_cache[final.text] = heard(judge, direct_speech)
                sample.direct_heard = direct_cache[final.text]
                sample.direct_errors = edit_distance(reference, words(sample.direct_heard))
                if phonemizer is not None:
                    target = phonemizer.text(final.text)
                    sample.reference_units = len(target)
                    sample.unit_errors = edit_distance(target, [espeak_settings.units[u] for u in final.units])
                samples.append(sample)
                print(f"[{label} {len(samples)}] {sample.voice} {question!r} -> {final.text[:70]!r} "
                      f"rougeL={sample.rouge_l:.2f} first_audio={sample.first_audio_s:.2f}s", file=sys.stderr)
    finally:
        engine.close()
    return summarize(samples, label, engine.placement)


def summarize(samples: list[Sample], label: str, placement: str) -> dict:
    n = len(samples)
    total_words = sum(s.answer_words for s in samples) or 1
    first_audio = sorted(s.first_audio_s for s in samples if s.first_audio_s is not None)
    speech_wer = sum(s.speech_errors for s in samples) / total_words
    direct_wer = sum(s.direct_errors for s in samples) / total_words
    reference_units = sum(s.reference_units for s in samples)
    question_wer = sum(edit_distance(words(s.question), words(s.question_transcript)) for s in samples) / \
        max(1, sum(len(words(s.question)) for s in samples))
    return {
        "generator": label,
        "utterances": n,
        "understanding": {
            "exact_match": sum(s.exact for s in samples) / n,
            "rouge_l_ge_0_5": sum(s.rouge_l >= 0.5 for s in samples) / n,
            "rouge_l_mean": statistics.fmean(s.rouge_l for s in samples),
            "key_word_in_spoken_answer": sum(s.key_in_answer for s in samples) / n,
            "key_word_in_typed_answer": sum(s.key_in_typed for s in samples) / n,
            "question_transcript_wer": question_wer,
        },
        "speech": {"wer_spoken_answer": speech_wer, "wer_espeak_direct": direct_wer,
                   "wer_gap_points": 100 * (speech_wer - direct_wer),
                   "unit_error_rate": (sum(s.unit_errors for s in samples) / reference_units) if reference_units else None},
        "latency": {"first_audio_s_median": statistics.median(first_audio) if first_audio else None,
                    "first_audio_s_p90": first_audio[int(0.9 * (len(first_audio) - 1))] if first_audio else None,
                    "first_audio_s_max": first_audio[-1] if first_audio else None,
                    "where": f"in-process engine ({placement}), batch 1, CPU threads: {torch.get_num_threads()}"},
        "memory": {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
        "load_average_1m": os.getloadavg()[0],  # other work on the machine inflates every timing
        "samples": [asdict(s) for s in samples],
    }


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def peak_rss_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


async def first_audio_over_http(url: str, audio: np.ndarray, max_new_tokens: int) -> float | None:
    from omni_serve.serve.client import request_from_samples, stream_answer
    from omni_serve.serve.protocol import AudioEvent, ErrorEvent

    began, first = time.perf_counter(), None
    async for event in stream_answer(url, request_from_samples(audio, max_new_tokens=max_new_tokens)):
        if isinstance(event, AudioEvent) and first is None:
            first = time.perf_counter() - began
        elif isinstance(event, ErrorEvent):
            raise RuntimeError(event.message)
    return first


def stack_latency(model_path: Path, questions: list[tuple[str, str]], voice: Voice, max_new_tokens: int) -> dict:
    """Time to first audio through `omni-serve launch` (controller + 1 CPU worker, HTTP), and the worker's RSS."""
    from omni_serve.serve.client import ServeClient

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    launch = subprocess.Popen([sys.executable, "-m", "omni_serve", "launch", "--model-path", str(model_path),
                               "--cpu-workers", "1", "--controller-port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready() -> None:
        async with ServeClient(url) as client:
            for _ in range(600):
                try:
                    if await client.list_models():
                        return
                except httpx.HTTPError:  # not up yet
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError("the stack did not come up in 5 minutes")

    try:
        asyncio.run(ready())
        times = [asyncio.run(first_audio_over_http(url, espeak(q, voice.name, voice.speed), max_new_tokens))
                 for q, _ in questions]
        worker_rss = max(peak_rss_gb(pid) for pid in descendants(launch.pid))
    finally:
        launch.terminate()
        launch.wait(timeout=60)
    measured = sorted(t for t in times if t is not None)
    return {"requests": len(times), "first_audio_s_median": statistics.median(measured),
            "first_audio_s_max": measured[-1], "worker_peak_rss_gb": worker_rss,
            "where": "omni-serve launch --cpu-workers 1, HTTP stream, requests one at a time"}


def report_rows(report: dict) -> list[tuple[str, str]]:
    """(figure, value) of one generator's report, in print order."""
    u, s, lat = report["understanding"], report["speech"], report["latency"]
    rows = [
        ("utterances", f"{report['utterances']}"),
        ("answer == typed answer (>= 50%)", f"{u['exact_match']:.0%}"),
        ("ROUGE-L F1 >= 0.5 vs typed (>= 80%)", f"{u['rouge_l_ge_0_5']:.0%}"),
        ("ROUGE-L F1 mean", f"{u['rouge_l_mean']:.2f}"),
        ("key word in spoken / typed answer", f"{u['key_word_in_spoken_answer']:.0%} / {u['key_word_in_typed_answer']:.0%}"),
        ("question transcript WER", f"{u['question_transcript_wer']:.1%}"),
        ("WER spoken answer", f"{s['wer_spoken_answer']:.1%}"),
        ("WER espeak reading the text", f"{s['wer_espeak_direct']:.1%}"),
        ("WER gap, points (<= +10)", f"{s['wer_gap_points']:+.1f}"),
        ("unit error vs espeak-ng's phonemes of the text",
         f"{s['unit_error_rate']:.3f}" if s["unit_error_rate"] is not None else "-"),
        ("first audio median / p90 / max, s (<= 1.5)", (f"{lat['first_audio_s_median']:.2f} / "
                                                         f"{lat['first_audio_s_p90']:.2f} / {lat['first_audio_s_max']:.2f}")),
        ("peak RSS of this process so far, GB", f"{report['memory']['peak_rss_gb']:.2f}"),
        ("load average (1 min) at the end", f"{report['load_average_1m']:.1f} on {os.cpu_count()} cores"),
    ]
    if "stack" in report:
        stack = report["stack"]
        rows += [(f"full stack first audio median / max, s ({stack['requests']} requests)",
                  f"{stack['first_audio_s_median']:.2f} / {stack['first_audio_s_max']:.2f}"),
                 ("full stack worker peak RSS, GB (<= 2)", f"{stack['worker_peak_rss_gb']:.2f}")]
    return rows


def print_table(reports: dict[str, dict]) -> None:
    """One column per unit generator."""
    columns = {label: dict(report_rows(report)) for label, report in reports.items()}
    names = [name for name, _ in report_rows(next(iter(reports.values())))]
    width = max(len(name) for name in names)
    widths = {label: max(len(label), *(len(v) for v in column.values())) for label, column in columns.items()}
    where = next(iter(reports.values()))["latency"]["where"]
    print(f"omni-smol quality by unit generator (targets in brackets; latency: {where})")
    print(f"  {'':<{width}}  " + "  ".join(f"{label:<{widths[label]}}" for label in columns))
    for name in names:
        print(f"  {name:<{width}}  " + "  ".join(f"{columns[label].get(name, '-'):<{widths[label]}}" for label in columns))


def main() -> int:
    from omni_serve.default.build import GENERATORS, build_default

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_QUESTIONS} questions, one voice")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures instead of tables")
    parser.add_argument("--samples", type=Path, help="also write every sample (question, transcripts, answers) here")
    parser.add_argument("--generators", default=",".join(GENERATORS),
                        help=f"unit generators to compare, comma-separated (default: {','.join(GENERATORS)})")
    parser.add_argument("--model-path", type=Path, help="one model folder to measure instead of the built generators")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--stack", action="store_true", help="also measure latency and worker RSS over HTTP")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.model_path is not None:
        folders = {args.model_path.name: args.model_path}
    else:
        folders = {label: build_default(generator=label, progress=not args.json)
                   for label in args.generators.split(",")}
    questions = QUESTIONS[:QUICK_QUESTIONS] if args.quick else QUESTIONS
    voices = VOICES[:1] if args.quick else VOICES
    began, shared = time.perf_counter(), SharedResults()
    reports = {}
    for label, folder in folders.items():
        reports[label] = evaluate(folder, label, questions, voices, args.max_new_tokens, shared)
        if args.stack:
            reports[label]["stack"] = stack_latency(folder, questions, voices[0], args.max_new_tokens)
    if args.samples:
        args.samples.write_text(json.dumps(reports, indent=1))
    figures = {label: {k: v for k, v in report.items() if k != "samples"} for label, report in reports.items()}
    if args.json:
        print(json.dumps({"bench": "quality", "generators": figures, "wall_s": time.perf_counter() - began}))
    else:
        print_table(reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
