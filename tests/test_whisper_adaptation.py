"""The Whisper adaptation to espeak-ng voices: LoRA merge, training (texts and no-speech), resume, data.

Training runs on a tiny random Whisper with the real vocabulary (the tokenizer's special tokens
must exist); the data pipeline runs once on the real Whisper tiny.en encoder, on a few clips.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from whisper.model import ModelDimensions, Whisper

from omni_serve.cli import SUBCOMMANDS, main
from omni_serve.default.transcriber_data import (
    TRAINING_LANGUAGES,
    TRAINING_VARIANTS,
    Exclusions,
    TextOptions,
    TranscriberData,
    non_speech,
    speak,
    training_texts,
    write_shards,
)
from omni_serve.default.transcriber_train import CHECKPOINT_FILE, TranscriberTrainConfig, TranscriberTrainer
from omni_serve.default.whisper_lora import SHAPE_FILE, WEIGHTS_FILE, LoRAShape, add_lora, merge_lora, save_lora
from omni_serve.model.audio import SAMPLE_RATE
from omni_serve.model.errors import CheckpointError

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ModelDimensions(n_mels=80, n_audio_ctx=12, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=51864,
                       n_text_ctx=64, n_text_state=32, n_text_head=2, n_text_layer=2)
SMALL = TranscriberTrainConfig(rank=4, alpha=8.0, learning_rate=1e-2, warmup_steps=1, batch_size=6, steps=60,
                               checkpoint_every=10, eval_every=30, eval_samples=4, autocast=False)
TEXTS = ["The cat sat on the mat.", "Open the window, please.", "Where is the station?", "Seven green apples."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = Whisper(TINY)
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)  # Whisper leaves it uninitialised (checkpoints set it)
    path = tmp_path / "tiny.pt"
    torch.save({"dims": TINY.__dict__, "model_state_dict": model.state_dict()}, path)
    return path


def tiny_data(seed: int = 0) -> TranscriberData:
    """Random encoder outputs: four texts and two clips without speech ("")."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(len(TEXTS) + 2, TINY.n_audio_ctx, TINY.n_audio_state, generator=generator).half()
    return TranscriberData(features=features, texts=TEXTS + ["", ""])


def test_merged_checkpoint_computes_what_the_adapted_model_computes(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    adapted = Whisper(TINY)
    adapted.load_state_dict(checkpoint["model_state_dict"])
    shape = LoRAShape(rank=4, alpha=8.0)
    trainable = add_lora(adapted, shape)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in trainable:  # a trained-looking update, exactly representable in fp16 as saved
            parameter.copy_((torch.randn_like(parameter) * 0.2).half().float())
    save_lora(adapted, shape, tmp_path / "lora", {"step": 1})

    merged_state = merge_lora(checkpoint["model_state_dict"], tmp_path / "lora")
    merged = Whisper(TINY)
    merged.load_state_dict(merged_state, strict=True)
    tokens = torch.tensor([[50257, 50362, 464, 3797, 3332]])
    features = torch.randn(1, TINY.n_audio_ctx, TINY.n_audio_state)
    with torch.no_grad():
        torch.testing.assert_close(merged.decoder(tokens, features), adapted.decoder(tokens, features),
                                   atol=1e-4, rtol=1e-4)
    changed = {k for k in merged_state if not torch.equal(merged_state[k], checkpoint["model_state_dict"][k])}
    assert changed and all(k.startswith("decoder.blocks.") and k.endswith(".weight") for k in changed)
    assert len(changed) == TINY.n_text_layer * 10  # every linear layer of every decoder block


def test_merge_strength_moves_part_of_the_way_to_the_adaptation(tiny_checkpoint, tmp_path):
    model = Whisper(TINY)
    model.load_state_dict(torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"])
    trainable = add_lora(model, LoRAShape(rank=2, alpha=4.0))
    with torch.no_grad():
        for parameter in trainable:
            parameter.copy_((torch.randn_like(parameter) * 0.2).half().float())
    save_lora(model, LoRAShape(rank=2, alpha=4.0), tmp_path / "lora", {})
    state = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    full, half = merge_lora(state, tmp_path / "lora"), merge_lora(state, tmp_path / "lora", 0.5)
    none = merge_lora(state, tmp_path / "lora", 0.0)
    assert none.keys() == state.keys() and any(not torch.equal(full[key], state[key]) for key in state)
    for key in state:
        torch.testing.assert_close(half[key].float(), (state[key].float() + full[key].float()) / 2, atol=1e-3, rtol=0)
        assert torch.equal(none[key], state[key])
    with pytest.raises(ValueError, match="strength"):
        merge_lora(state, tmp_path / "lora", 1.5)


def test_merge_refuses_updates_made_for_another_shape(tiny_checkpoint, tmp_path):
    other = Whisper(ModelDimensions(**{**TINY.__dict__, "n_text_state": 48}))
    add_lora(other, LoRAShape(rank=2))
    save_lora(other, LoRAShape(rank=2), tmp_path / "other", {})
    state = torch.load(tiny_checkpoint, weights_only=True)["model_state_dict"]
    with pytest.raises(CheckpointError, match="shape"):
        merge_lora(state, tmp_path / "other")
    with pytest.raises(CheckpointError, match="no Whisper adaptation"):
        merge_lora(state, tmp_path / "missing")


def start_probabilities(trainer: TranscriberTrainer, index: int) -> tuple[float, float]:
    """P(<|nospeech|>) after <|startoftranscript|>, and P(<|endoftext|>: an empty transcript) after the prefix."""
    features, inputs, _ = trainer.batch([index])
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model.decoder(inputs[:, :2], features)[0].softmax(-1)
    return logits[0, trainer.tokenizer.no_speech].item(), logits[1, trainer.tokenizer.eot].item()


def test_training_learns_the_texts_and_when_there_is_no_speech(tiny_checkpoint, tmp_path):
    data = tiny_data()
    trainer = TranscriberTrainer(data, tiny_checkpoint, tmp_path / "run", SMALL, device="cpu")
    trainer.train_ids = list(range(len(data)))  # a tiny set: learn all of it
    everything = list(range(len(data)))
    with torch.no_grad():
        before = trainer.training_loss(everything).item()
    trainer.run()
    with torch.no_grad():
        after = trainer.training_loss(everything).item()
    assert after < 0.1 * before, (before, after)
    assert all(min(start_probabilities(trainer, i)) > 0.5 for i in (4, 5))  # no speech, nothing written
    assert all(max(start_probabilities(trainer, i)) < 0.5 for i in range(4))
    assert (tmp_path / "run" / WEIGHTS_FILE).is_file() and (tmp_path / "run" / SHAPE_FILE).is_file()


def test_resume_continues_from_the_saved_step_exactly(tiny_checkpoint, tmp_path):
    config = TranscriberTrainConfig(**{**SMALL.__dict__, "steps": 8, "checkpoint_every": 4, "eval_every": 4})
    whole = TranscriberTrainer(tiny_data(), tiny_checkpoint, tmp_path / "whole", config, device="cpu")
    whole.run()
    first = TranscriberTrainer(tiny_data(), tiny_checkpoint, tmp_path / "split", config, device="cpu")
    first.run(max_seconds=0)  # stops after one step, checkpointed
    assert first.step == 1 and (tmp_path / "split" / CHECKPOINT_FILE).is_file()
    resumed = TranscriberTrainer.resume_or_new(tiny_data(), tiny_checkpoint, tmp_path / "split", config, resume=True,
                                               device="cpu")
    assert resumed.step == 1
    resumed.run()
    for a, b in zip(whole.parameters, resumed.parameters):
        torch.testing.assert_close(a, b)


def test_training_texts_leave_out_the_held_out_questions_and_their_key_words(quality_bench):
    options = TextOptions(sentences=400, template_questions=400)
    exclusions = Exclusions.from_file(BENCH / "heldout_questions.json")
    keys = {key for _, key in quality_bench.QUESTIONS}
    assert exclusions.words == keys and len(exclusions.questions) == len(quality_bench.QUESTIONS)

    def with_key(texts):
        return [t for t in texts if set(re.findall(r"[a-z]+", t.lower())) & keys]

    assert with_key(training_texts(options, Exclusions()))  # the filter has work to do ...
    texts = training_texts(options, exclusions)
    assert not with_key(texts)  # ... and does it
    assert not {t.lower() for t in texts} & exclusions.questions
    assert not exclusions.allows("Name something that is waters.") and exclusions.allows("It has been.")
    assert training_texts(options, exclusions) == texts  # deterministic


def test_training_voices_are_not_the_benchmarks(quality_bench):
    # the dev sets on which the front end's settings were chosen (bench/transcription.py)
    dev_sets = json.loads((BENCH / "transcription_dev.json").read_text())
    for voice in quality_bench.VOICES:
        variant = voice.name.partition("+")[2]
        assert variant not in TRAINING_VARIANTS, voice
    assert "en-gb-x-rp" not in TRAINING_LANGUAGES
    for voice in dev_sets["voices"]:
        assert voice["name"].partition("+")[2] not in TRAINING_VARIANTS, voice
    held_out = {question for question, _ in quality_bench.QUESTIONS}
    assert len(dev_sets["dev"]) == 22 and len(dev_sets["unseen_words"]) == 30
    assert held_out.isdisjoint(dev_sets["dev"] + dev_sets["unseen_words"])
    # unseen words are meant to be unseen by training, not the benchmark's own key words
    assert all(Exclusions.from_file(BENCH / "heldout_questions.json").allows(question) for question in dev_sets["unseen_words"])


def test_training_clips_are_speech_or_clearly_not():
    clip, voice = speak("Where is the station?", random.Random(3))
    assert clip.dtype == np.float32 and 0.5 < len(clip) / SAMPLE_RATE < 5
    language, _, variant = voice.split("@")[0].partition("+")
    assert language in TRAINING_LANGUAGES and variant in TRAINING_VARIANTS
    assert np.abs(clip).max() > 0.2
    kinds = set()
    for seed in range(12):
        quiet, kind = non_speech(random.Random(seed))
        kinds.add(kind)
        assert np.isfinite(quiet).all() and np.abs(quiet).max() <= 1.5 and len(quiet) >= SAMPLE_RATE // 2
    assert len(kinds) >= 4


def test_data_and_training_commands_run_on_the_real_whisper(tmp_path):
    """make-transcriber-data's writer and train-transcriber, end to end, on three texts and one silent clip."""
    from omni_serve.default.build import convert_base_whisper

    assert "make-transcriber-data" in SUBCOMMANDS and "train-transcriber" in SUBCOMMANDS
    whisper_path = convert_base_whisper(tmp_path)
    texts = ["Hello there.", "What is the time?", "Good night."]
    write_shards(texts, 1, tmp_path / "data", whisper_path, workers=1)
    data = TranscriberData.load(tmp_path / "data")
    assert sorted(data.texts) == sorted(texts + [""])
    assert data.features.shape == (4, 1500, 384) and data.features.dtype == torch.float16
    nights = Exclusions(words=frozenset({"night"}))
    fewer = TranscriberData.load(tmp_path / "data", nights)
    assert sorted(fewer.texts) == sorted(["Hello there.", "What is the time?", ""])
    for text, row in zip(fewer.texts, fewer.features):
        assert torch.equal(row, data.features[data.texts.index(text)])
    assert main(["train-transcriber", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "2", "--threads", "1", "--no-autocast"]) == 0
    assert (tmp_path / "run" / WEIGHTS_FILE).is_file()
