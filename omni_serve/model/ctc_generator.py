"""Streaming CTC speech-unit decoder (LLaMA-Omni's `speech_generator`).

Attribute names equal the checkpoint keys (`input_proj`, `layers.N.self_attn.q_proj`, ...), so
loading is a plain `load_state_dict`. The decoder is causal, so it runs incrementally: each new
LLM hidden state adds `upsample_factor` positions that attend to a key/value cache of everything
before them. The units for earlier tokens never change, which is what makes streaming exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, PreTrainedTokenizerBase
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from omni_serve.model.number_places import NumberPlaces


class RMSNorm(nn.Module):
    """Llama's RMSNorm (computed in float32, as the checkpoint was trained)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn, bias=False)
        self.up_proj = nn.Linear(dim, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class DecoderCache:
    """Keys and values of every decoder layer for one stream; `length` positions so far.

    They live at the start of buffers that grow by doubling, so a step writes only its own positions
    instead of copying the whole history (which made long answers cost O(length) per token).
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (1, heads, new, dim) keys and values after the first `length`; return all of them."""
        end = self.length + k.shape[2]
        if layer == len(self.keys):
            self.keys.append(k.new_empty(*k.shape[:2], max(end, 64), k.shape[3]))
            self.values.append(v.new_empty(*v.shape[:2], max(end, 64), v.shape[3]))
        elif end > self.keys[layer].shape[2]:
            capacity = max(end, 2 * self.keys[layer].shape[2])
            self.keys[layer] = _grown(self.keys[layer], self.length, capacity)
            self.values[layer] = _grown(self.values[layer], self.length, capacity)
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def _grown(buffer: torch.Tensor, used: int, capacity: int) -> torch.Tensor:
    bigger = buffer.new_empty(*buffer.shape[:2], capacity, buffer.shape[3])
    bigger[:, :, :used] = buffer[:, :, :used]
    return bigger


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[DecoderCache] | None,
                layer: int, repeats: int = 1) -> torch.Tensor:
        """Causal attention over each row's cache (if any) and its new positions; extends the caches.

        With `repeats` > 1, each position of `x` stands for that many identical positions: their
        projections are computed once and copied (rotary positions still tell the copies apart).
        """
        batch, length = x.shape[0], x.shape[1] * repeats
        shape = (batch, length, self.heads, self.head_dim)
        q, k, v = (proj(x).repeat_interleave(repeats, dim=1) if repeats > 1 else proj(x)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if caches is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1)
        else:  # rows have histories of different lengths: attend row by row
            rows = []
            for row, cache in enumerate(caches):
                offset = cache.length
                keys, values = cache.extend(layer, k[row : row + 1], v[row : row + 1])
                if offset == 0:
                    rows.append(F.scaled_dot_product_attention(q[row : row + 1], keys, values, is_causal=length > 1))
                else:
                    query_pos = torch.arange(offset, offset + length, device=x.device)[:, None]
                    mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= query_pos
                    rows.append(F.scaled_dot_product_attention(q[row : row + 1], keys, values, attn_mask=mask))
            out = torch.cat(rows) if len(rows) > 1 else rows[0]
        out = out.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class SpellingAttention(nn.Module):
    """Each upsampled position attends to the characters of its own token (and of its neighbours).

    The LLM's hidden state and token embedding say what a token means, not how it is written, so a
    decoder trained on a few thousand sentences speaks words it never saw as noise. Spelling is
    what pronunciation follows; reading it lets the decoder learn letter-to-sound rules that carry
    over to unseen words. Characters are the token's lower-cased UTF-8 bytes + 1 (0 pads); with a
    spelling context, the neighbours' characters follow the token's own in `length`.
    """

    def __init__(self, dim: int, heads: int, length: int) -> None:
        super().__init__()
        self.heads = heads
        self.length = length
        self.char_embed = nn.Embedding(257, dim)
        self.char_position_embed = nn.Embedding(length, dim)
        self.norm = RMSNorm(dim, 1e-5)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, spelling: torch.Tensor) -> torch.Tensor:
        """`x` (batch, tokens * per_token, dim), `spelling` (batch, tokens, length): what to add to `x`."""
        batch, tokens, _ = spelling.shape
        per_token = x.shape[1] // tokens
        head_dim = x.shape[-1] // self.heads
        chars = self.char_embed(spelling) + self.char_position_embed.weight.to(x.dtype)
        chars = chars.to(x.dtype).view(batch * tokens, self.length, -1)
        q = self.q_proj(self.norm(x)).view(batch * tokens, per_token, self.heads, head_dim).transpose(1, 2)
        k, v = (proj(chars).view(batch * tokens, self.length, self.heads, head_dim).transpose(1, 2)
                for proj in (self.k_proj, self.v_proj))
        mask = spelling.view(batch * tokens, 1, 1, self.length) != 0
        mask[..., 0] = True  # a token with no characters attends to the padding embedding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


def token_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The text of every token id, decoded once (half a second for SmolLM2's 49,152) for the spelling
    table and the number places. Special tokens (end of turn) are not spoken and read as ""."""
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return ["" if i in special else text for i, text in enumerate(texts)]


def token_spellings(texts: list[str], rows: int, length: int) -> torch.Tensor:
    """(rows, length) characters of every token id (`token_texts`) for `SpellingAttention`: lower-cased
    UTF-8 bytes + 1 of the token's text, cut to `length`, padded with 0. Ids past the tokenizer's
    stay empty."""
    spelled = [[byte + 1 for byte in text.lower().encode("utf-8")[:length]] for text in texts[:rows]]
    padded = [chars + [0] * (length - len(chars)) for chars in spelled]
    padded += [[0] * length] * (rows - len(padded))
    return torch.tensor(padded, dtype=torch.long)


def spelling_windows(token_ids: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(batch, N) token ids -> (batch, N, 1 + after + before): each token, then the `after` tokens that
    follow it, then the `before` that precede it (nearest first); -1 (no token) past either end and
    where `token_ids` holds -1 (padding)."""
    padded = F.pad(token_ids, (before, after), value=-1)
    length = token_ids.shape[1]
    offsets = [0, *range(1, after + 1), *range(-1, -before - 1, -1)]
    return torch.stack([padded[:, before + offset : before + offset + length] for offset in offsets], dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = CausalSelfAttention(config.hidden_size, config.num_attention_heads)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[DecoderCache] | None,
                layer: int, repeats: int = 1) -> torch.Tensor:
        """One layer; `repeats` > 1 means every position of `x` stands for that many identical ones."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, caches, layer, repeats)
        x = (x.repeat_interleave(repeats, dim=1) if repeats > 1 else x) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class CTCSpeechGenerator(nn.Module):
    """LLM hidden states -> CTC unit logits, `upsample_factor` positions per hidden state.

    Three options, all off in the published model (whose checkpoint and outputs they leave unchanged):
    `token_embedding` doubles the input to [hidden state ; embedding of the token it chose], because
    the hidden state alone does not say which token was sampled (units then lag one token); the
    caller concatenates the two. `token_positions` adds a learned embedding of each position's index
    within its token's `upsample_factor` positions, which rotary positions alone do not expose.
    `token_spelling` (characters per token, 0 for none) lets every position read the chosen token's
    characters (`SpellingAttention`); the caller passes the tokens' rows of the spelling table
    (`spelling_rows`: their ids, or for digits spelled by place the rows of `NumberPlaces`), and the
    table is set once with `spell_tokens` (or `set_spellings`). `spelling_context` (before, after)
    also lets it read that many neighbouring tokens' characters: a word split over several tokens
    ("approx", "imately") is pronounced by what follows, so with `after` > 0 a streaming caller
    holds each token back until the next ones are chosen (and a number's digits until it ends).
    """

    def __init__(self, llm_hidden: int, layer_config: LlamaConfig, upsample_factor: int, unit_vocab_size: int,
                 token_embedding: bool = False, token_positions: bool = False, token_spelling: int = 0,
                 spelling_context: tuple[int, int] = (0, 0)) -> None:
        super().__init__()
        if token_spelling and not token_positions:
            raise ValueError("token_spelling needs token_positions: the positions of a token must differ to read its characters")
        if any(spelling_context) and not token_spelling:
            raise ValueError("spelling_context needs token_spelling")
        dim = layer_config.hidden_size
        self.upsample_factor = upsample_factor
        self.spelling_context = (int(spelling_context[0]), int(spelling_context[1]))
        self.blank_id = unit_vocab_size
        self.input_proj = nn.Linear(llm_hidden * (2 if token_embedding else 1), dim)
        if token_positions:
            self.token_position_embed = nn.Embedding(upsample_factor, dim)
        if token_spelling:
            window = 1 + sum(self.spelling_context)
            self.spelling_attn = SpellingAttention(dim, layer_config.num_attention_heads, token_spelling * window)
            self.register_buffer("spellings", torch.zeros((0, token_spelling), dtype=torch.long), persistent=False)
        self.number_places: NumberPlaces | None = None
        self.layers = nn.ModuleList(DecoderLayer(layer_config) for _ in range(layer_config.num_hidden_layers))
        self.output_proj = nn.Linear(dim, unit_vocab_size + 1)
        inv_freq, self.rope_scaling = _rope_frequencies(layer_config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def spell_tokens(self, tokenizer: PreTrainedTokenizerBase, rows: int, number_places: bool = False) -> None:
        """Spell the first `rows` token ids of `tokenizer` (`set_spellings`), digits by their place if
        `number_places`; the vocabulary is decoded once for both."""
        texts = token_texts(tokenizer)
        table = token_spellings(texts, rows, self.spellings.shape[1])
        self.set_spellings(table, NumberPlaces.from_texts(texts, len(table)) if number_places else None)

    def set_spellings(self, table: torch.Tensor, number_places: NumberPlaces | None = None) -> None:
        """The (vocabulary, token_spelling) table of `token_spellings` that token ids are read through,
        with `number_places`' rows after it when digits are spelled by their place; an empty row is
        added last, so that id -1 (no token) reads as nothing."""
        rows = [table] if number_places is None else [table, number_places.spellings(table.shape[1])]
        if number_places is not None and number_places.first_row != len(table):
            raise ValueError("the place rows of number_places must follow the token table")
        self.spellings = torch.cat([*rows, table.new_zeros(1, table.shape[1])]).to(self.spellings.device)
        self.number_places = number_places

    def spelling_rows(self, token_ids: Sequence[int]) -> list[int]:
        """The spelling-table row of each token of a sequence (its id, unless it is a digit spelled by
        its place; the sequence's end closes a number)."""
        return list(token_ids) if self.number_places is None else self.number_places.rows(token_ids)

    def settled_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of an unfinished sequence have their final spelling row."""
        return len(token_ids) if self.number_places is None else self.number_places.settled(token_ids)

    def forward(self, hidden: torch.Tensor, cache: DecoderCache | list[DecoderCache] | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, N * upsample_factor, units + 1) for N new hidden states per row.

        Without a cache the rows are whole sequences (the reference's full run). With one cache per
        row (a single cache for one row), each row continues its own stream and its cache is
        extended in place; the rows' linear layers run as one batch. `token_ids`, needed with
        `token_spelling` only: (batch, N) the spelling rows of the tokens the states chose
        (`spelling_rows`), or with a spelling context (batch, N, window) their `spelling_windows`.
        """
        caches = [cache] if isinstance(cache, DecoderCache) else cache
        x = self.input_proj(hidden.to(self.input_proj.weight.dtype))
        # The upsampled positions of one hidden state are identical until the first attention mixes
        # in their rotary positions, so the first layer computes its projections once per state.
        repeats = self.upsample_factor
        if hasattr(self, "token_position_embed"):  # every hidden state adds exactly upsample_factor positions
            x = x.repeat_interleave(repeats, dim=1)
            x = x + self.token_position_embed.weight.repeat(hidden.shape[1], 1).to(x.dtype)
            repeats = 1
        if hasattr(self, "spelling_attn"):
            if token_ids is None or len(self.spellings) == 0:
                raise ValueError("this decoder reads token spellings: pass token_ids and call set_spellings first")
            window = token_ids if token_ids.dim() == 3 else token_ids.unsqueeze(-1)
            if window.shape[-1] != 1 + sum(self.spelling_context):
                raise ValueError(f"this decoder reads {1 + sum(self.spelling_context)} tokens' spellings per token")
            spelling = self.spellings[window.to(self.spellings.device)]
            x = x + self.spelling_attn(x, spelling.flatten(-2))
        starts = [c.length for c in caches] if caches is not None else [0]
        steps = torch.arange(hidden.shape[1] * self.upsample_factor, device=x.device, dtype=torch.float32)
        positions = torch.tensor(starts, device=x.device, dtype=torch.float32)[:, None] + steps  # (rows, new)
        freqs = positions[..., None] * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # (rows, 1, new, head_dim)
        cos = (angles.cos() * self.rope_scaling).to(x.dtype)
        sin = (angles.sin() * self.rope_scaling).to(x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, caches, index, repeats if index == 0 else 1)
        for c in caches or []:
            c.length += x.shape[1]
        return self.output_proj(x)


def _rope_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Rotary inverse frequencies with the LLM's rope settings (llama3 scaling for the published model)."""
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    if rope_type == "default":
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, None)  # None: the device being built on (torch.device context)


def ctc_collapse(frames: list[int], blank_id: int, previous: int | None = None) -> list[int]:
    """CTC decoding of argmax frames: merge repeats, drop blanks.

    `previous` is the last frame of the preceding chunk, so a repeat that spans two streaming steps
    is one unit, and a blank between two equal frames keeps them apart.
    """
    units = []
    for frame in frames:
        if frame != previous and frame != blank_id:
            units.append(frame)
        previous = frame
    return units
