"""LLM rescoring of Whisper's beam candidates: the packed prefix-tree pass scores each candidate as a
pass of its own would, and the ranker adds the weighted score to Whisper's as documented."""

from __future__ import annotations

import pytest
import torch
from whisper.decoding import MaximumLikelihoodRanker

from omni_serve.model.config import SPEECH_PLACEHOLDER_ID
from omni_serve.model.prompt import tokenize_speech_prompt
from omni_serve.model.transcript_scoring import LanguageModelRanker, TranscriptScorer
from omni_serve.model.transcription import TranscriptionFrontEnd, TranscriptionOptions, as_typed


@pytest.fixture(scope="module")
def scorer(fixture_model) -> TranscriptScorer:
    template = fixture_model.template
    prompt = tokenize_speech_prompt(fixture_model.tokenizer, template.opening() + template.user_turn(), first=True)
    return TranscriptScorer(fixture_model.network, fixture_model.tokenizer, prompt)


def separate_pass(scorer: TranscriptScorer, text: str) -> float:
    """The log-likelihood of one text and the end of turn after the prefix, in one uncached pass."""
    network = scorer.network
    scored = scorer.tokenizer(text, add_special_tokens=False).input_ids + scorer.end_of_turn
    ids = scorer.before + scored
    with torch.inference_mode():
        hidden = network.model(input_ids=torch.tensor([ids])).last_hidden_state
        log_probs = torch.log_softmax(network.lm_head(hidden).float()[0], dim=-1)
    return sum(float(log_probs[position - 1, ids[position]]) for position in range(len(scorer.before), len(ids)))


@pytest.mark.parametrize("texts", [
    ["What is the capital of Japan?", "What is the capital of Japan.", "What is the capital of a pan?"],
    ["Where do penguins live?", "Wear two pen wins live", "Why?", "Where do penguins live?"],
    ["Hello there, how are you", "Hello there, how are you"],
    ["a b c d", "a b x", "a y", "a b c e", "z"],
    ["One candidate only."],
])
def test_one_tree_pass_scores_as_separate_passes_do(scorer, texts):
    assert scorer.log_likelihoods(texts) == pytest.approx([separate_pass(scorer, text) for text in texts], abs=1e-4)


def test_scoring_leaves_the_prefix_cache_as_it_was(scorer):
    texts = ["Tell me a fact about elephants.", "Tell me a factor I'm out there living."]
    first = scorer.log_likelihoods(texts)
    assert scorer._prefix[1].get_seq_length() == len(scorer.before)
    assert scorer.log_likelihoods(texts) == pytest.approx(first, abs=1e-5)
    assert scorer.log_likelihoods([""]) == pytest.approx([separate_pass(scorer, "")], abs=1e-4)


def test_scorer_needs_one_placeholder(fixture_model):
    with pytest.raises(ValueError, match="one speech placeholder"):
        TranscriptScorer(fixture_model.network, fixture_model.tokenizer, [1, 2, 3])
    with pytest.raises(ValueError, match="one speech placeholder"):
        TranscriptScorer(fixture_model.network, fixture_model.tokenizer, [1, SPEECH_PLACEHOLDER_ID, SPEECH_PLACEHOLDER_ID])


def test_ranker_adds_the_weighted_llm_score_to_whispers():
    candidates = [[torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8, 9])],
                  [torch.tensor([1]), torch.tensor([2, 3])]]
    whisper_scores = [[-3.0, -2.4, -4.4], [-0.5, -1.2]]
    words = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e", 6: "f", 7: "g", 8: "h", 9: "i"}
    decode = lambda ids: " ".join(words[i] for i in ids)
    llm = {"a b c": -1.0, "d e": -9.0, "f g h i": 0.0, "a": -8.0, "b c": -1.0}
    scored: list[list[str]] = []

    def score(texts):
        scored.append(list(texts))
        return [llm[text] for text in texts]

    # weight 0: Whisper's own ranking, per token -1.0, -1.2, -1.1 and -0.5, -0.6
    assert LanguageModelRanker(decode, score, 0.0).rank(candidates, whisper_scores) == \
        MaximumLikelihoodRanker(None).rank(candidates, whisper_scores) == [0, 0]
    # weight 1: (-3-1)/3 = -1.33, (-2.4-9)/2 = -5.7, (-4.4+0)/4 = -1.1 and (-0.5-8)/1 = -8.5, (-1.2-1)/2 = -1.1
    assert LanguageModelRanker(decode, score, 1.0).rank(candidates, whisper_scores) == [2, 1]
    assert scored[-2:] == [["a b c", "d e", "f g h i"], ["a", "b c"]]


def test_rescoring_needs_a_beam_and_a_scorer(scorer):
    options = TranscriptionOptions.from_extras({"transcription": {"beam_size": 5, "llm_rescoring_weight": 0.5}})
    assert options.beam_size == 5 and options.llm_rescoring_weight == 0.5
    assert TranscriptionOptions.from_extras({}).llm_rescoring_weight is None
    with pytest.raises(ValueError, match="needs a beam"):
        TranscriptionFrontEnd(None, None, None, TranscriptionOptions(llm_rescoring_weight=0.5), scorer)
    with pytest.raises(ValueError, match="needs a beam"):
        TranscriptionFrontEnd(None, None, None, options, None)


@pytest.mark.parametrize(("heard", "typed"), [
    ("what is the main language spoken in Brazil", "What is the main language spoken in Brazil?"),
    ("  how many days are in a week?", "How many days are in a week?"),
    ("Doesn't it rain in April", "Doesn't it rain in April?"),
    ("tell me a fact about elephants", "Tell me a fact about elephants."),
    ("who invented the telephone.", "Who invented the telephone."),  # a mark Whisper wrote stays
    ("Wow!", "Wow!"),
    ("", ""),
])
def test_transcripts_are_passed_on_as_typed(heard, typed):
    assert as_typed(heard) == typed


def test_no_speech_rule_is_whispers_unless_the_config_lets_the_probability_decide():
    """Whisper's rule needs a low log-probability too; omni-smol's adapted Whisper writes fluent text for
    noise while sure there is no speech, so its config lets the probability decide alone."""
    from whisper.decoding import DecodingResult

    sure_but_fluent = DecodingResult(audio_features=torch.zeros(1), language="en", avg_logprob=-0.8,
                                     no_speech_prob=0.99)
    unsure = DecodingResult(audio_features=torch.zeros(1), language="en", avg_logprob=-2.0, no_speech_prob=0.5)

    def is_no_speech(extras: dict, result: DecodingResult) -> bool:
        return TranscriptionOptions.from_extras(extras).is_no_speech(result)

    whispers = TranscriptionOptions.from_extras({})
    assert (whispers.no_speech_threshold, whispers.logprob_threshold) == (0.6, -1.0)
    assert not is_no_speech({}, sure_but_fluent) and not is_no_speech({}, unsure)
    alone = {"transcription": {"no_speech": {"probability": 0.8, "below_logprob": None}}}
    assert is_no_speech(alone, sure_but_fluent) and not is_no_speech(alone, unsure)
