"""Load a model folder in the published LLaMA-Omni layout into one ready-to-run bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights

from omni_serve.model.config import OmniConfig
from omni_serve.model.errors import CheckpointError
from omni_serve.model.front_end import EncoderAdaptorFrontEnd, SpeechFrontEnd
from omni_serve.model.omni_model import OmniSpeechLlama
from omni_serve.model.prompt import PromptTemplate, template_from_config, tokenize_speech_prompt
from omni_serve.model.speech_encoder import load_audio_encoder, resolve_speech_encoder
from omni_serve.model.units import CTCUnitStream, UnitStream, UnitVocoder, build_vocoder

IGNORED_PREFIXES = ("model.speech_encoder.",)  # the Whisper file is authoritative, as in the reference
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class OmniModel:
    """Everything needed to answer speech: network, tokenizer, front end, prompt format, vocoder."""

    config: OmniConfig
    tokenizer: PreTrainedTokenizerBase
    network: OmniSpeechLlama
    front_end: SpeechFrontEnd
    template: PromptTemplate
    vocoder: UnitVocoder | None
    device: torch.device
    name: str

    @property
    def end_token_ids(self) -> frozenset[int]:
        """Tokens that end an answer: the config's EOS ids and the tokenizer's own."""
        return frozenset(self.config.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in the prompt: the tokenizer's EOS, else the lowest
        of `end_token_ids`."""
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.end_token_ids)

    def new_unit_stream(self) -> UnitStream:
        """A fresh per-request unit generator of the kind the config names."""
        if self.config.unit_generator == "ctc":
            embeddings = self.network.model.embed_tokens if self.config.ctc_token_embedding else None
            unspoken = frozenset() if self.config.ctc_decode_end_token else self.end_token_ids
            return CTCUnitStream(self.network.speech_generator, embeddings, unspoken)
        from omni_serve.model.espeak import EspeakSettings, EspeakTextUnitStream

        return EspeakTextUnitStream(EspeakSettings.from_extras(self.config.extras))


def pick_dtype(device: torch.device, requested: str | None, cpu_preference: str | None = None) -> torch.dtype:
    """The requested type, or for "auto": on CUDA bf16 where supported, else fp16; on CPU fp32, unless
    the model names a `cpu_preference` (its config's `omni_serve.cpu_dtype`) that this CPU computes
    natively. A small model's decoding reads every weight for every token, so halving the bytes
    nearly halves the step; but bf16 without native instructions is emulated and slower than fp32."""
    if requested and requested != "auto":
        return named_dtype(requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if cpu_preference is not None and named_dtype(cpu_preference) == torch.bfloat16 and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def named_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the instructions oneDNN's bf16 matrix products run on."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def dtype_name(dtype: torch.dtype) -> str:
    """The name `pick_dtype` accepts back ("float32", "bfloat16"), as logs and `--dtype` spell it."""
    return str(dtype).removeprefix("torch.")


def read_safetensors(model_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded (with index) safetensors checkpoint, cast to `dtype`."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    tensors = {}
    for name in files:
        with safe_open(model_dir / name, framework="pt", device=str(device)) as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(IGNORED_PREFIXES):
                    continue
                value = handle.get_tensor(key)
                tensors[key] = value.to(dtype) if value.is_floating_point() else value
    return tensors


def load_network(config: OmniConfig, model_dir: Path, device: torch.device, dtype: torch.dtype) -> OmniSpeechLlama:
    """Build the network without random init and load its weights strictly (no missing, no unexpected keys)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            network = OmniSpeechLlama(config)
    finally:
        torch.set_default_dtype(previous)
    state = read_safetensors(model_dir, device, dtype)
    tied = config.llm.tie_word_embeddings and "lm_head.weight" not in state
    result = network.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not (tied and key == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint in {model_dir} does not match the model: missing {missing[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )
    if tied:  # share the embedding matrix instead of holding a second copy
        network.lm_head.weight = network.model.embed_tokens.weight
    return network.eval()


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    if not (model_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in {model_dir}")
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))


def build_front_end(config: OmniConfig, network: OmniSpeechLlama, tokenizer: PreTrainedTokenizerBase,
                    template: PromptTemplate, model_dir: Path, speech_encoder: str | Path | None,
                    device: torch.device, dtype: torch.dtype) -> SpeechFrontEnd:
    whisper_path = resolve_speech_encoder(config.speech_encoder, model_dir, speech_encoder)
    if config.front_end == "transcription":
        from omni_serve.model.transcription import TranscriptionFrontEnd, TranscriptionOptions

        # the LLM reads transcript candidates where the speech goes in a first turn
        first_turn = tokenize_speech_prompt(tokenizer, template.opening() + template.user_turn(), first=True)
        return TranscriptionFrontEnd.load(whisper_path, network, tokenizer, device,
                                          TranscriptionOptions.from_extras(config.extras), first_turn)
    encoder, dims = load_audio_encoder(whisper_path)
    return EncoderAdaptorFrontEnd(encoder.to(device=device, dtype=dtype), network.model.speech_projector, dims.n_mels)


def load_model(model_path: str | Path, vocoder: str | Path | None = None, speech_encoder: str | Path | None = None,
               device: str = "auto", dtype: str | None = None) -> OmniModel:
    """Load a model folder (published layout). `vocoder` overrides the folder's own `vocoder/` subfolder."""
    model_dir = Path(model_path).expanduser().resolve()
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder not found: {model_dir}")
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
    config = OmniConfig.from_file(model_dir / "config.json")
    torch_dtype = pick_dtype(torch_device, dtype, config.extras.get("cpu_dtype"))
    network = load_network(config, model_dir, torch_device, torch_dtype)
    tokenizer = load_tokenizer(model_dir)
    if config.unit_generator == "ctc" and config.ctc_token_spelling:
        network.speech_generator.spell_tokens(tokenizer, config.llm.vocab_size, config.ctc_number_places)
    template = template_from_config(config.extras)
    front_end = build_front_end(config, network, tokenizer, template, model_dir, speech_encoder, torch_device,
                                torch_dtype)
    vocoder_dir = Path(vocoder).expanduser() if vocoder else (model_dir / "vocoder" if (model_dir / "vocoder").is_dir() else None)
    unit_vocoder = build_vocoder(config, vocoder_dir, torch_device) if vocoder_dir or config.vocoder != "hifigan" else None
    return OmniModel(config=config, tokenizer=tokenizer, network=network, front_end=front_end,
                     template=template, vocoder=unit_vocoder, device=torch_device,
                     name=config.extras.get("name", model_dir.name))
