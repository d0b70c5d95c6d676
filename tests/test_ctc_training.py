"""The learned unit generator (b)'s pipeline: make-data alignment, CTC training, resume, and the
generator's token-embedding and token-spelling options (streaming must equal the full pass that
training uses).

Everything runs on the tiny random reference model and a decoder of a few thousand parameters.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, MODEL_DIR
from unit_stream_helpers import streamed_and_offline_units

from omni_serve.cli import SUBCOMMANDS, main
from omni_serve.default.ctc_data import (
    CTCData,
    DataOptions,
    HiddenStateCapture,
    docstring_texts,
    number_texts,
    save_samples,
    vocabulary_texts,
    word_questions,
)
from omni_serve.default.ctc_train import (
    CHECKPOINT_FILE,
    SHAPE_FILE,
    WEIGHTS_FILE,
    TrainConfig,
    Trainer,
    edit_distance,
)
from omni_serve.default.transcriber_data import Exclusions
from omni_serve.model.ctc_generator import DecoderCache, ctc_collapse, spelling_windows, token_spellings, token_texts
from omni_serve.model.espeak import EspeakSettings, phonemizer_for
from omni_serve.model.units import CTCUnitStream, push_units

TEXTS = ["The cat sat on the mat.", "It is a sunny day in the park.", "Please read this short sentence aloud."]
SMALL = TrainConfig(layers=1, hidden=32, heads=2, ffn=64, upsample_factor=4, learning_rate=3e-3, warmup_steps=1,
                    batch_size=3, steps=40, checkpoint_every=10, eval_every=10, autocast=False)
SPELLING = TrainConfig(**{**SMALL.__dict__, "token_spelling": 6})
CONTEXT = TrainConfig(**{**SPELLING.__dict__, "spelling_before": 1, "spelling_after": 2})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_file(fixture_model, tmp_path_factory) -> Path:
    capture = HiddenStateCapture(fixture_model, DataOptions(max_tokens=64))
    path = tmp_path_factory.mktemp("ctc") / "data.safetensors"
    save_samples(capture.collect(TEXTS), path, fixture_model)
    return path


def test_make_data_pairs_each_token_with_the_state_that_chose_it(fixture_model, data_file):
    data = CTCData.load(data_file)
    assert len(data) == 3 and data.llm_hidden == fixture_model.config.llm.hidden_size
    assert data.unit_names == list(EspeakSettings().units)
    tokenizer, network = fixture_model.tokenizer, fixture_model.network
    capture = HiddenStateCapture(fixture_model, DataOptions())
    for index, text in enumerate(TEXTS):
        part = data.tokens(index)
        ids = data.token_ids[part].tolist()
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
        names = phonemizer_for(EspeakSettings()).text(text)
        assert data.unit_targets(index).tolist() == [data.unit_names.index(n) for n in names]
        # The engine pushes (hidden that chose token i, token i): replay its incremental steps.
        with torch.inference_mode():
            cache = network.new_cache()
            step = network.step(network.embed_prompt(capture.prompts.turn_ids("Please say something.", True), []),
                                cache)
            for position, token in enumerate(ids):
                torch.testing.assert_close(data.hidden[part][position].float(), step.hidden[0].float(),
                                           atol=2e-3, rtol=2e-3)
                step = network.step(network.embed_tokens(torch.tensor([[token]])), cache)
            rows = network.embed_tokens(torch.tensor(ids)).float()
        torch.testing.assert_close(data.embeddings(torch.tensor(ids)).float(), rows, atol=2e-3, rtol=2e-3)
        assert data.inputs(index, token_embedding=True).shape == (len(ids), 2 * data.llm_hidden)


def test_answers_to_word_questions_are_the_llms_greedy_answers_unless_refused(fixture_model):
    words = ["apple", "river", "Tokyo", "violin"]
    questions = word_questions(words, 6, seed=2)
    assert questions == word_questions(words, 6, seed=2) and len(questions) == 6
    asked = [next(w for w in words if w in q) for q in questions]
    assert sorted(asked[:4]) == sorted(words)  # every word once before any twice
    capture = HiddenStateCapture(fixture_model, DataOptions(answer_tokens=6))
    samples = capture.collect([], questions[:2])
    tokenizer = fixture_model.tokenizer
    for sample, question in zip(samples, questions):
        assert sample.source == "answer"
        assert sample.text == tokenizer.decode(capture.greedy_answer(question), skip_special_tokens=True).strip()
        torch.testing.assert_close(sample.hidden, capture.teacher_forced(question, sample.token_ids))
    assert len(samples) == 2 and samples[0].text != samples[1].text
    kept = capture.collect([], questions[:2], allows=lambda text: text != samples[0].text)
    assert [sample.text for sample in kept] == [samples[1].text]


def test_training_overfits_a_tiny_set(data_file, tmp_path):
    trainer = Trainer(CTCData.load(data_file), tmp_path, SMALL, device="cpu")
    trainer.train_ids = trainer.train_ids + trainer.heldout_ids  # three samples: overfit all of them
    first = [trainer.train_step() for _ in range(3)]
    for _ in range(SMALL.steps - 6):
        trainer.train_step()
    last = [trainer.train_step() for _ in range(3)]
    assert sum(last) < 0.7 * sum(first)
    assert trainer.phoneme_error_rate(trainer.train_ids) < 1.0


def test_resume_continues_from_the_saved_step_exactly(data_file, tmp_path):
    data = CTCData.load(data_file)
    whole = Trainer(data, tmp_path / "whole", replace_steps(20), device="cpu")
    whole.run()
    part = Trainer(data, tmp_path / "part", replace_steps(20), device="cpu")
    part.run(until_step=10)
    resumed = Trainer.resume_or_new(data, tmp_path / "part", replace_steps(20), resume=True, device="cpu")
    assert resumed.step == 10
    resumed.run()
    assert resumed.step == 20
    for name, value in whole.generator.state_dict().items():
        torch.testing.assert_close(resumed.generator.state_dict()[name], value, atol=1e-5, rtol=1e-5)
    assert {CHECKPOINT_FILE, WEIGHTS_FILE, SHAPE_FILE} <= {p.name for p in (tmp_path / "part").iterdir()}


def replace_steps(steps: int, config: TrainConfig = SMALL) -> TrainConfig:
    return replace(config, steps=steps)


@pytest.mark.parametrize("config", [SMALL, SPELLING], ids=["embedding", "embedding+spelling"])
def test_decoder_streams_like_its_full_pass(fixture_model, data_file, config):
    data = CTCData.load(data_file)
    generator = Trainer(data, Path("unused"), config, device="cpu", tokenizer=fixture_model.tokenizer).generator.eval()
    inputs = data.inputs(0, token_embedding=True).unsqueeze(0)
    ids = data.token_ids[data.tokens(0)].unsqueeze(0)
    with torch.inference_mode():
        full = generator(inputs, token_ids=ids)
        cache = DecoderCache()
        steps = torch.cat([generator(inputs[:, i : i + 1], cache, token_ids=ids[:, i : i + 1])
                           for i in range(inputs.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=1e-4)
    assert full.shape == (1, inputs.shape[1] * config.upsample_factor, len(data.unit_names) + 1)


def test_decoder_is_trained_with_the_rope_it_is_served_with(fixture_model, data_file):
    """The fixture LLM has llama3 rope scaling; a decoder trained on its hidden states must rotate
    positions as the loaded model's decoder does (same head size here)."""
    served = fixture_model.network.speech_generator
    trained = Trainer(CTCData.load(data_file), Path("unused"), SMALL, device="cpu").generator
    assert fixture_model.config.llm.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(trained.inv_freq, served.inv_freq)
    assert trained.rope_scaling == served.rope_scaling


def test_token_spellings_hold_each_tokens_lower_cased_characters(fixture_model):
    tokenizer = fixture_model.tokenizer
    table = token_spellings(token_texts(tokenizer), len(tokenizer) + 3, 6)
    assert table.shape == (len(tokenizer) + 3, 6) and not table[len(tokenizer):].any()
    pieces = []
    for token_id in tokenizer(" Cat sat quietly", add_special_tokens=False).input_ids:
        row = table[token_id]
        pieces.append(bytes(int(c) - 1 for c in row[row > 0]))
    assert b"".join(pieces) == b" cat sat quietly" and all(0 < len(piece) <= 6 for piece in pieces)
    long_word = tokenizer(" Extraordinarily", add_special_tokens=False).input_ids
    assert all(int((table[i] > 0).sum()) == min(6, len(tokenizer.decode([i]).encode())) for i in long_word)


def test_spelling_decoder_reads_the_chosen_tokens_characters(fixture_model, data_file):
    """Changing one token's spelling changes the units from that token on, and none before it."""
    data = CTCData.load(data_file)
    generator = Trainer(data, Path("unused"), SPELLING, device="cpu", tokenizer=fixture_model.tokenizer).generator.eval()
    inputs = data.inputs(1, token_embedding=True).unsqueeze(0)
    ids = data.token_ids[data.tokens(1)].unsqueeze(0)
    changed = 3
    with torch.inference_mode():
        before = generator(inputs, token_ids=ids)
        generator.spellings[ids[0, changed]] = torch.tensor([ord(c) + 1 for c in " zebra"])
        after = generator(inputs, token_ids=ids)
    boundary = changed * SPELLING.upsample_factor
    torch.testing.assert_close(after[:, :boundary], before[:, :boundary])
    assert not torch.allclose(after[:, boundary : boundary + SPELLING.upsample_factor],
                              before[:, boundary : boundary + SPELLING.upsample_factor])
    with pytest.raises(ValueError, match="token_ids"):
        generator(inputs)


def test_spelling_windows_list_each_token_then_those_after_then_those_before():
    ids = torch.tensor([[5, 6, 7, 8], [9, 4, -1, -1]])  # the second row is padded with -1
    windows = spelling_windows(ids, before=1, after=2)
    assert windows[0].tolist() == [[5, 6, 7, -1], [6, 7, 8, 5], [7, 8, -1, 6], [8, -1, -1, 7]]
    assert windows[1].tolist() == [[9, 4, -1, -1], [4, -1, -1, 9], [-1, -1, -1, 4], [-1, -1, -1, -1]]
    assert spelling_windows(ids, 0, 0).tolist() == ids.unsqueeze(-1).tolist()


def test_a_spelling_context_lets_a_token_read_the_tokens_after_it(fixture_model, data_file):
    """With `after` = 2, changing token t's spelling changes the units from token t - 2 on, none before."""
    data = CTCData.load(data_file)
    generator = Trainer(data, Path("unused"), CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer).generator.eval()
    inputs = data.inputs(1, token_embedding=True).unsqueeze(0)
    ids = data.token_ids[data.tokens(1)].unsqueeze(0)
    changed, per_token = 4, CONTEXT.upsample_factor
    with torch.inference_mode():
        before = generator(inputs, token_ids=spelling_windows(ids, 1, 2))
        generator.spellings[ids[0, changed]] = torch.tensor([ord(c) + 1 for c in " zebra"])
        after = generator(inputs, token_ids=spelling_windows(ids, 1, 2))
    first = (changed - 2) * per_token
    torch.testing.assert_close(after[:, :first], before[:, :first])
    assert not torch.allclose(after[:, first : first + per_token], before[:, first : first + per_token])
    with pytest.raises(ValueError, match="4 tokens' spellings"):
        generator(inputs, token_ids=ids)


def test_streams_with_a_spelling_context_hold_tokens_back_and_equal_the_full_pass(fixture_model, data_file):
    """Each token is decoded once the 2 after it are chosen (the last ones at `finish`); streams that
    started at different steps, decoded together, each give their own full pass."""
    data = CTCData.load(data_file)
    generator = Trainer(data, Path("unused"), CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer).generator.eval()
    samples = range(len(TEXTS))
    ids = [data.token_ids[data.tokens(i)] for i in samples]
    hidden = [data.hidden[data.tokens(i)].float() for i in samples]
    with torch.inference_mode():
        full = [generator(data.inputs(i, token_embedding=True).unsqueeze(0),
                          token_ids=spelling_windows(ids[i].unsqueeze(0), 1, 2))[0].argmax(-1).tolist() for i in samples]
    streams = [CTCUnitStream(generator, fixture_model.network.model.embed_tokens) for _ in samples]
    units: list[list[int]] = [[] for _ in samples]
    for step in range(max(len(t) for t in ids) + len(TEXTS)):
        rows = [i for i in samples if 0 <= step - i < len(ids[i])]  # stream i starts at step i
        if not rows:
            continue
        batch = torch.stack([hidden[i][step - i] for i in rows])
        pushed = push_units([streams[i] for i in rows], batch, [int(ids[i][step - i]) for i in rows], [""] * len(rows))
        for i, new in zip(rows, pushed):
            if step - i < 2:
                assert new == [] and len(streams[i].waiting) == step - i + 1  # held back until 2 tokens follow
            units[i] += new
    for i in samples:
        units[i] += streams[i].finish()
        assert streams[i].frames == full[i]
        assert units[i] == ctc_collapse(full[i], generator.blank_id) and units[i]


def test_an_unspoken_end_token_is_not_decoded(fixture_model, data_file):
    """A decoder trained on texts that end without an end-of-turn token does not decode one: pushing it
    gives nothing, and the stream's frames are the full pass over the answer without it."""
    data = CTCData.load(data_file)
    generator = Trainer(data, Path("unused"), CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer).generator.eval()
    ids, hidden = data.token_ids[data.tokens(0)], data.hidden[data.tokens(0)].float()
    end = fixture_model.tokenizer.eos_token_id
    with torch.inference_mode():
        full = generator(data.inputs(0, token_embedding=True).unsqueeze(0),
                         token_ids=spelling_windows(ids.unsqueeze(0), 1, 2))[0].argmax(-1).tolist()
    stream = CTCUnitStream(generator, fixture_model.network.model.embed_tokens, unspoken=frozenset({end}))
    for position, token in enumerate(ids.tolist()):
        stream.push(hidden[position], token, "")
    waiting = len(stream.waiting)
    assert stream.push(hidden[-1], end, "") == [] and len(stream.waiting) == waiting
    stream.finish()
    assert stream.frames == full


def test_a_run_warm_started_from_another_keeps_its_weights_and_grows_the_context(fixture_model, data_file, tmp_path):
    data = CTCData.load(data_file)
    Trainer(data, tmp_path / "plain", replace_steps(2, SPELLING), device="cpu", tokenizer=fixture_model.tokenizer).run()
    old = torch.load(tmp_path / "plain" / CHECKPOINT_FILE, weights_only=False)["model"]
    base = ["train", "--data", str(data_file), "--layers", "1", "--hidden", "32", "--heads", "2", "--ffn", "64",
            "--upsample", "4", "--no-autocast", "--device", "cpu", "--steps", "1"]
    common = base + ["--spelling", "6", "--model-path", str(MODEL_DIR), "--spelling-context", "1", "2"]
    grown = Trainer(data, tmp_path / "grown", CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer)
    grown.warm_start(tmp_path / "plain")
    state = grown.generator.state_dict()
    positions = "spelling_attn.char_position_embed.weight"
    assert state[positions].shape == (4 * 6, 32) and torch.equal(state[positions][:6], old[positions])
    assert all(torch.equal(state[name], value) for name, value in old.items() if name != positions)
    assert main(common + ["--out", str(tmp_path / "cli"), "--init-from", str(tmp_path / "plain")]) == 0
    assert json.loads((tmp_path / "cli" / SHAPE_FILE).read_text())["spelling_after"] == 2
    longer = Trainer(data, tmp_path / "longer", TrainConfig(**{**CONTEXT.__dict__, "token_spelling": 8, "spelling_before": 2}),
                     device="cpu", tokenizer=fixture_model.tokenizer)
    longer.warm_start(tmp_path / "cli")  # 8 characters a token, a second token before
    trained = torch.load(tmp_path / "cli" / CHECKPOINT_FILE, weights_only=False)["model"][positions]
    moved = longer.generator.state_dict()[positions]
    assert moved.shape == (5 * 8, 32)
    for slot in range(4):  # the token, 1st and 2nd after, 1st before: the same slots in both layouts
        assert torch.equal(moved[slot * 8 : slot * 8 + 6], trained[slot * 6 : slot * 6 + 6])
    with pytest.raises(ValueError, match="fewer characters or neighbours"):
        Trainer(data, tmp_path / "shorter", SPELLING, device="cpu", tokenizer=fixture_model.tokenizer).warm_start(tmp_path / "cli")
    mirrored = TrainConfig(**{**CONTEXT.__dict__, "spelling_before": 2, "spelling_after": 1})  # same table size
    with pytest.raises(ValueError, match="fewer characters or neighbours"):  # the 2nd token after is not read
        Trainer(data, tmp_path / "mirrored", mirrored, device="cpu", tokenizer=fixture_model.tokenizer).warm_start(tmp_path / "cli")
    with pytest.raises(SystemExit, match="--init-from"):  # another decoder width
        main(common + ["--out", str(tmp_path / "wide"), "--hidden", "64", "--init-from", str(tmp_path / "cli")])
    with pytest.raises(SystemExit, match="--spelling-context and --number-places need --spelling"):
        main(base + ["--out", str(tmp_path / "no"), "--spelling-context", "1", "1"])


def test_a_run_warm_starts_from_an_exported_decoder_alone(fixture_model, data_file, tmp_path):
    """The shipped decoder folder holds only the fp16 export, no training checkpoint: a fine-tune of
    it starts from those weights, and refuses a decoder whose units are listed otherwise."""
    data = CTCData.load(data_file)
    Trainer(data, tmp_path / "run", replace_steps(2, CONTEXT), device="cpu", tokenizer=fixture_model.tokenizer).run()
    exported = tmp_path / "exported"
    exported.mkdir()
    for name in (WEIGHTS_FILE, SHAPE_FILE):
        shutil.copy(tmp_path / "run" / name, exported / name)
    trained = torch.load(tmp_path / "run" / CHECKPOINT_FILE, weights_only=False)["model"]
    longer = TrainConfig(**{**CONTEXT.__dict__, "token_spelling": 8})
    tuned = Trainer(data, tmp_path / "tuned", longer, device="cpu", tokenizer=fixture_model.tokenizer)
    tuned.warm_start(exported)
    state = tuned.generator.state_dict()
    positions = "spelling_attn.char_position_embed.weight"
    assert torch.equal(state[positions][8:14], trained[positions][6:12].half().float())  # 1st after, moved
    assert all(torch.equal(state[name], value.half().float()) for name, value in trained.items() if name != positions)
    shape = json.loads((exported / SHAPE_FILE).read_text())
    shape["units"] = shape["units"][::-1]
    (exported / SHAPE_FILE).write_text(json.dumps(shape))
    with pytest.raises(ValueError, match="other units"):
        Trainer(data, tmp_path / "other", CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer).warm_start(exported)
    with pytest.raises(ValueError, match="neither"):
        Trainer(data, tmp_path / "none", CONTEXT, device="cpu", tokenizer=fixture_model.tokenizer).warm_start(tmp_path)


def test_train_takes_the_shape_it_is_not_given_from_the_decoder_it_starts_from(data_file, tmp_path):
    """Fine-tuning a decoder whose shape is not the defaults' (the shipped one) needs no shape flags;
    a flag given still wins (and a shape that does not fit the weights is refused)."""
    base = ["train", "--data", str(data_file), "--no-autocast", "--device", "cpu", "--steps", "1"]
    assert main(base + ["--out", str(tmp_path / "small"), "--layers", "1", "--hidden", "32", "--heads", "2",
                        "--ffn", "64", "--upsample", "4"]) == 0
    assert main(base + ["--out", str(tmp_path / "tuned"), "--init-from", str(tmp_path / "small")]) == 0
    shape = json.loads((tmp_path / "tuned" / SHAPE_FILE).read_text())
    assert (shape["layers"], shape["hidden"], shape["heads"], shape["ffn"], shape["upsample_factor"]) == (1, 32, 2, 64, 4)
    with pytest.raises(SystemExit, match="--init-from"):
        main(base + ["--out", str(tmp_path / "wider"), "--hidden", "48", "--init-from", str(tmp_path / "small")])
    with pytest.raises(SystemExit, match="--init-from"):
        main(base + ["--out", str(tmp_path / "none"), "--init-from", str(tmp_path / "missing")])


def test_a_run_on_the_test_device_warm_starts_from_a_decoder_saved_on_cpu(fixture_model, data_file, tmp_path, device):
    """`train --init-from` on a GPU reads the saved decoder on the CPU and must move it to the run's
    device (it once failed there on the spelling table; run with `--device cuda`)."""
    data = CTCData.load(data_file)
    Trainer(data, tmp_path / "cpu", replace_steps(2, SPELLING), device="cpu", tokenizer=fixture_model.tokenizer).run()
    saved = torch.load(tmp_path / "cpu" / CHECKPOINT_FILE, weights_only=False)["model"]
    tuned = Trainer(data, tmp_path / "here", replace_steps(3, CONTEXT), device=str(device), tokenizer=fixture_model.tokenizer)
    tuned.warm_start(tmp_path / "cpu")
    state = tuned.generator.state_dict()
    positions = "spelling_attn.char_position_embed.weight"
    assert {value.device.type for value in state.values()} == {device.type}
    assert torch.equal(state[positions][:6].cpu(), saved[positions])
    tuned.run()
    assert tuned.step == 3


def test_averaged_decoder_is_the_mean_of_its_runs_and_warm_starts_a_run(data_file, tmp_path):
    """`average-decoders` of a run and its continuation: fp16 weights halfway between the two runs'
    checkpoints, a shape record naming both, loadable by the training pipeline; other shapes refused."""
    data = CTCData.load(data_file)
    Trainer(data, tmp_path / "first", replace_steps(3), device="cpu").run()
    later = Trainer(data, tmp_path / "later", replace_steps(6), device="cpu")
    later.warm_start(tmp_path / "first")
    later.run()
    assert main(["average-decoders", str(tmp_path / "first"), str(tmp_path / "later"), "--out",
                 str(tmp_path / "mean")]) == 0
    first, second = (torch.load(tmp_path / run / CHECKPOINT_FILE, weights_only=False)["model"]
                     for run in ("first", "later"))
    assert any(not torch.equal(first[name], second[name]) for name in first)
    tuned = Trainer(data, tmp_path / "tuned", SMALL, device="cpu")
    tuned.warm_start(tmp_path / "mean")  # the exported files alone, as `train --init-from` reads them
    for name, value in tuned.generator.state_dict().items():
        torch.testing.assert_close(value, ((first[name] + second[name]) / 2).half().float())
    shape = json.loads((tmp_path / "mean" / SHAPE_FILE).read_text())
    assert shape["averaged_from"] == [{"run": "first", "step": 3}, {"run": "later", "step": 6}]
    assert shape["step"] == 6 and shape["hidden"] == SMALL.hidden

    Trainer(data, tmp_path / "wider", replace(SMALL, hidden=48, steps=1), device="cpu").run()
    with pytest.raises(SystemExit, match="hidden"):
        main(["average-decoders", str(tmp_path / "first"), str(tmp_path / "wider"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="two runs"):
        main(["average-decoders", str(tmp_path / "first"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no ctc_decoder.json"):
        main(["average-decoders", str(tmp_path / "first"), str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])


def test_commands_are_registered_and_train_resumes(data_file, tmp_path):
    assert SUBCOMMANDS["make-data"] == "omni_serve.cli.make_data" and SUBCOMMANDS["train"] == "omni_serve.cli.train"
    common = ["train", "--data", str(data_file), "--out", str(tmp_path), "--layers", "1", "--hidden", "32",
              "--heads", "2", "--ffn", "64", "--upsample", "4", "--eval-every", "2", "--checkpoint-every", "2",
              "--no-autocast", "--device", "cpu"]
    assert main(common + ["--steps", "2", "--warmup-steps", "3"]) == 0
    assert main(common + ["--steps", "4", "--resume"]) == 0
    checkpoint = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    assert checkpoint["step"] == 4 and checkpoint["config"]["warmup_steps"] == 3  # resuming keeps the schedule


def test_train_command_makes_a_spelling_decoder_with_the_models_tokenizer(data_file, tmp_path):
    common = ["train", "--data", str(data_file), "--out", str(tmp_path), "--layers", "1", "--hidden", "32",
              "--heads", "2", "--ffn", "64", "--upsample", "4", "--eval-every", "2", "--checkpoint-every", "2",
              "--no-autocast", "--device", "cpu", "--spelling", "6"]
    with pytest.raises(SystemExit, match="--model-path"):
        main(common + ["--steps", "2"])
    assert main(common + ["--steps", "2", "--model-path", str(MODEL_DIR)]) == 0
    assert main(common + ["--steps", "4", "--resume", "--model-path", str(MODEL_DIR)]) == 0
    shape = json.loads((tmp_path / SHAPE_FILE).read_text())
    assert shape["token_spelling"] == 6 and shape["step"] == 4


def test_data_files_join_into_one(fixture_model, data_file, tmp_path):
    """`train --data a b`: the joined data holds each file's samples unchanged, in order."""
    capture = HiddenStateCapture(fixture_model, DataOptions(max_tokens=64))
    other = tmp_path / "other.safetensors"
    save_samples(capture.collect(["A zebra quietly crossed the road.", "Seven violins played."]), other, fixture_model)
    parts = [CTCData.load(data_file), CTCData.load(other)]
    joined = CTCData.load_all([data_file, other])
    assert len(joined) == 5
    pairs = [(part, index) for part in parts for index in range(len(part))]
    for joined_index, (part, index) in enumerate(pairs):
        torch.testing.assert_close(joined.inputs(joined_index, True), part.inputs(index, True), rtol=0, atol=0)
        assert torch.equal(joined.unit_targets(joined_index), part.unit_targets(index))
        assert torch.equal(joined.token_ids[joined.tokens(joined_index)], part.token_ids[part.tokens(index)])


def test_vocabulary_texts_hold_every_word_as_often_as_asked():
    words = ["apple", "river", "Tokyo", "violin", "pencil", "March"]
    texts = vocabulary_texts(words, per_word=2, seed=3)
    assert len(texts) == 4 and texts == vocabulary_texts(words, per_word=2, seed=3)
    spoken = [word.lower() for text in texts for word in re.findall(r"[A-Za-z]+", text)]
    for word in words:
        assert spoken.count(word.lower()) == 2, word
    assert all(text[0].isupper() and text[-1] in ".?" for text in texts)


def test_number_texts_read_numbers_in_the_forms_answers_write(quality_bench):
    texts = number_texts(300, seed=5)
    assert len(texts) == 300 and texts == number_texts(300, seed=5) and texts != number_texts(300, seed=6)
    assert all(re.search(r"\d", text) for text in texts)
    joined = " ".join(texts)
    for form in (r"\d+\.\d", r"\d,\d{3}", r"\d+%", r"°C", r"\d+(st|nd|rd|th)\b", r"\d+:\d\d", r"-\d", r"\$\d"):
        assert re.search(form, joined), form
    exclusions = Exclusions.from_file(quality_bench.HELDOUT_FILE)
    assert all(exclusions.allows(text) for text in texts)  # the templates hold no held-out key word


def test_docstring_texts_give_as_many_paragraphs_as_asked():
    assert docstring_texts(0) == [] and len(docstring_texts(5)) == 5
    assert all(6 <= len(text.split()) <= 60 for text in docstring_texts(5))


def test_edit_distance():
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2 and edit_distance([7], [7]) == 0


def test_training_questions_share_nothing_with_the_held_out_questions(quality_bench):
    """The quality benchmark's questions (and their key words) are never in (b)'s training answers."""
    from omni_serve.default.ctc_data import QUESTIONS

    words = {question: set(re.findall(r"[a-z]+", question.lower())) for question in QUESTIONS}
    for held_out, key in quality_bench.QUESTIONS:
        assert held_out not in QUESTIONS
        assert not [q for q, w in words.items() if key in w], f"key word {key!r} of {held_out!r} is in training"


@pytest.mark.parametrize("config", [SPELLING, CONTEXT], ids=["own spelling", "spelling context 1, 2"])
def test_a_spelling_decoder_in_a_model_folder_streams_its_full_pass(fixture_model, data_file, tmp_path, config):
    """Loading spells the tokenizer's tokens for the decoder, and the engine's incremental units equal
    one full pass of the decoder over the same answer (as in training)."""
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from omni_serve.default.learned_decoder import attach_learned_decoder
    from omni_serve.model.loader import load_model

    folder = tmp_path / "model"
    shutil.copytree(MODEL_DIR, folder)
    published = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in published.items() if not k.startswith("speech_generator.")},
              str(folder / "model.safetensors"))
    run, data = tmp_path / "run", CTCData.load(data_file)
    Trainer(data, run, replace_steps(1, config), device="cpu", tokenizer=fixture_model.tokenizer).run()
    llm = fixture_model.config.llm
    fields = attach_learned_decoder(folder, run, SimpleNamespace(hidden_size=llm.hidden_size, rope_theta=data.rope_theta))
    written = json.loads((folder / "config.json").read_text())
    written.update(fields["published"])
    written.setdefault("omni_serve", {}).update(fields["omni_serve"])
    (folder / "config.json").write_text(json.dumps(written))

    model = load_model(folder, speech_encoder=FIXTURES / "speech_encoder" / "tiny-whisper.pt", device="cpu")
    generator = model.network.speech_generator
    assert model.config.ctc_token_spelling == config.token_spelling
    assert generator.spelling_context == (config.spelling_before, config.spelling_after)
    table = token_spellings(token_texts(model.tokenizer), llm.vocab_size, config.token_spelling)
    assert torch.equal(generator.spellings[:-1], table) and not generator.spellings[-1].any()  # -1: no token
    events, offline = streamed_and_offline_units(model, "Tell me about the weather.", max_new_tokens=12)
    assert offline and events[-1].units[: len(offline)] == offline
