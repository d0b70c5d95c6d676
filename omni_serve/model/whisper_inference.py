"""Whisper's decoder forward pass for beam search, with the beams of one audio sharing its keys.

openai-whisper's own `PyTorchInference` computes the cross-attention keys and values once per 30 s
window and then relies on broadcasting them over the (window x beam) rows of the decoder: with one
window the attention kernel copies them for every beam at every step (a third of the decoding time
on a CPU), and with several windows (a question longer than 30 s) the shapes do not broadcast and
decoding fails (`DecodingTask.run` also mishandles several windows with a beam after decoding, so the
transcription front end runs one window at a time). Here each window's beams are laid out as extra
query positions of that window:
cross-attention has no mask, so this is the same attention, computed once per window with no copies.
The arithmetic is Whisper's own (same modules, same order); only the batching differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from whisper.decoding import Inference
from whisper.model import MultiHeadAttention, Whisper


def _split_heads(x: Tensor, n_head: int) -> Tensor:
    return x.view(*x.shape[:2], n_head, -1).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    return x.transpose(1, 2).flatten(start_dim=2)


class SharedAudioInference(Inference):
    """Drop-in `Inference` for `whisper.decoding.DecodingTask` with a key/value cache of its own.

    Rows of `tokens` are grouped by window, as `DecodingTask` lays them out (window 0's beams first);
    `audio_features` has one row per window.
    """

    def __init__(self, model: Whisper) -> None:
        self.decoder = model.decoder
        self.self_keys: list[Tensor] = []
        self.self_values: list[Tensor] = []
        self.cross_keys: list[Tensor] = []
        self.cross_values: list[Tensor] = []

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        decoder = self.decoder
        cached = self.self_keys[0].shape[1] if self.self_keys else 0
        if cached:
            tokens = tokens[:, cached:]
        x = decoder.token_embedding(tokens) + decoder.positional_embedding[cached:cached + tokens.shape[1]]
        x = x.to(audio_features.dtype)
        if not self.cross_keys:
            for block in decoder.blocks:
                self.cross_keys.append(block.cross_attn.key(audio_features))
                self.cross_values.append(block.cross_attn.value(audio_features))
        for layer, block in enumerate(decoder.blocks):
            x = x + self._self_attention(layer, block.attn, block.attn_ln(x))
            x = x + self._cross_attention(layer, block.cross_attn, block.cross_attn_ln(x))
            x = x + block.mlp(block.mlp_ln(x))
        x = decoder.ln(x)
        return (x @ torch.transpose(decoder.token_embedding.weight.to(x.dtype), 0, 1)).float()

    def _self_attention(self, layer: int, attention: MultiHeadAttention, x: Tensor) -> Tensor:
        query, key, value = attention.query(x), attention.key(x), attention.value(x)
        first_pass = len(self.self_keys) <= layer
        if first_pass:
            self.self_keys.append(key)
            self.self_values.append(value)
        else:
            key = self.self_keys[layer] = torch.cat([self.self_keys[layer], key], dim=1)
            value = self.self_values[layer] = torch.cat([self.self_values[layer], value], dim=1)
        n_head = attention.n_head
        # Causal within the first pass (the prompt tokens); a later pass adds one token, which sees all.
        out = F.scaled_dot_product_attention(_split_heads(query, n_head), _split_heads(key, n_head),
                                             _split_heads(value, n_head), is_causal=first_pass and x.shape[1] > 1)
        return attention.out(_merge_heads(out))

    def _cross_attention(self, layer: int, attention: MultiHeadAttention, x: Tensor) -> Tensor:
        windows = self.cross_keys[layer].shape[0]
        rows, length, width = x.shape
        query = attention.query(x).reshape(windows, rows // windows * length, width)
        n_head = attention.n_head
        out = F.scaled_dot_product_attention(_split_heads(query, n_head),
                                             _split_heads(self.cross_keys[layer], n_head),
                                             _split_heads(self.cross_values[layer], n_head))
        return attention.out(_merge_heads(out).reshape(rows, length, width))

    def rearrange_kv_cache(self, source_indices: list[int]) -> None:
        if source_indices != list(range(len(source_indices))):
            index = torch.tensor(source_indices, device=self.self_keys[0].device)
            self.self_keys = [key.index_select(0, index) for key in self.self_keys]
            self.self_values = [value.index_select(0, index) for value in self.self_values]

    def cleanup_caching(self) -> None:
        self.self_keys, self.self_values, self.cross_keys, self.cross_values = [], [], [], []
