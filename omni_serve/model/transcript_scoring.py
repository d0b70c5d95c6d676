"""Choosing among Whisper's beam candidates with the LLM's judgement of each as the user's question.

Whisper tiny.en often ranks a near-miss first ("What does a remake?") while the question actually
asked is among its other beam candidates. Adding the LLM's log-likelihood of each candidate, read
where it will stand in the prompt, to Whisper's own score (n-best rescoring, a standard ASR
technique) picks the right one more often: on a development set of espeak-ng voices and questions
kept apart from the benchmark, exact transcripts rose from 27 to 35 of 66 with Whisper's beam of 5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

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

    All candidates go through the LLM in one pass, packed as a prefix tree of their tokens with an
    attention mask that lets each token see only its own ancestors: beam candidates share most of
    their starts, so the pass holds far fewer tokens than the candidates together, and on a CPU a
    pass's cost grows with its tokens.
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
        """Per text, the log-probability of its tokens (tokenised as typed) and of the end of turn."""
        tree = _TokenTree([self.tokenizer(text, add_special_tokens=False).input_ids + self.end_of_turn
                           for text in texts])
        prefix_logits, cache = self._prefix_state()
        device = prefix_logits.device
        logits = prefix_logits
        if tree.inputs:
            base = len(self.before)
            try:
                hidden = self.network.model.extend(
                    cache, input_ids=torch.tensor([tree.inputs], device=device),
                    position_ids=torch.tensor([tree.positions], device=device) + base,
                    attention_mask=tree.attention_mask(base, device),
                ).last_hidden_state[0]
            except BaseException:
                self._prefix = None  # the cache may hold part of this pass: rebuild it next time
                raise
            cache.crop(-len(tree.inputs))  # back to the prefix alone
            logits = torch.cat([prefix_logits, self.network.lm_head(hidden).float()])  # row i + 1: after input i
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = log_probs[torch.tensor(tree.predictors, dtype=torch.long, device=device),
                           torch.tensor(tree.targets, dtype=torch.long, device=device)].tolist()
        return [sum(scored[start:end]) for start, end in tree.spans]

    def _prefix_state(self) -> tuple[torch.Tensor, DynamicCache]:
        """Logits after the prompt's prefix (1, vocab) and its cache (computed on first use)."""
        if self._prefix is None:
            weight = self.network.lm_head.weight
            cache = self.network.new_cache()
            ids = torch.tensor([self.before], dtype=torch.long, device=weight.device)
            hidden = self.network.model.extend(cache, input_ids=ids).last_hidden_state
            self._prefix = self.network.lm_head(hidden[0, -1:]).float(), cache
        return self._prefix


class _TokenTree:
    """Candidates as one packed sequence: the prefix tree of their tokens, each shared start once.

    Only tree nodes with children are `inputs` (a leaf is a target, never needed as context), fed in
    an order where parents come first, at `positions` (depth in the tree). `targets[k]` is predicted
    by the logits of row `predictors[k]` (0: after the prompt prefix, i + 1: after input i);
    `spans[c]` are candidate c's targets.
    """

    def __init__(self, rows: list[list[int]]) -> None:
        nodes: dict[tuple[int, int], int] = {}  # (parent node, token) -> node; node 0 is the root
        paths = []  # per candidate, its (parent node, token) steps
        for row in rows:
            node, path = 0, []
            for token in row:
                path.append((node, token))
                node = nodes.setdefault((node, token), len(nodes) + 1)
            paths.append(path)
        with_children = {parent for parent, _ in nodes}
        row_after = {0: 0}  # node -> row of the logits that follow it
        self.inputs: list[int] = []
        self.positions: list[int] = []
        self.parent_inputs: list[int] = []  # per input, its parent's input index (-1: the root)
        depth = {0: -1}
        for (parent, token), node in nodes.items():  # insertion order: parents before children
            depth[node] = depth[parent] + 1
            if node in with_children:
                self.parent_inputs.append(row_after[parent] - 1)
                self.inputs.append(token)
                self.positions.append(depth[node])
                row_after[node] = len(self.inputs)
        self.targets = [token for path in paths for _, token in path]
        self.predictors = [row_after[parent] for path in paths for parent, _ in path]
        ends = [0]
        for path in paths:
            ends.append(ends[-1] + len(path))
        self.spans = list(pairwise(ends))

    def attention_mask(self, cached: int, device: torch.device) -> torch.Tensor:
        """(1, 1, inputs, cached + inputs), True where attending: the cached prefix and the input's
        ancestors in the tree, itself included."""
        count = len(self.inputs)
        ancestors = torch.zeros(count, count, dtype=torch.bool)
        for index, parent in enumerate(self.parent_inputs):
            if parent >= 0:
                ancestors[index] = ancestors[parent]
            ancestors[index, index] = True
        mask = torch.cat([torch.ones(count, cached, dtype=torch.bool), ancestors], dim=1)
        return mask.to(device).view(1, 1, count, cached + count)


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
