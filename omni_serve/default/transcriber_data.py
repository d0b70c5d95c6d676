"""Training data for adapting Whisper to espeak-ng voices: spoken texts, as Whisper encoder outputs.

Texts are English sentences from standard-library docstrings, questions made from templates and
docstring words, and the speech decoder's built-in questions, minus anything the quality
benchmark holds out (its questions and every one of their key words, given as a JSON file). Each
text is spoken once by a voice drawn from `TRAINING_LANGUAGES` x `TRAINING_VARIANTS` (none of
the benchmark's or the dev set's voices) at a random speed and pitch, with random silence, level
and noise; some clips hold no speech at all (noise, a hum, tones, near silence), so the adapted
model keeps Whisper's judgement of "no speech". Only the decoder is trained, so each clip is kept
as its frozen encoder output (fp16, 1500 x 384), computed once here, in shards of `SHARD_SIZE`.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
import re
import subprocess
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from scipy.signal import resample_poly
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from whisper.model import AudioEncoder
from whisper.tokenizer import Tokenizer

from omni_serve.default.ctc_data import QUESTIONS, docstring_texts
from omni_serve.model.audio import SAMPLE_RATE
from omni_serve.model.espeak import ESPEAK_SAMPLE_RATE, RESAMPLE_DOWN, RESAMPLE_UP
from omni_serve.model.speech_encoder import load_audio_encoder, log_mel_windows

log = logging.getLogger(__name__)

# espeak-ng voices = language + variant. The quality benchmark speaks with en-us+f3 and en-gb-x-rp+m7,
# the transcription dev set with en-us+m3, en-us+f4 and en+m1: none of those languages' variants and
# not en-gb-x-rp are used here (a test checks).
TRAINING_LANGUAGES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-029", "en-us-nyc", "en-gb-x-gbcwmd")
TRAINING_VARIANTS = (
    "", "m2", "m4", "m5", "m6", "m8", "f1", "f2", "f5", "klatt", "klatt2", "klatt3", "klatt4", "klatt6", "Alex",
    "Andy", "Annie", "adam", "anika", "announcer", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed",
    "edward", "iven", "iven2", "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert",
    "steph", "travis", "victor", "zac", "Alicia", "Andrea", "Gene", "Lee", "Mike", "Michael", "grandma", "grandpa",
)
SPEED_RANGE = (120, 185)  # words per minute; espeak's default is 175
PITCH_RANGE = (30, 70)
MAX_CLIP_S = 29.0  # one Whisper window
SHARD_SIZE = 200
HELDOUT_MODULUS = 20  # a text is held out for evaluation when its crc32 is 0 modulo this
TEMPLATES = (
    "What is {x}?", "What is a {x}?", "How does {x} work?", "Tell me about {x}.", "Why is {x} important?",
    "Where does {x} come from?", "What is the meaning of {x}?", "How do you use {x}?", "Can you explain {x}?",
    "What is the difference between {x} and {y}?", "Who invented the {x}?", "How many {x} are there?",
    "What color is the {x}?", "Give me an example of {x}.", "Is {x} good for you?", "When was {x} first used?",
    "Name something that is {x}.", "What happens when you {x}?", "Describe a {x} in one sentence.",
    "Why do people like {x}?",
)
INFLECTION = re.compile(r"|s|es|ed|d|ing|er|ers")  # what may follow a held-out key word and still be it
SENTENCE = re.compile(r"[A-Z][A-Za-z ,;'\-]*[a-z][.!?]")  # plain prose: no digits, code or markup


@dataclass(frozen=True)
class TextOptions:
    """How many texts of each kind, and the seed that picks them (and the voices)."""

    sentences: int = 2200
    template_questions: int = 1400  # over docstring words
    everyday_questions: int = 0  # over `everyday_words` (needs the LLM)
    non_speech: int = 150
    seed: int = 1


@dataclass(frozen=True)
class Exclusions:
    """Questions and words no training text may contain: the quality benchmark's held-out set."""

    questions: frozenset[str] = frozenset()
    words: frozenset[str] = frozenset()

    @classmethod
    def from_file(cls, path: Path) -> Exclusions:
        """A JSON list of {"question": ..., "key": ...}: each question and each key word is excluded."""
        items = json.loads(Path(path).read_text())
        return cls(questions=frozenset(item["question"].lower() for item in items),
                   words=frozenset(item["key"].lower() for item in items))

    def allows(self, text: str) -> bool:
        """Not a held-out question, and no key word in it, inflected or not ("waters" and "days" count)."""
        if text.lower() in self.questions:
            return False
        return not any(INFLECTION.fullmatch(word[len(key):]) for word in re.findall(r"[a-z]+", text.lower())
                       for key in self.words if word.startswith(key))


def training_texts(options: TextOptions, exclusions: Exclusions, everyday: list[str] | None = None) -> list[str]:
    """Docstring sentences, template questions (over docstring words and over `everyday` words) and the
    built-in questions, shuffled; deterministic."""
    rng = random.Random(options.seed)
    paragraphs = docstring_texts(100_000)
    sentences = sorted({s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p)
                        if 4 <= len(s.split()) <= 20 and SENTENCE.fullmatch(s)})
    rng.shuffle(sentences)
    technical = sorted({w for p in paragraphs for w in re.findall(r"\b[a-z]{4,12}\b", p)})

    def questions(words: list[str], count: int) -> list[str]:
        return [rng.choice(TEMPLATES).format(x=rng.choice(words), y=rng.choice(words)) for _ in range(count)]

    texts = sentences[: options.sentences] + questions(technical, options.template_questions)
    if options.everyday_questions:
        if not everyday:
            raise ValueError("everyday questions need a list of everyday words")
        texts += questions(everyday, options.everyday_questions)
    texts = [t for t in texts + list(QUESTIONS) if exclusions.allows(t)]
    rng.shuffle(texts)
    return texts


EVERYDAY_WORD = r" [a-z]{3,14}"  # a Whisper token piece that is a lower-case word
NAME = r" [A-Z][a-z]{2,13}"  # ... or a capitalised one: names of people, places, months


@torch.inference_mode()
def everyday_words(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, whisper_tokenizer: Tokenizer,
                   threshold: float = 0.6, max_candidates: int | None = None, pattern: str = EVERYDAY_WORD,
                   pieces: tuple[int, ...] = (1,)) -> list[str]:
    """Common English words: lower-case whole-word tokens of Whisper's vocabulary (ordered by BPE merge
    rank, so roughly by frequency) that the LLM writes in one of `pieces` tokens (1: whole-word tokens
    of its own; 2 or 3: the longer, rarer words it spells in parts), and after which the LLM expects a
    new word or punctuation (which tells "bicycle" from fragments such as "langu").

    Docstrings alone give a technical vocabulary; people ask about penguins and bicycles.
    """
    encoding = whisper_tokenizer.encoding
    candidates = []
    for token in range(256, encoding.n_vocab - 1):
        piece = encoding.decode([token])
        if re.fullmatch(pattern, piece):
            ids = tokenizer(piece, add_special_tokens=False).input_ids
            if len(ids) in pieces:
                candidates.append((piece[1:], ids))
    candidates = candidates[:max_candidates]
    names = tokenizer.convert_ids_to_tokens(list(range(llm.config.vocab_size)))  # byte-level BPE: "Ġ" = space
    word_end = torch.tensor([float(p is not None and (p.startswith("Ġ") or p == "Ċ" or (len(p) == 1 and not p.isalnum())))
                             for p in names])
    prefix = tokenizer("The word is", add_special_tokens=False).input_ids
    words = []
    for length in sorted({len(ids) for _, ids in candidates}):
        same_length = [candidate for candidate in candidates if len(candidate[1]) == length]
        for start in range(0, len(same_length), 256):
            chunk = same_length[start : start + 256]
            probabilities = llm(torch.tensor([prefix + ids for _, ids in chunk])).logits[:, -1].float().softmax(-1)
            ends = (probabilities * word_end).sum(-1)
            words += [word for (word, _), end in zip(chunk, ends.tolist()) if end > threshold]
    return words


def speak(text: str, rng: random.Random) -> tuple[np.ndarray, str]:
    """`text` spoken by a random training voice at 16 kHz, with random silence, level and noise; the voice."""
    variant = rng.choice(TRAINING_VARIANTS)
    voice = rng.choice(TRAINING_LANGUAGES) + (f"+{variant}" if variant else "")
    speed, pitch = rng.randint(*SPEED_RANGE), rng.randint(*PITCH_RANGE)
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", "--stdin"],
                         input=text.encode(), capture_output=True, check=True, timeout=60).stdout
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert rate == ESPEAK_SAMPLE_RATE
    speech = resample_poly(samples, RESAMPLE_UP, RESAMPLE_DOWN).astype(np.float32)
    clip = np.concatenate([silence(rng.uniform(0.05, 0.6)), speech, silence(rng.uniform(0.05, 0.6))])
    clip *= rng.uniform(0.3, 1.0) / max(1e-4, float(np.abs(clip).max()))
    if rng.random() < 0.35:
        clip += noise(len(clip), rng.uniform(0.002, 0.02), rng)
    return clip, f"{voice}@{speed}p{pitch}"


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(SAMPLE_RATE * seconds), dtype=np.float32)


def noise(length: int, level: float, rng: random.Random) -> np.ndarray:
    return np.random.default_rng(rng.getrandbits(32)).normal(0, level, length).astype(np.float32)


def non_speech(rng: random.Random) -> tuple[np.ndarray, str]:
    """A clip without speech: white or brown noise, a mains hum with harmonics, a chord of tones, or near silence."""
    length = int(SAMPLE_RATE * rng.uniform(0.5, 12.0))
    t = np.arange(length, dtype=np.float32) / SAMPLE_RATE
    kind = rng.choice(("white", "brown", "hum", "tones", "quiet"))
    if kind == "white":
        clip = noise(length, rng.uniform(0.01, 0.3), rng)
    elif kind == "brown":
        clip = np.cumsum(noise(length, 1.0, rng))
        clip = (clip - np.convolve(clip, np.ones(400) / 400, mode="same")).astype(np.float32)
        clip *= rng.uniform(0.05, 0.5) / max(1e-4, float(np.abs(clip).max()))
    elif kind == "hum":
        base = rng.choice((50.0, 60.0))
        clip = sum(np.sin(2 * np.pi * base * h * t) / h for h in range(1, 6)).astype(np.float32) * rng.uniform(0.05, 0.5)
    elif kind == "tones":
        clip = sum(np.sin(2 * np.pi * rng.uniform(200, 2000) * t) for _ in range(3)).astype(np.float32)
        clip *= rng.uniform(0.05, 0.3)
    else:
        clip = noise(length, rng.uniform(1e-4, 2e-3), rng)
    return clip.astype(np.float32), kind


def is_heldout(text: str) -> bool:
    return bool(text) and zlib.crc32(text.encode()) % HELDOUT_MODULUS == 0


_encoder: AudioEncoder | None = None


def _load_encoder(whisper_path: str) -> None:
    global _encoder
    torch.set_num_threads(1)  # one process per core runs faster here than one process with two threads
    _encoder = load_audio_encoder(Path(whisper_path))[0].float().eval()


@torch.inference_mode()
def _write_shard(job: tuple[int, list[tuple[int, str]], str, int]) -> str:
    """Speak (or make non-speech for "") and encode one shard's texts; the shard file's path."""
    shard, items, out, seed = job
    assert _encoder is not None
    features, texts, voices = [], [], []
    for index, text in items:
        rng = random.Random(seed * 1_000_003 + index)
        clip, voice = speak(text, rng) if text else non_speech(rng)
        if len(clip) > SAMPLE_RATE * MAX_CLIP_S:
            continue
        features.append(_encoder(log_mel_windows(clip, _encoder.conv1.in_channels)[:1])[0].half())
        texts.append(text)
        voices.append(voice)
    path = Path(out) / f"shard_s{seed}_{shard:04d}.safetensors"  # runs with other seeds add to a folder
    save_file({"features": torch.stack(features)}, str(path),
              metadata={"texts": json.dumps(texts), "voices": json.dumps(voices)})
    return str(path)


def write_shards(texts: list[str], non_speech_clips: int, out: Path, whisper_path: Path, workers: int = 2,
                 seed: int = 0) -> list[Path]:
    """Speak and encode `texts` plus `non_speech_clips` clips without speech into shards in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    items = list(enumerate(texts + [""] * non_speech_clips))
    random.Random(seed).shuffle(items)
    jobs = [(i // SHARD_SIZE, items[i : i + SHARD_SIZE], str(out), seed) for i in range(0, len(items), SHARD_SIZE)]
    began = time.perf_counter()
    paths = []
    # spawn, not fork: a forked child of a process that already ran torch's OpenMP threads can hang
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_load_encoder, initargs=(str(whisper_path),)) as pool:
        for path in pool.map(_write_shard, jobs):
            paths.append(Path(path))
            log.info("shard %d/%d (%.0f s)", len(paths), len(jobs), time.perf_counter() - began)
    return paths


@dataclass
class TranscriberData:
    """Every shard of a data folder: encoder outputs with their texts ("" = no speech)."""

    features: torch.Tensor  # (clips, audio_ctx, audio_state), fp16
    texts: list[str]

    @classmethod
    def load(cls, folder: Path, exclusions: Exclusions = Exclusions()) -> TranscriberData:
        """All shards' clips that `exclusions` allows, in one tensor filled shard by shard (concatenating
        would need twice the memory)."""
        paths = sorted(Path(folder).glob("shard_*.safetensors"))
        if not paths:
            raise ValueError(f"no shard_*.safetensors in {folder}; run `omni-serve make-transcriber-data`")
        kept: list[list[int]] = []
        texts: list[str] = []
        for path in paths:
            with safe_open(str(path), "pt") as handle:
                shard_texts = json.loads(handle.metadata()["texts"])
                shape = handle.get_slice("features").get_shape()
            kept.append([i for i, text in enumerate(shard_texts) if exclusions.allows(text)])
            texts += [shard_texts[i] for i in kept[-1]]
        features = torch.empty((len(texts), *shape[1:]), dtype=torch.float16)
        start = 0
        for path, rows in zip(paths, kept):
            with safe_open(str(path), "pt") as handle:
                features[start : start + len(rows)] = handle.get_tensor("features")[rows]
            start += len(rows)
        return cls(features=features, texts=texts)

    def __len__(self) -> int:
        return len(self.texts)
