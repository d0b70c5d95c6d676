"""Prompt ids for a turn: the model's template around speech and/or typed text, plus earlier turns.

Turns are tokenised piece by piece (opening + first user turn, answer + end-of-turn, separator + next
user turn), which is exactly how a conversation grows in the engine, so a history sent by a
stateless client and a conversation kept in the engine give the same ids.
"""

from __future__ import annotations

from omni_serve.model.errors import OmniError
from omni_serve.model.loader import OmniModel
from omni_serve.model.prompt import SPEECH_TAG, tokenize_speech_prompt


class PromptBuilder:
    def __init__(self, model: OmniModel, end_of_turn_id: int) -> None:
        self.template = model.template
        self.tokenizer = model.tokenizer
        self.end_of_turn_id = end_of_turn_id

    def user_content(self, has_audio: bool, text: str | None) -> str:
        """Speech alone uses the template's instruction; typed text goes beside the speech or alone."""
        if has_audio:
            return self.template.user_content if not text else f"{SPEECH_TAG}\n{text}"
        if not text:
            raise OmniError("a turn needs audio or text")
        return text

    def turn_ids(self, content: str, first: bool) -> list[int]:
        """User turn ids, ending with the open assistant turn; the first turn carries the opening."""
        prefix = self.template.opening() if first else self.template.after_answer
        return tokenize_speech_prompt(self.tokenizer, prefix + self.template.user_turn(content), first=first)

    def answer_ids(self, answer: str) -> list[int]:
        """An earlier answer as the model would have produced it, closed by the end-of-turn token."""
        return self.tokenizer(answer, add_special_tokens=False).input_ids + [self.end_of_turn_id]
