"""espeak-ng phonemes as speech units, and espeak-ng as the vocoder that speaks them.

The embedded default model cannot ship HuBERT units and a HiFi-GAN; its units are espeak-ng's
en-us phoneme mnemonics (70, plus 2 stress marks, a word boundary and a pause: 74 units), and its
vocoder feeds them back to espeak-ng as `[[...]]` phoneme input. Both sit behind the same
`UnitStream` / `UnitVocoder` interfaces as the CTC decoder and the HiFi-GAN, so the engine's
streaming, chunking and serving are shared.

The text-driven unit stream phonemizes each word of the answer as soon as it is complete: one
espeak-ng call per new word (a few ms, cached), so units follow the text with one token of delay.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from scipy.signal import resample_poly

from omni_serve.model.audio import SAMPLE_RATE
from omni_serve.model.errors import CheckpointError

ESPEAK_SAMPLE_RATE = 22_050
RESAMPLE_UP, RESAMPLE_DOWN = 320, 441  # 22050 Hz * 320 / 441 = 16000 Hz
PHONEME_SEPARATOR = "+"  # never part of an en-us mnemonic; `_` would clash with the pause `_:`
STRESS_UNITS = ("'", ",")
WORD_BOUNDARY = "|"
PAUSE = "_"
# espeak-ng 1.51 en-us phoneme mnemonics, collected from its output over the LLM's whole vocabulary.
PHONEMES = (
    "@", "@-", "@2", "@L", "0", "3", "3:", "?", "A:", "A@", "A~", "D", "E", "I", "I#", "I2", "N", "O", "O2",
    "O:", "O@", "OI", "S", "T", "U", "U@", "V", "Z", "a", "a#", "a:", "aa", "aI", "aI3", "aI@", "aU", "b", "d",
    "dZ", "e@", "eI", "f", "g", "h", "i", "i:", "i@", "i@3", "j", "k", "l", "m", "n", "n-", "o", "o@", "oU", "p",
    "r", "r-", "s", "t", "t#", "t2", "tS", "u:", "v", "w", "x", "z",
)
UNIT_INVENTORY = STRESS_UNITS + PHONEMES + (WORD_BOUNDARY, PAUSE)
PAUSE_MNEMONICS = ("_:", "_!", "_|", "_")  # espeak's pauses of several lengths; all become one unit
CLAUSE_PUNCTUATION = ".,;:!?"
FOLLOWER = "bob"  # a stressed word that espeak never merges with the one before it
MARKDOWN = re.compile(r"[*#`~]+")  # chat answers use markdown; espeak would read "asterisk"
WORD_GAP_S = 0.04  # silence after a streamed chunk that ends between words
PAUSE_GAP_S = 0.25  # ... and after one that ends a clause
HOLD_AHEAD_S = 2.0  # audio in hand above which a streamed chunk waits for its clause to end
SILENCE_LEVEL = 1e-3
TIMEOUT_S = 30


@dataclass(frozen=True)
class EspeakSettings:
    """Voice, speed and unit inventory: config.json's `omni_serve.espeak` and `omni_serve.units`."""

    voice: str = "en-us"
    speed: int = 150  # words per minute; Whisper hears espeak better below its default 175
    pitch: int = 50
    units: tuple[str, ...] = UNIT_INVENTORY

    @classmethod
    def from_extras(cls, extras: dict[str, Any]) -> EspeakSettings:
        voice = extras.get("espeak", {})
        return cls(voice=voice.get("voice", "en-us"), speed=int(voice.get("speed", 150)),
                   pitch=int(voice.get("pitch", 50)), units=tuple(extras.get("units", UNIT_INVENTORY)))

    def as_extras(self) -> dict[str, Any]:
        return {"espeak": {"voice": self.voice, "speed": self.speed, "pitch": self.pitch}, "units": list(self.units)}


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise CheckpointError("this model speaks with espeak-ng, which is not installed (apt-get install espeak-ng)")
    return path


def run_espeak(arguments: list[str], text: str) -> bytes:
    """One espeak-ng call with `text` on stdin (so text starting with '-' is never read as an option)."""
    result = subprocess.run([espeak_binary(), *arguments, "--stdin"], input=text.encode(), capture_output=True,
                            timeout=TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def split_mnemonics(token: str, phonemes: frozenset[str]) -> list[str]:
    """Longest-match split of one espeak phoneme token into units; a character that fits nothing is dropped."""
    units, start = [], 0
    while start < len(token):
        if token[start] in STRESS_UNITS:
            units.append(token[start])
            start += 1
            continue
        pause = next((p for p in PAUSE_MNEMONICS if token.startswith(p, start)), None)
        if pause is not None:
            units.append(PAUSE)
            start += len(pause)
            continue
        match = next((token[start:end] for end in range(len(token), start, -1) if token[start:end] in phonemes), None)
        if match is not None:
            units.append(match)
        start += len(match) if match else 1
    return units


def tidy(units: list[str], previous: str | None = None) -> list[str]:
    """No repeated boundaries or pauses, no boundary before a pause, none at the start.

    `previous` is the last unit already emitted, so a stream can tidy piece by piece.
    """
    result: list[str] = []
    last = previous
    for unit in units:
        if unit in (WORD_BOUNDARY, PAUSE):
            if last is None or last == PAUSE or (last == WORD_BOUNDARY and unit == WORD_BOUNDARY):
                continue
            if unit == PAUSE and last == WORD_BOUNDARY and result:
                result[-1] = PAUSE
                continue
        result.append(unit)
        last = unit
    return result


class EspeakPhonemizer:
    """Text -> unit names, through `espeak-ng -x`; words are cached because answers repeat them."""

    def __init__(self, settings: EspeakSettings) -> None:
        self.settings = settings
        self.phonemes = frozenset(settings.units) - {WORD_BOUNDARY, PAUSE, *STRESS_UNITS}
        self.follower = self._phonemize(FOLLOWER)
        self.word = lru_cache(maxsize=16384)(self._word)

    def text(self, text: str) -> list[str]:
        """Units of a whole text (one espeak call): words end with `|`, clauses with `_`."""
        return tidy(self._phonemize(text))

    def _word(self, word: str) -> list[str]:
        """Units of one word as spoken inside a sentence.

        Alone, a word ends its clause and espeak stresses it ("of" -> 'Vv, "a" -> 'eI). So the word
        is phonemized with a fixed follower word, whose units are then cut off again.
        """
        units = self._phonemize(f"{word} {FOLLOWER}")
        if units[-len(self.follower):] != self.follower:
            return tidy(self._phonemize(word))  # espeak joined the two words; take the word alone
        units = units[: -len(self.follower)]
        if word and word[-1] in CLAUSE_PUNCTUATION:
            units.append(PAUSE)
        return tidy(units)

    def _phonemize(self, text: str) -> list[str]:
        clean = MARKDOWN.sub(" ", text).strip()
        if not clean:
            return []
        output = run_espeak(["-q", "-x", f"--sep={PHONEME_SEPARATOR}", "-v", self.settings.voice], clean).decode()
        units: list[str] = []
        for line in output.splitlines():
            for word in line.split():
                for token in word.split(PHONEME_SEPARATOR):
                    units.extend(split_mnemonics(token, self.phonemes))
                units.append(WORD_BOUNDARY)
            units.append(PAUSE)
        if units and clean[-1] not in CLAUSE_PUNCTUATION and units[-1] == PAUSE:
            units.pop()  # a line end that the text did not ask for
        return units


@lru_cache(maxsize=8)
def phonemizer_for(settings: EspeakSettings) -> EspeakPhonemizer:
    """One phonemizer (and word cache) per settings, shared by every request of a model."""
    return EspeakPhonemizer(settings)


class EspeakTextUnitStream:
    """Units from the answer's text: the phonemes of each word once the word is complete.

    A word is complete when whitespace follows it (or the answer ends); punctuation stays with its
    word (so "U.S." and "3.14" are read whole, and a clause end adds a pause).
    """

    def __init__(self, settings: EspeakSettings) -> None:
        self.phonemizer = phonemizer_for(settings)
        self.index = {unit: i for i, unit in enumerate(settings.units)}
        self.pending = ""
        self.last_unit: str | None = None

    def push(self, hidden: torch.Tensor, token_id: int, text: str) -> list[int]:
        self.pending += text
        cut = max(self.pending.rfind(space) for space in (" ", "\n", "\t"))
        if cut < 0:
            return []
        complete, self.pending = self.pending[:cut], self.pending[cut + 1 :]
        return self._units(complete.split())

    def finish(self) -> list[int]:
        words, self.pending = self.pending.split(), ""
        return self._units(words)

    def _units(self, words: list[str]) -> list[int]:
        names: list[str] = []
        for word in words:
            names.extend(self.phonemizer.word(word))
            names.append(WORD_BOUNDARY)
        names = tidy(names, self.last_unit)
        if names:
            self.last_unit = names[-1]
        return [self.index[name] for name in names]


def units_to_phoneme_text(names: list[str]) -> str:
    """espeak-ng `[[...]]` input for unit names: stress marks stay before their vowel."""
    pieces = []
    for name in names:
        pieces.append(" " if name == WORD_BOUNDARY else ("_: " if name == PAUSE else name))
    return "[[" + "".join(pieces).strip() + "]]"


def wav_samples(data: bytes) -> np.ndarray:
    """Samples of espeak-ng's `--stdout` wav (its header's sizes are placeholders, so read to the end)."""
    start = data.find(b"data")
    if start < 0:
        raise RuntimeError("espeak-ng wrote no wav data")
    payload = data[start + 8 :]
    return np.frombuffer(payload[: len(payload) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0


def trim_leading_silence(samples: np.ndarray) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > SILENCE_LEVEL)
    return samples[loud[0] :] if loud.size else samples[:0]


class EspeakVocoder:
    """Speaks phoneme units with espeak-ng and returns 16 kHz audio, like every other model's vocoder."""

    sample_rate = SAMPLE_RATE

    def __init__(self, settings: EspeakSettings = EspeakSettings()) -> None:
        espeak_binary()  # fail at load time, not at the first answer
        self.settings = settings
        self.names = settings.units

    def stream(self) -> EspeakVocoderStream:
        return EspeakVocoderStream(self)

    def vocode(self, units: list[int]) -> np.ndarray:
        return self.speak([self.names[u] for u in units if 0 <= u < len(self.names)], final=True)

    def speak(self, names: list[str], final: bool) -> np.ndarray:
        """One espeak-ng call. A non-final chunk has no closing pause (`-z`) and gets a short gap instead."""
        if not any(name in self.settings.units and name not in (WORD_BOUNDARY, PAUSE) for name in names):
            return np.zeros(0, dtype=np.float32)
        arguments = ["-v", self.settings.voice, "-s", str(self.settings.speed), "-p", str(self.settings.pitch),
                     "--stdout"] + ([] if final else ["-z"])
        audio = wav_samples(run_espeak(arguments, units_to_phoneme_text(names)))
        audio = resample_poly(trim_leading_silence(audio), RESAMPLE_UP, RESAMPLE_DOWN).astype(np.float32)
        if not final:
            gap = PAUSE_GAP_S if names[-1] == PAUSE else WORD_GAP_S
            audio = np.concatenate([audio, np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32)])
        return audio


class EspeakVocoderStream:
    """Speaks whole words as they arrive, and whole clauses once the listener has audio in hand.

    Each espeak-ng call is read as a sentence of its own (its own intonation and a falling end), so a
    chunk that stops mid-clause puts a sentence's end inside a clause: on the quality benchmark's
    40 answers, Whisper misheard 22.1% of the learned generator's words spoken in the engine's
    40-unit chunks, 19.3% when later chunks ended at clause ends, 18.2% spoken in one call (on
    other answers it made no difference; the model card has both). So while more than
    `HOLD_AHEAD_S` of audio is in hand, units after the last clause end wait for it to finish; with
    less (the first chunk, a slow decode) every complete word is spoken at once, so prosody never
    costs the listener a wait.
    """

    def __init__(self, vocoder: EspeakVocoder, clock: Callable[[], float] = time.monotonic) -> None:
        self.vocoder = vocoder
        self.clock = clock
        self.pending: list[str] = []
        self.started_at: float | None = None  # when the first audio left
        self.spoken_s = 0.0

    def push(self, units: list[int], final: bool) -> np.ndarray:
        names = self.vocoder.names
        self.pending.extend(names[u] for u in units if 0 <= u < len(names))
        cut = len(self.pending) if final else self._cut()
        ready, self.pending = self.pending[:cut], self.pending[cut:]
        audio = self.vocoder.speak(ready, final) if ready else np.zeros(0, dtype=np.float32)
        if audio.size:
            if self.started_at is None:
                self.started_at = self.clock()
            self.spoken_s += audio.size / SAMPLE_RATE
        return audio

    def in_hand_s(self) -> float:
        """Audio sent but not yet played, if playback began when the first audio left."""
        return 0.0 if self.started_at is None else self.spoken_s - (self.clock() - self.started_at)

    def _cut(self) -> int:
        """How many pending units to speak now: up to the last clause end, or the last word end."""
        stops = (PAUSE,) if self.in_hand_s() > HOLD_AHEAD_S else (WORD_BOUNDARY, PAUSE)
        ends = [i for i, name in enumerate(self.pending) if name in stops]
        return ends[-1] + 1 if ends else 0
