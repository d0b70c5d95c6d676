"""Spelling of digits by their place in a number, for a CTC decoder that reads token spellings.

An LLM that writes numbers one digit per token (SmolLM2: "149" is "1", "4", "9") gives a decoder
that reads each token's characters nothing to say whether "1" is read "one", "ten" or "one
hundred": that depends on the digits still to come. Spelled by place instead, the digits of 149
read "100", "40", "9", and those of 1,500 read "1000", ",", "500", "00", "0", which is how they are
said; digits after a decimal point are said one by one and keep their own spelling. Each place
spelling is an extra row of the decoder's spelling table, after the tokens' own rows.

A digit's place is known once its number ends, so a streaming caller holds back the digits of a
number (and a comma that may still join it) until the next token shows where it ends (`settled`).
Numbers written several digits per token (Llama 3's "149") keep their tokens' own spelling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

MAX_PLACES = 11  # a digit followed by more digits than this is spelled as if followed by this many


@dataclass(frozen=True)
class NumberPlaces:
    """Which token ids are single digits, thousands commas and decimal points, and where the place
    rows start in the spelling table (after the `first_row` rows of the tokens' own spellings)."""

    digits: dict[int, int]  # token id -> the digit it writes
    commas: frozenset[int]
    points: frozenset[int]
    first_row: int

    @classmethod
    def from_texts(cls, texts: list[str], first_row: int) -> NumberPlaces:
        """From the text of every token id (`ctc_generator.token_texts`)."""
        return cls(digits={i: int(text) for i, text in enumerate(texts) if len(text) == 1 and text in "0123456789"},
                   commas=frozenset(i for i, text in enumerate(texts) if text == ","),
                   points=frozenset(i for i, text in enumerate(texts) if text == "."),
                   first_row=first_row)

    def spellings(self, length: int) -> torch.Tensor:
        """(10 * MAX_PLACES, length) rows in the form of `token_spellings`: digit d followed by
        p zeros is row d * MAX_PLACES + p - 1."""
        rows = []
        for digit in range(10):
            for places in range(1, MAX_PLACES + 1):
                chars = [byte + 1 for byte in (str(digit) + "0" * places).encode()[:length]]
                rows.append(chars + [0] * (length - len(chars)))
        return torch.tensor(rows, dtype=torch.long)

    def rows(self, ids: Sequence[int]) -> list[int]:
        """The spelling row of each token of a whole sequence (the end closes a number): a digit of a
        number's whole part that more digits follow gets its place row, every other token its own id."""
        rows = list(ids)
        for _, _, members, decimal in self._numbers(ids):
            for k, index in enumerate([] if decimal else members):
                places = min(len(members) - 1 - k, MAX_PLACES)
                if places:
                    rows[index] = self.first_row + self.digits[ids[index]] * MAX_PLACES + places - 1
        return rows

    def settled(self, ids: Sequence[int]) -> int:
        """How many leading tokens of an unfinished sequence have their final row: all but the digits
        of a whole number that may still go on (and a comma after them that may still join it)."""
        last = None
        for last in self._numbers(ids):
            pass
        if last is None:
            return len(ids)
        start, end, _, decimal = last
        open_ended = end == len(ids) or (end == len(ids) - 1 and ids[end] in self.commas)
        return start if open_ended and not decimal else len(ids)

    def _numbers(self, ids: Sequence[int]) -> Iterator[tuple[int, int, list[int], bool]]:
        """Each number of `ids`: (first index, index after it, indices of its digits, whether it follows a
        decimal point). A comma joins digits into one number (1,500) unless it follows a decimal point."""
        start = 0
        while start < len(ids):
            if ids[start] not in self.digits:
                start += 1
                continue
            decimal = start >= 2 and ids[start - 1] in self.points and ids[start - 2] in self.digits
            members, end = [], start
            while end < len(ids):
                if ids[end] in self.digits:
                    members.append(end)
                elif decimal or ids[end] not in self.commas or end + 1 >= len(ids) or ids[end + 1] not in self.digits:
                    break
                end += 1
            yield start, end, members, decimal
            start = end
