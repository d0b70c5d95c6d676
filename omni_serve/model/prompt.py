"""Prompt formats and the tokenisation of prompts that hold speech placeholders.

A conversation is built turn by turn as token ids, so a new turn appends to the ids of the
previous one and the KV cache of that prefix stays valid. The first turn of the Llama-3 reference
format reproduces the reference prompt token for token (BOS twice, -200 at the placeholder).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from omni_serve.model.config import SPEECH_PLACEHOLDER_ID

SPEECH_TAG = "<speech>"
REFERENCE_SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
REFERENCE_USER_CONTENT = SPEECH_TAG + "\nPlease directly answer the questions in the user's speech."


@dataclass(frozen=True)
class PromptTemplate:
    """How a conversation is written out: system block, user turn (ending in the open assistant turn)."""

    system: str
    user: str
    after_answer: str
    system_prompt: str
    user_content: str

    def opening(self) -> str:
        return self.system.format(system=self.system_prompt)

    def user_turn(self, content: str | None = None) -> str:
        return self.user.format(content=self.user_content if content is None else content)


LLAMA3_REFERENCE = PromptTemplate(
    system="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    after_answer="",
    system_prompt=REFERENCE_SYSTEM_PROMPT,
    user_content=REFERENCE_USER_CONTENT,
)


def template_from_config(extras: dict) -> PromptTemplate:
    """The published model uses the reference's Llama-3 format; other models describe theirs in config.json."""
    spec = extras.get("prompt_template")
    if not spec:
        return LLAMA3_REFERENCE
    return PromptTemplate(
        system=spec["system"], user=spec["user"], after_answer=spec.get("after_answer", ""),
        system_prompt=spec.get("system_prompt", ""), user_content=spec.get("user_content", SPEECH_TAG),
    )


def tokenize_speech_prompt(tokenizer: PreTrainedTokenizerBase, text: str, first: bool) -> list[int]:
    """Tokenise text with `<speech>` placeholders into ids with -200 in their places.

    Each piece is tokenised with special tokens, as the reference does; the leading BOS that the
    tokenizer adds is kept on the conversation's first piece only.
    """
    bos = tokenizer.bos_token_id
    ids: list[int] = []
    for index, piece in enumerate(text.split(SPEECH_TAG)):
        piece_ids = tokenizer(piece, add_special_tokens=True).input_ids
        if (index > 0 or not first) and piece_ids and piece_ids[0] == bos and tokenizer.bos_token is not None \
                and not piece.startswith(tokenizer.bos_token):
            piece_ids = piece_ids[1:]
        if index > 0:
            ids.append(SPEECH_PLACEHOLDER_ID)
        ids.extend(piece_ids)
    return ids
