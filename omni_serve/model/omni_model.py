"""The LLaMA-Omni network: Llama LLM + speech adaptor + CTC speech generator.

Attribute names mirror the published checkpoint (`model.layers...`, `model.speech_projector...`,
`lm_head`, `speech_generator...`), so weights load with `load_state_dict`. The model exposes single
steps (prefill a prompt, decode tokens); the generation loop lives in the engine.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, LlamaModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from omni_serve.model.adaptor import SpeechProjector
from omni_serve.model.config import SPEECH_PLACEHOLDER_ID, OmniConfig
from omni_serve.model.ctc_generator import CTCSpeechGenerator

# transformers 5.24 renamed the models' `past_key_values` argument to `cache` (the old name works, with a
# warning, until 5.40). The wrong name is not an error: **kwargs swallows it and every step runs uncached.
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class StepOutput:
    """Logits of the next token and the final-norm hidden state that produced them, per sequence."""

    logits: torch.Tensor  # (batch, vocab), float32
    hidden: torch.Tensor  # (batch, hidden)


class OmniLlamaModel(LlamaModel):
    """transformers' LlamaModel with the speech adaptor beside its layers (as `model.speech_projector`)."""

    def __init__(self, config: OmniConfig) -> None:
        super().__init__(config.llm)
        if config.front_end == "encoder_adaptor":
            self.speech_projector = SpeechProjector(
                config.speech_encoder_hidden_size, config.llm.hidden_size, config.speech_encoder_ds_rate
            )

    def extend(self, cache: DynamicCache, **inputs: torch.Tensor | None) -> BaseModelOutputWithPast:
        """Run new positions (`input_ids` or `inputs_embeds`, masks, positions) and append them to `cache`."""
        return self(**inputs, **{CACHE_ARGUMENT: cache}, use_cache=True)


class OmniSpeechLlama(nn.Module):
    """LLM with a speech-embedding splice and a streaming speech-unit head."""

    def __init__(self, config: OmniConfig) -> None:
        super().__init__()
        self.config = config
        self.model = OmniLlamaModel(config)
        self.lm_head = nn.Linear(config.llm.hidden_size, config.llm.vocab_size, bias=False)
        if config.unit_generator == "ctc" and config.ctc_decoder is not None:
            self.speech_generator = CTCSpeechGenerator(
                config.llm.hidden_size, config.ctc_layer_config(), config.ctc_upsample_factor, config.unit_vocab_size,
                token_embedding=config.ctc_token_embedding, token_positions=config.ctc_token_positions,
                token_spelling=config.ctc_token_spelling, spelling_context=config.ctc_spelling_context,
            )

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config.llm)

    def embed_prompt(self, input_ids: list[int], speech: list[torch.Tensor]) -> torch.Tensor:
        """Token embeddings with each -200 placeholder replaced by one speech segment: (1, length, hidden).

        Speech segments are consumed in order; a prompt with more placeholders than segments is an error.
        """
        placeholders = [i for i, token in enumerate(input_ids) if token == SPEECH_PLACEHOLDER_ID]
        if len(placeholders) != len(speech):
            raise ValueError(f"prompt has {len(placeholders)} speech placeholders but {len(speech)} speech inputs")
        embed = self.model.embed_tokens
        pieces, start = [], 0
        for position, segment in zip(placeholders, speech):
            pieces.append(embed(self._ids(input_ids[start:position])))
            pieces.append(segment.to(embed.weight.dtype))
            start = position + 1
        pieces.append(embed(self._ids(input_ids[start:])))
        return torch.cat(pieces, dim=0).unsqueeze(0)

    def step(self, inputs_embeds: torch.Tensor, cache: DynamicCache, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> StepOutput:
        """Run new positions through the LLM, extending `cache`; return the last position's logits and hidden."""
        output = self.model.extend(cache, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids)
        hidden = output.last_hidden_state[:, -1]
        return StepOutput(logits=self.lm_head(hidden).float(), hidden=hidden)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(token_ids)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.lm_head.weight.device)
