"""The decode batch: KV caches of all active requests side by side, left-padded to one length.

Requests join after their own prefill and leave when done, so rows have different lengths; an
attention mask hides each row's padding and position ids continue each row's own count, which
makes a batched step compute what an unbatched step would.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are the used part of buffers that grow by doubling.

    DynamicLayer concatenates at every update, copying the whole cache of every row and layer each
    decode step (a third of a batched step's time at 8 rows); this writes only the new positions.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.keys.shape[-2] if self.keys.numel() else 0
        end = used + key_states.shape[-2]
        if used == 0 or end > self._key_buffer.shape[-2]:
            self._key_buffer = _grown(self.keys if used else None, key_states, 2 * end)
            self._value_buffer = _grown(self.values if used else None, value_states, 2 * end)
        self._key_buffer[..., used:end, :] = key_states
        self._value_buffer[..., used:end, :] = value_states
        self.keys, self.values = self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]
        return self.keys, self.values


def _grown(old: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
    buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
    if old is not None:
        buffer[..., : old.shape[-2], :] = old
    return buffer


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A new cache holding `tensors` (one (keys, values) pair per layer) in growing buffers."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    for keys, values in tensors:
        layer = GrowingLayer()
        layer.update(keys, values)
        cache.layers.append(layer)
    return cache


class DecodeBatch:
    """Rows of active requests: cache (B, heads, T, dim) per layer, mask (B, T), next position per row."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.positions: list[int] = []

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, cache: DynamicCache, length: int) -> None:
        """Append a prefilled request whose cache holds `length` positions."""
        tensors = cache_tensors(cache)
        device = tensors[0][0].device
        row_mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache_from_tensors(tensors), row_mask
        else:
            width = max(self.mask.shape[1], length)
            merged = [
                (torch.cat([_left_pad(bk, width), _left_pad(k, width)]), torch.cat([_left_pad(bv, width), _left_pad(v, width)]))
                for (bk, bv), (k, v) in zip(cache_tensors(self.cache), tensors)
            ]
            self.cache = cache_from_tensors(merged)
            self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(row_mask, width)])
        self.positions.append(length)

    def extend_mask(self) -> torch.Tensor:
        """Mask including the position about to be decoded."""
        ones = torch.ones(len(self), 1, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def position_ids(self) -> torch.Tensor:
        return torch.tensor(self.positions, device=self.mask.device).view(-1, 1)

    def advance(self) -> None:
        self.positions = [p + 1 for p in self.positions]

    def row_cache(self, row: int) -> DynamicCache:
        """One row's cache without its padding (to keep a conversation after the request ends)."""
        length = int(self.mask[row].sum())
        tensors = [(k[row : row + 1, :, -length:].clone(), v[row : row + 1, :, -length:].clone())
                   for k, v in cache_tensors(self.cache)]
        return cache_from_tensors(tensors)

    def remove(self, rows: list[int]) -> None:
        """Drop finished rows and the padding columns no remaining row needs."""
        keep = [i for i in range(len(self)) if i not in set(rows)]
        self.positions = [self.positions[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first = int(torch.nonzero(mask.any(dim=0))[0])
        self.mask = mask[:, first:]
        tensors = [(k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
                   for k, v in cache_tensors(self.cache)]
        self.cache = cache_from_tensors(tensors)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], tensor.shape[1], missing, tensor.shape[3])
    return torch.cat([pad, tensor], dim=2)


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - mask.shape[1]
    return torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1) if missing else mask
