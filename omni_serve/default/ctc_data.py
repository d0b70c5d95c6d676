"""Training data for a learned CTC unit generator: LLM hidden states, chosen tokens and espeak unit targets.

The generator (b) reads, for every generated token, the final-norm hidden state that chose it and
(optionally) that token's embedding. Here both come from a teacher-forced pass of an English text
placed as the assistant's answer to a prompt, so the hidden state at position i-1 is paired with
token i, exactly as the engine pushes (hidden, token_id) to a unit stream. Targets are the text's
espeak-ng phoneme units, in the unit inventory of generator (a) (`omni_serve.model.espeak`), so a
trained decoder plugs into the same espeak vocoder.

Texts come from what is offline: files given on the command line, English docstrings of the Python
standard library, and the LLM's own greedy answers to a fixed list of questions. Everything is
stored in one safetensors file (hidden states in fp16), with per-sample offsets.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import random
import re
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from omni_serve.engine.prompting import PromptBuilder
from omni_serve.model.espeak import EspeakSettings, phonemizer_for
from omni_serve.model.loader import OmniModel

log = logging.getLogger(__name__)

TEXT_PROMPT = "Please say something."  # the user turn that a plain text answers (teacher forcing)
HELDOUT_MODULUS = 10  # a sample is held out when the crc32 of its text is 0 modulo this: stable across runs
# Questions for the LLM's own greedy answers: everyday topics, like the questions users speak. None shares a
# question or its topic with bench/quality.py's held-out questions (a test checks).
QUESTIONS = (
    "What is the capital of France?", "How do I boil an egg?", "Tell me a fun fact about cats.",
    "What causes thunder?", "How far away are the stars?", "What is the tallest mountain?",
    "How do airplanes stay in the air?", "What is a black hole?", "How do I learn to ride a bike?",
    "Who was Albert Einstein?", "What should I pack for a camping trip?", "What is the speed of sound?",
    "What is a healthy breakfast?", "How can I save money?", "Tell me about the Roman Empire.",
    "How do vaccines work?", "What is gravity?", "How do I make a cup of tea?", "What are clouds made of?",
    "Why do we dream?", "What is the difference between weather and climate?", "What is an atom?",
    "Suggest a name for a dog.", "How do I stay focused while studying?", "What is the Great Wall of China?",
    "How do magnets work?", "Describe a sunset.", "How do I plant a tree?", "What is democracy?",
    "What do pandas eat?", "How does the heart work?", "What is electricity?",
    "Tell me a short story about a robot.", "What is the meaning of kindness?", "How do trains work?",
    "What is a good hobby?", "Why do people laugh?", "How is bread made?", "What is the internet?",
    "How do I tie a shoe?", "What is a desert?", "Why do cats purr?", "What is chess?",
    "How do I write a good letter?", "What is a museum?", "Why is reading important?",
    "How do submarines dive?", "What is a comet?", "How do I clean a window?", "What is jazz?",
)
# Questions about one word each (`word_questions`): the LLM's answers to them are text in the style the
# decoder speaks (answers), over far more words than `QUESTIONS` reach, written as the LLM writes them
# (long words split over several tokens).
WORD_QUESTION_TEMPLATES = (
    "Tell me about {word}.", "What does {word} mean?", "Use the word {word} in two sentences.",
    "Explain {word} simply.", "Say something interesting about {word}.",
)
# Standard-library modules whose docstrings are plain English prose (an offline text source).
DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "itertools", "json", "logging",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "platform", "pprint", "queue", "random",
    "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "typing", "unittest", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
    "ast", "codecs", "concurrent.futures", "configparser", "doctest", "ftplib", "gettext", "imaplib", "locale",
    "mailbox", "multiprocessing", "numbers", "optparse", "pdb", "pydoc", "selectors", "shelve", "signal",
    "smtplib", "sqlite3", "ssl", "struct", "sysconfig", "trace", "traceback", "wave", "zoneinfo", "cmd", "abc",
    "nntplib", "xml.dom.minidom", "xml.etree.ElementTree", "urllib.request", "http.server", "http.cookiejar",
)
PROSE = re.compile(r"^[A-Za-z][A-Za-z0-9 ,;:'()\-.]*[A-Za-z)][.!?]?$")  # sentences only: no code, no markup


@dataclass(frozen=True)
class DataOptions:
    """How much text, and how long each piece may be."""

    max_tokens: int = 64  # per text; longer texts are cut at a word boundary
    answers: int = 0  # greedy answers to generate (one per question, cycling)
    answer_tokens: int = 64  # longest greedy answer
    doc_texts: int = 0  # paragraphs of standard-library docstrings


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    hidden: torch.Tensor  # (tokens, llm_hidden): the state that chose each token
    units: list[int]
    source: str


def docstring_texts(limit: int) -> list[str]:
    """English paragraphs from standard-library docstrings, in a fixed order (deterministic)."""
    texts: list[str] = []
    seen: set[str] = set()
    for name in DOC_MODULES if limit > 0 else ():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        objects = [module] + [value for key, value in sorted(vars(module).items()) if not key.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or callable(obj)) else None
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                words = text.split()
                if 6 <= len(words) <= 60 and PROSE.match(text) and text not in seen:
                    seen.add(text)
                    texts.append(text)
                    if len(texts) >= limit:
                        return texts
    return texts


# Plain sentences with three word slots: each vocabulary word is read in an ordinary sentence.
VOCABULARY_TEMPLATES = (
    "The {a} was next to the {b} and the {c}.", "I saw a {a}, a {b} and a {c} today.",
    "We talked about {a}, {b} and {c}.", "Is {a} more like {b} or {c}?", "She wrote {a}, then {b}, then {c}.",
    "There is {a} here, {b} over there and {c} at home.",
)


# Sentences that read numbers in the forms answers write them: counts, thousands with commas,
# decimals, years, percentages, temperatures, negatives, ordinals, times of day and prices.
NUMBER_TEMPLATES = (
    "There are {small} {thing} in the {place}.", "It is about {decimal} {unit} long.",
    "In {year}, about {thousands} people lived there.", "The temperature reached {celsius}°C ({fahrenheit}°F).",
    "Prices rose by {percent}% to ${price}.", "She finished {ordinal} out of {count} runners.",
    "The meeting starts at {hour}:{minute}.", "It weighs {decimal} kilograms and is {count} meters tall.",
    "The lowest reading was {negative} degrees.", "A {thing_one} has {small} legs and lives for {count} years.",
    "About {decimal} million people visit each year.", "The {ordinal} chapter has {count} pages.",
)
NUMBER_WORDS = {
    "thing": ("books", "chairs", "trees", "lamps", "cars", "students", "stars", "rooms"),
    "thing_one": ("beetle", "lizard", "insect", "crab", "dog", "frog"),
    "place": ("room", "garden", "city", "box", "library", "park"),
    "unit": ("meters", "kilometers", "miles", "inches", "feet", "centimeters"),
}


def number_texts(count: int, seed: int) -> list[str]:
    """`count` sentences holding numbers in the forms LLM answers write them.

    A token "8" or "149" says nothing of its sound in its spelling; the decoder learns how digits are
    read only from text that reads them. Deterministic for a seed. (Measured on the default: without
    `--number-places` they taught the held-out number sentences but made the benchmark's answers with
    digits worse, since a digit's reading depends on the digits after it; see the model card.)
    """
    rng = random.Random(seed)

    def ordinal(n: int) -> str:
        suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
        return f"{n}{suffix}"

    texts = []
    for _ in range(count):
        values = {
            "small": rng.randint(0, 24), "count": rng.randint(2, 999), "year": rng.randint(1500, 2030),
            "decimal": f"{rng.randint(0, 999)}.{rng.randint(0, 9)}", "thousands": f"{rng.randint(1, 999_999):,}",
            "percent": rng.randint(1, 100), "price": f"{rng.randint(1, 5000)}.{rng.randint(0, 99):02d}",
            "celsius": rng.randint(-40, 120), "fahrenheit": rng.randint(-40, 250), "negative": -rng.randint(1, 90),
            "ordinal": ordinal(rng.randint(1, 120)), "hour": rng.randint(1, 12), "minute": f"{rng.randint(0, 59):02d}",
            **{slot: rng.choice(choices) for slot, choices in NUMBER_WORDS.items()},
        }
        texts.append(rng.choice(NUMBER_TEMPLATES).format(**values))
    return texts


def word_questions(words: list[str], count: int, seed: int) -> list[str]:
    """`count` questions about words drawn from `words` without repeats (cycling when `count` is larger),
    each in a template; deterministic for a seed."""
    rng = random.Random(seed)
    order = []
    while len(order) < count and words:
        order += rng.sample(words, len(words))
    return [rng.choice(WORD_QUESTION_TEMPLATES).format(word=word) for word in order[:count]]


def vocabulary_texts(words: list[str], per_word: int, seed: int) -> list[str]:
    """Sentences in which every one of `words` appears `per_word` times, three words to a sentence.

    A speech decoder learns how a token sounds only from text that holds it: the docstrings and the
    LLM's answers to a few questions leave most everyday words and names unheard, and generator (b)
    speaks those as noise. Deterministic for a seed.
    """
    rng = random.Random(seed)
    slots = [word for word in words for _ in range(per_word)]
    rng.shuffle(slots)
    texts = []
    for start in range(0, len(slots) - 2, 3):
        a, b, c = slots[start : start + 3]
        text = rng.choice(VOCABULARY_TEMPLATES).format(a=a, b=b, c=c)
        texts.append(text[0].upper() + text[1:])
    return texts


def read_text_files(paths: list[Path]) -> list[str]:
    """Blank-line-separated paragraphs of each file, whitespace collapsed."""
    texts = []
    for path in paths:
        for paragraph in Path(path).read_text(encoding="utf-8").split("\n\n"):
            text = " ".join(paragraph.split())
            if text:
                texts.append(text)
    return texts


class HiddenStateCapture:
    """Teacher-forced and greedy passes through one loaded model's LLM."""

    def __init__(self, model: OmniModel, options: DataOptions) -> None:
        self.model = model
        self.options = options
        self.eos_ids = model.end_token_ids
        self.prompts = PromptBuilder(model, model.end_of_turn_id)
        self.phonemizer = phonemizer_for(EspeakSettings())
        self.unit_index = {unit: i for i, unit in enumerate(EspeakSettings().units)}

    def encode_text(self, text: str) -> tuple[str, list[int]]:
        """Token ids of `text` as an answer, cut at a word boundary to at most `max_tokens`."""
        tokenizer = self.model.tokenizer
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > self.options.max_tokens:
            head = tokenizer.decode(ids[: self.options.max_tokens])
            text = head.rsplit(" ", 1)[0] if " " in head else head
            ids = tokenizer(text, add_special_tokens=False).input_ids[: self.options.max_tokens]
        return text, ids

    @torch.inference_mode()
    def teacher_forced(self, question: str, answer_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden state that chose each answer token: position i-1's state for token i."""
        prompt_ids = self.prompts.turn_ids(question, first=True)
        network = self.model.network
        ids = torch.tensor([prompt_ids + answer_ids], device=self.model.device)
        states = network.model(inputs_embeds=network.embed_tokens(ids), use_cache=False).last_hidden_state[0]
        start = len(prompt_ids) - 1
        return states[start : start + len(answer_ids)].float().cpu()

    @torch.inference_mode()
    def greedy_answer(self, question: str) -> list[int]:
        """The LLM's greedy answer to a text question (no end-of-turn token)."""
        network = self.model.network
        prompt_ids = self.prompts.turn_ids(question, first=True)
        cache = network.new_cache()
        step = network.step(network.embed_prompt(prompt_ids, []), cache)
        answer: list[int] = []
        for _ in range(self.options.answer_tokens):
            token = int(step.logits[0].argmax())
            if token in self.eos_ids:
                break
            answer.append(token)
            step = network.step(network.embed_tokens(torch.tensor([[token]], device=self.model.device)), cache)
        return answer

    def units(self, text: str) -> list[int]:
        return [self.unit_index[name] for name in self.phonemizer.text(text)]

    def sample(self, text: str, question: str, source: str, ids: list[int] | None = None) -> Sample | None:
        if ids is None:
            text, ids = self.encode_text(text)
        units = self.units(text)
        if not ids or not units:
            return None
        return Sample(text=text, token_ids=ids, hidden=self.teacher_forced(question, ids), units=units, source=source)

    def collect(self, texts: list[str], questions: Sequence[str] = (),
                allows: Callable[[str], bool] = lambda text: True) -> list[Sample]:
        """Teacher-forced samples for `texts`, then the LLM's greedy answers to `options.answers` built-in
        questions and to `questions`; an answer that `allows` refuses (a held-out key word) is dropped."""
        samples: list[Sample] = []
        began = time.perf_counter()
        for index, text in enumerate(texts):
            sample = self.sample(text, TEXT_PROMPT, "text")
            if sample is not None:
                samples.append(sample)
            if (index + 1) % 200 == 0:
                log.info("texts: %d/%d (%.0f s)", index + 1, len(texts), time.perf_counter() - began)
        asked = [self.builtin_question(index) for index in range(self.options.answers)] + list(questions)
        for index, question in enumerate(asked):
            ids = self.greedy_answer(question)
            text = self.model.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text and allows(text):
                ids = self.model.tokenizer(text, add_special_tokens=False).input_ids
                sample = self.sample(text, question, "answer", ids)
                if sample is not None:
                    samples.append(sample)
            if (index + 1) % 10 == 0:
                log.info("answers: %d/%d (%.0f s)", index + 1, len(asked), time.perf_counter() - began)
        return samples

    @staticmethod
    def builtin_question(index: int) -> str:
        """The index-th of `QUESTIONS`, cycling; later rounds ask a variant, so answers differ."""
        question = QUESTIONS[index % len(QUESTIONS)]
        if index >= len(QUESTIONS):
            question = f"{question} Answer in {2 + index // len(QUESTIONS)} sentences."
        return question


def is_heldout(text: str) -> bool:
    return zlib.crc32(text.encode()) % HELDOUT_MODULUS == 0


def save_samples(samples: list[Sample], path: Path, model: OmniModel) -> None:
    """One safetensors file: concatenated per-token and per-unit tensors with offsets, plus the
    embedding rows of every token used (so training needs neither the model nor its 49k-row table)."""
    if not samples:
        raise ValueError("no samples to save")
    token_ids = torch.tensor([t for s in samples for t in s.token_ids], dtype=torch.int64)
    used = torch.unique(token_ids)
    with torch.inference_mode():
        rows = model.network.embed_tokens(used.to(model.device)).float().cpu()
    token_offsets = torch.tensor([0] + [len(s.token_ids) for s in samples]).cumsum(0)
    unit_offsets = torch.tensor([0] + [len(s.units) for s in samples]).cumsum(0)
    tensors = {
        "hidden": torch.cat([s.hidden for s in samples]).half().contiguous(),
        "token_ids": token_ids,
        "units": torch.tensor([u for s in samples for u in s.units], dtype=torch.int64),
        "token_offsets": token_offsets,
        "unit_offsets": unit_offsets,
        "heldout": torch.tensor([is_heldout(s.text) for s in samples], dtype=torch.uint8),
        "from_answer": torch.tensor([s.source == "answer" for s in samples], dtype=torch.uint8),
        "embed_ids": used,
        "embed_rows": rows.half().contiguous(),
    }
    llm = model.config.llm
    metadata = {
        "units": json.dumps(list(EspeakSettings().units)),
        "llm_hidden": str(llm.hidden_size),
        "rope_theta": str((llm.rope_parameters or {}).get("rope_theta", 10000.0)),
        "rope_parameters": json.dumps(llm.rope_parameters or {}),
        "max_position_embeddings": str(llm.max_position_embeddings),
        "model": model.name,
        "texts": json.dumps([s.text for s in samples]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


@dataclass
class CTCData:
    """A saved data file, split into per-sample views."""

    hidden: torch.Tensor
    token_ids: torch.Tensor
    units: torch.Tensor
    token_offsets: torch.Tensor
    unit_offsets: torch.Tensor
    heldout: torch.Tensor
    embed_ids: torch.Tensor
    embed_rows: torch.Tensor
    unit_names: list[str]
    llm_hidden: int
    rope_parameters: dict[str, Any]  # the LLM's rope settings, which the decoder layers copy (as served)
    max_position_embeddings: int

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @classmethod
    def load_all(cls, paths: list[Path]) -> CTCData:
        """Several data files made from the same model, as one."""
        parts = [cls.load(path) for path in paths]
        first = parts[0]
        for part in parts[1:]:
            if (part.unit_names, part.llm_hidden, part.rope_parameters) != (first.unit_names, first.llm_hidden, first.rope_parameters):
                raise ValueError("data files made with different units or models cannot be joined")
        embed_ids, order = torch.unique(torch.cat([p.embed_ids for p in parts]), return_inverse=True)
        rows = torch.empty((len(embed_ids), first.embed_rows.shape[1]), dtype=first.embed_rows.dtype)
        rows[order] = torch.cat([p.embed_rows for p in parts])

        def offsets(name: str, totals: str) -> torch.Tensor:
            base, joined = 0, [torch.zeros(1, dtype=torch.int64)]
            for part in parts:
                joined.append(getattr(part, name)[1:] + base)
                base += len(getattr(part, totals))
            return torch.cat(joined)

        return cls(hidden=torch.cat([p.hidden for p in parts]), token_ids=torch.cat([p.token_ids for p in parts]),
                   units=torch.cat([p.units for p in parts]), token_offsets=offsets("token_offsets", "token_ids"),
                   unit_offsets=offsets("unit_offsets", "units"), heldout=torch.cat([p.heldout for p in parts]),
                   embed_ids=embed_ids, embed_rows=rows, unit_names=first.unit_names, llm_hidden=first.llm_hidden,
                   rope_parameters=first.rope_parameters, max_position_embeddings=first.max_position_embeddings)

    @classmethod
    def load(cls, path: Path) -> CTCData:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        t = load_file(str(path))
        return cls(hidden=t["hidden"], token_ids=t["token_ids"], units=t["units"], token_offsets=t["token_offsets"],
                   unit_offsets=t["unit_offsets"], heldout=t["heldout"].bool(), embed_ids=t["embed_ids"],
                   embed_rows=t["embed_rows"], unit_names=json.loads(metadata["units"]),
                   llm_hidden=int(metadata["llm_hidden"]),
                   # files made before the rope settings were recorded came from LLMs with plain rope
                   rope_parameters=json.loads(metadata.get("rope_parameters", "{}"))
                   or {"rope_type": "default", "rope_theta": float(metadata["rope_theta"])},
                   max_position_embeddings=int(metadata.get("max_position_embeddings", 8192)))

    def __len__(self) -> int:
        return len(self.heldout)

    def tokens(self, index: int) -> slice:
        return slice(int(self.token_offsets[index]), int(self.token_offsets[index + 1]))

    def unit_targets(self, index: int) -> torch.Tensor:
        return self.units[int(self.unit_offsets[index]) : int(self.unit_offsets[index + 1])]

    def embeddings(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `token_ids` (every id in the file has one)."""
        return self.embed_rows[torch.searchsorted(self.embed_ids, token_ids)]

    def inputs(self, index: int, token_embedding: bool) -> torch.Tensor:
        """(tokens, llm_hidden or 2 * llm_hidden) decoder input of one sample, in float32."""
        part = self.tokens(index)
        hidden = self.hidden[part].float()
        if not token_embedding:
            return hidden
        return torch.cat([hidden, self.embeddings(self.token_ids[part]).float()], dim=-1)
