"""The model folder's config.json, read once into typed settings.

The published checkpoint's config is a Llama config plus LLaMA-Omni's speech fields. Our own
extensions (front end, prompt format, unit generator, vocoder kind) have defaults that describe the
published model, so its config.json loads unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from omni_serve.model.errors import CheckpointError

SPEECH_PLACEHOLDER_ID = -200


@dataclass(frozen=True)
class CTCDecoderDims:
    """Shape of the streaming CTC speech decoder: `ctc_decoder_config` = "(layers,hidden,heads,ffn)"."""

    layers: int
    hidden: int
    heads: int
    ffn: int

    @classmethod
    def parse(cls, text: str) -> CTCDecoderDims:
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        if len(numbers) != 4:
            raise CheckpointError(f"ctc_decoder_config must hold 4 integers, got {text!r}")
        return cls(*numbers)


@dataclass(frozen=True)
class OmniConfig:
    """Everything the model code needs from config.json."""

    llm: LlamaConfig
    raw: dict[str, Any]
    speech_encoder: str | None
    speech_encoder_ds_rate: int
    speech_encoder_hidden_size: int
    ctc_decoder: CTCDecoderDims | None
    ctc_upsample_factor: int
    unit_vocab_size: int
    eos_token_ids: tuple[int, ...]
    front_end: str = "encoder_adaptor"  # or "transcription"
    prompt_format: str = "llama3_reference"  # or "chat_template"
    unit_generator: str = "ctc"  # or "espeak_text"
    vocoder: str = "hifigan"  # or "espeak"
    ctc_token_embedding: bool = False  # decoder input is [hidden state ; chosen token's embedding]
    ctc_token_positions: bool = False  # learned embedding of each upsampled position's index
    ctc_token_spelling: int = 0  # characters of the chosen token the decoder reads (0: none)
    ctc_spelling_context: tuple[int, int] = (0, 0)  # tokens before / after whose spelling it reads too
    ctc_number_places: bool = False  # digits spelled by their place in their number ("1" of 149 as "100")
    ctc_decode_end_token: bool = True  # the token that ends the answer is decoded too, as the reference does
    system_prompt: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> OmniConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"no config.json in {Path(path).parent}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OmniConfig:
        llm_fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type")}
        llm = LlamaConfig(**llm_fields)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        omni = raw.get("omni_serve", {})
        ctc_text = raw.get("ctc_decoder_config")
        return cls(
            llm=llm,
            raw=raw,
            speech_encoder=raw.get("speech_encoder"),
            speech_encoder_ds_rate=int(raw.get("speech_encoder_ds_rate", 5)),
            speech_encoder_hidden_size=int(raw.get("speech_encoder_hidden_size", 1280)),
            ctc_decoder=CTCDecoderDims.parse(ctc_text) if ctc_text else None,
            ctc_upsample_factor=int(raw.get("ctc_upsample_factor", 25)),
            unit_vocab_size=int(raw.get("unit_vocab_size", 1000)),
            eos_token_ids=eos_ids,
            front_end=omni.get("front_end", "encoder_adaptor"),
            prompt_format=omni.get("prompt_format", "llama3_reference"),
            unit_generator=omni.get("unit_generator", "ctc"),
            vocoder=omni.get("vocoder", "hifigan"),
            ctc_token_embedding=bool(omni.get("ctc_token_embedding", False)),
            ctc_token_positions=bool(omni.get("ctc_token_positions", False)),
            ctc_token_spelling=int(omni.get("ctc_token_spelling", 0)),
            ctc_spelling_context=tuple(int(n) for n in omni.get("ctc_spelling_context", (0, 0))),
            ctc_number_places=bool(omni.get("ctc_number_places", False)),
            ctc_decode_end_token=bool(omni.get("ctc_decode_end_token", True)),
            system_prompt=omni.get("system_prompt"),
            extras=omni,
        )

    def ctc_layer_config(self) -> LlamaConfig:
        """The decoder layers copy the LLM's rope and norm settings with the decoder's own sizes."""
        assert self.ctc_decoder is not None
        dims = self.ctc_decoder
        values = self.llm.to_dict()
        values.update(hidden_size=dims.hidden, num_attention_heads=dims.heads,
                      num_key_value_heads=dims.heads, intermediate_size=dims.ffn,
                      num_hidden_layers=dims.layers, head_dim=dims.hidden // dims.heads)
        return LlamaConfig(**values)
