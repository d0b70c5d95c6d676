"""Incremental detokenisation: text deltas that never split a UTF-8 character.

Byte-level BPE tokens can hold part of a character; decoding them alone gives U+FFFD. We hold such
a tail back until the next token completes it (or the answer ends), so joined deltas equal the
decoded whole answer.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"
MAX_HELD_TOKENS = 4  # a UTF-8 character spans at most 4 byte tokens


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self.held = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now certain."""
        self.ids.append(token_id)
        text = self._text()
        if text.endswith(REPLACEMENT) and self.held < MAX_HELD_TOKENS:
            self.held += 1
            return ""
        self.held = 0
        return self._advance(text)

    def flush(self) -> str:
        """Everything not yet emitted (a dangling partial character becomes U+FFFD)."""
        return self._advance(self._text())

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):  # a merge changed earlier text; emit only what extends it
            common = len(self.emitted)
            text = self.emitted + text[common:]
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta
