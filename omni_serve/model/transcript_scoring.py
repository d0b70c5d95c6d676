"""Choosing among Whisper's beam candidates with the LLM's judgement of each as the user's question.

Whisper tiny.en often ranks a near-miss first ("What does a remake?") while the question actually
asked is among its other beam candidates. Adding the LLM's log-likelihood of each candidate, read
where it will stand in the prompt, to Whisper's own score (n-best rescoring, a standard ASR
technique) picks the right one more often: on a development set of espeak-ng voices and questions
kept apart from the benchmark, exact transcripts rose from 31 to 41 of 66 with 10 candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from whisper.decoding import SequenceRanker

from omni_serve.model.config import SPEECH_PLACEHOLDER_ID


class TranscriptScorer:
    """The LLM's log-likelihood of a transcript standing at the speech placeholder of a first-turn prompt.

    The text before the placeholder is the condition (run once, on first use, and kept as a KV
    cache); the transcript's tokens and the token that follows it in the prompt (the end of the
    user's turn, so a question that ends well scores better than one cut off) are scored.

    All candidates go through the LLM in one pass as a token tree: the tokens they all begin with
    once, then each candidate's own tokens, with an attention mask that lets each see only the
    shared tokens and its own. On a CPU a pass costs about the same for 1 or 20 tokens (reading the
    weights dominates), so this is about as cheap as scoring one candidate. The shared tokens'
    probability is the same for every candidate and is left out of the scores.
    """

    def __init__(self, network: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        if prompt_ids.count(SPEECH_PLACEHOLDER_ID) != 1:
            raise ValueError("the scoring prompt needs exactly one speech placeholder")
        split = prompt_ids.index(SPEECH_PLACEHOLDER_ID)
        self.network = network
        self.tokenizer = tokenizer
        self.before, self.end_of_turn = prompt_ids[:split], prompt_ids[split + 1 : split + 2]
        self._prefix: tuple[torch.Tensor, DynamicCache] | None = None

    @torch.inference_mode()
    def log_likelihoods(self, texts: Sequence[str]) -> list[float]:
        """Per text, the log-probability of its tokens (tokenised as typed) and the end of turn, less
        that of the tokens every text shares at its start (the same for all)."""
        rows = [self.tokenizer(text, add_special_tokens=False).input_ids + self.end_of_turn for text in texts]
        if not any(rows):  # only empty texts and no end-of-turn token: nothing to tell them apart
            return [0.0] * len(rows)
        tree = _TokenTree(rows)
        prefix_logits, cache = self._prefix_state()
        device = prefix_logits.device
        base = len(self.before)
        hidden = prefix_logits.new_zeros(0, self.network.lm_head.in_features, dtype=self.network.lm_head.weight.dtype)
        if tree.inputs:
            try:
                hidden = self.network.model(
                    input_ids=torch.tensor([tree.inputs], device=device), cache=cache, use_cache=True,
                    position_ids=torch.tensor([tree.positions], device=device) + base,
                    attention_mask=tree.attention_mask(base, device),
                ).last_hidden_state[0]
            except BaseException:
                self._prefix = None  # the cache may hold part of this pass: rebuild it next time
                raise
            cache.crop(-len(tree.inputs))  # back to the prefix alone
        logits = torch.cat([prefix_logits, self.network.lm_head(hidden).float()])  # row 0: before any input
        log_probs = torch.log_softmax(logits[torch.tensor(tree.predictors, device=device)], dim=-1)
        scored = log_probs.gather(1, torch.tensor(tree.targets, device=device).unsqueeze(1)).squeeze(1).tolist()
        return [sum(scored[start:end]) for start, end in tree.spans]

    def _prefix_state(self) -> tuple[torch.Tensor, DynamicCache]:
        """Logits after the prompt's prefix (1, vocab) and its cache (computed on first use)."""
        if self._prefix is None:
            weight = self.network.lm_head.weight
            cache = self.network.new_cache()
            ids = torch.tensor([self.before], dtype=torch.long, device=weight.device)
            hidden = self.network.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
            self._prefix = self.network.lm_head(hidden[0, -1:]).float(), cache
        return self._prefix


class _TokenTree:
    """Candidates packed as one sequence: their common start once, then each one's remaining tokens.

    `inputs` are fed to the LLM; target k (`targets[k]`) is predicted by the logits of row
    `predictors[k]` (0: the prefix's own logits, i + 1: after input i); `spans[c]` are candidate c's
    targets. A candidate's last token is only a target, never an input.
    """

    def __init__(self, rows: list[list[int]]) -> None:
        shared = _common_prefix_length(rows)
        self.inputs = rows[0][:shared]
        self.positions = list(range(shared))
        self.owner = [-1] * shared  # -1: shared by all candidates
        self.targets: list[int] = []
        self.predictors: list[int] = []
        self.spans: list[tuple[int, int]] = []
        for candidate, row in enumerate(rows):
            begin = len(self.targets)
            before = shared  # predictor row of the candidate's next target: after the shared tokens
            for offset, token in enumerate(row[shared:]):
                self.targets.append(token)
                self.predictors.append(before)
                if shared + offset < len(row) - 1:  # not the last token: it is an input too
                    self.inputs.append(token)
                    self.positions.append(shared + offset)
                    self.owner.append(candidate)
                    before = len(self.inputs)
            self.spans.append((begin, len(self.targets)))

    def attention_mask(self, cached: int, device: torch.device) -> torch.Tensor:
        """(1, 1, inputs, cached + inputs), True where attending: the cached prefix, the shared tokens,
        and the candidate's own earlier tokens."""
        owner = torch.tensor(self.owner, device=device)
        count = owner.numel()
        causal = torch.ones(count, count, dtype=torch.bool, device=device).tril()
        related = (owner.unsqueeze(0) == -1) | (owner.unsqueeze(0) == owner.unsqueeze(1))
        mask = torch.cat([torch.ones(count, cached, dtype=torch.bool, device=device), causal & related], dim=1)
        return mask.view(1, 1, count, cached + count)


def _common_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row begins with, leaving each row at least its last token to score."""
    shortest = min(len(row) for row in rows)
    length = 0
    while length < shortest - 1 and all(row[length] == rows[0][length] for row in rows):
        length += 1
    return length


class LanguageModelRanker(SequenceRanker):
    """Whisper's maximum-likelihood ranking with `weight` x the LLM's log-likelihood added to each score.

    Like Whisper's own ranker, the joint log-probability is divided by the candidate's length in
    Whisper tokens, so longer candidates are not penalised for their length alone.
    """

    def __init__(self, decode: Callable[[list[int]], str], score: Callable[[Sequence[str]], list[float]],
                 weight: float) -> None:
        self.decode = decode
        self.score = score
        self.weight = weight

    def rank(self, tokens: list[list[torch.Tensor]], sum_logprobs: list[list[float]]) -> list[int]:
        chosen = []
        for candidates, whisper_scores in zip(tokens, sum_logprobs):
            texts = [self.decode(candidate.tolist()).strip() for candidate in candidates]
            llm_scores = self.score(texts)
            joint = [(heard + self.weight * read) / max(1, len(candidate))
                     for candidate, heard, read in zip(candidates, whisper_scores, llm_scores)]
            chosen.append(max(range(len(joint)), key=joint.__getitem__))
        return chosen
