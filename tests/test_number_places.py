"""Digits spelled by their place in their number (`NumberPlaces`): the rows each token reads, when a
streaming caller may read them, and a decoder that uses them streaming what its training pass computes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import MODEL_DIR

from omni_serve.default.ctc_data import CTCData, DataOptions, HiddenStateCapture, save_samples
from omni_serve.default.ctc_train import TrainConfig, Trainer
from omni_serve.model.ctc_generator import token_spellings, token_texts
from omni_serve.model.loader import load_tokenizer
from omni_serve.model.number_places import MAX_PLACES, NumberPlaces
from omni_serve.model.units import CTCUnitStream, push_units

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIRST_ROW = 1000
DIGIT = {str(d): 100 + d for d in range(10)}
COMMA, POINT, WORD, SPACE = 120, 121, 1, 2
PLACES = NumberPlaces(digits={i: d for d, i in enumerate(DIGIT.values())}, commas=frozenset({COMMA}),
                      points=frozenset({POINT}), first_row=FIRST_ROW)


def ids_of(text: str) -> list[int]:
    """Synthetic token ids, a digit per token: "w" a word, " " a space, "," and "." themselves."""
    return [DIGIT.get(c) or {",": COMMA, ".": POINT, " ": SPACE}.get(c, WORD) for c in text]


def spelled(row: int, table: torch.Tensor) -> str:
    return bytes(c - 1 for c in table[row - FIRST_ROW].tolist() if c).decode()


@pytest.mark.parametrize(("text", "expected"), [
    ("w 149.7w", ["w", " ", "100", "40", "9", ".", "7", "w"]),
    ("1,500w", ["1000", ",", "500", "00", "0", "w"]),
    ("w3.14w", ["w", "3", ".", "1", "4", "w"]),  # decimals are said digit by digit
    ("1, 2", ["1", ",", " ", "2"]),  # a comma before a space ends the number
    ("17w", ["10", "7", "w"]),
])
def test_digits_read_their_place_and_every_other_token_itself(text, expected):
    ids, table = ids_of(text), PLACES.spellings(12)
    rows = PLACES.rows(ids)
    shown = [spelled(row, table) if row >= FIRST_ROW else text[i] for i, row in enumerate(rows)]
    assert shown == expected
    assert [row for row, i in zip(rows, ids) if i not in PLACES.digits] == [i for i in ids if i not in PLACES.digits]


def test_a_long_number_is_read_at_most_max_places_deep():
    rows = PLACES.rows(ids_of("9" * (MAX_PLACES + 3)))
    assert spelled(rows[0], PLACES.spellings(MAX_PLACES + 1)) == "9" + "0" * MAX_PLACES
    assert rows[-1] == DIGIT["9"]


def test_settled_tokens_never_change_their_row_as_the_sequence_goes_on():
    rng = random.Random(0)
    alphabet = [*DIGIT.values(), COMMA, POINT, WORD, SPACE]
    for _ in range(300):
        ids = [rng.choice(alphabet) for _ in range(rng.randint(1, 14))]
        full = PLACES.rows(ids)
        for length in range(len(ids) + 1):
            settled = PLACES.settled(ids[:length])
            assert 0 <= settled <= length
            assert PLACES.rows(ids[:length])[:settled] == full[:settled]
            if length and ids[length - 1] in (WORD, SPACE):
                assert settled == length  # a word ends any number
    assert PLACES.settled(ids_of("w 14")) == 2 and PLACES.settled(ids_of("w 14,")) == 2
    assert PLACES.settled(ids_of("w 1.4")) == 5  # decimals are known at once


def test_the_tokenizers_digits_commas_and_points_are_found():
    tokenizer = load_tokenizer(MODEL_DIR)
    places = NumberPlaces.from_texts(token_texts(tokenizer), len(tokenizer))
    assert places.digits == {tokenizer.convert_tokens_to_ids(str(d)): d for d in range(10)}
    assert places.commas == {tokenizer.convert_tokens_to_ids(",")}
    assert places.points == {tokenizer.convert_tokens_to_ids(".")}


def test_a_place_spelling_decoder_streams_what_its_training_pass_computes(fixture_model, tmp_path):
    """Three tokens of a sample act as the digits of a number: the stream holds them (and the token before,
    which reads the next one's spelling) until the number ends, and its frames equal the trainer's
    full pass over the same sample, whose place rows change what the decoder computes."""
    text = "Please read this short sentence aloud."
    path = tmp_path / "data.safetensors"
    save_samples(HiddenStateCapture(fixture_model, DataOptions(max_tokens=64)).collect([text]), path, fixture_model)
    data = CTCData.load(path)
    config = TrainConfig(layers=1, hidden=32, heads=2, ffn=64, upsample_factor=4, token_spelling=6,
                         spelling_before=1, spelling_after=1, number_places=True, autocast=False)
    trainer = Trainer(data, Path("unused"), config, device="cpu", tokenizer=fixture_model.tokenizer)
    generator = trainer.generator.eval()
    ids = data.token_ids[data.tokens(0)].tolist()
    start = next(p for p in range(1, len(ids) - 3) if all(ids.count(i) == 1 for i in ids[p : p + 3]))
    number = range(start, start + 3)
    table = token_spellings(token_texts(fixture_model.tokenizer), len(fixture_model.tokenizer), 6)
    places = NumberPlaces(digits={ids[p]: d for p, d in zip(number, (1, 4, 9))}, commas=frozenset(),
                          points=frozenset(), first_row=len(table))
    generator.set_spellings(table, places)
    inputs, windows, *_ = trainer.batch([0])
    assert windows[0, start, 0] == len(table) + 1 * MAX_PLACES + 1  # "100"
    with torch.inference_mode():
        logits = generator(inputs, token_ids=windows)
        generator.set_spellings(table)
        plain = generator(inputs, token_ids=trainer.batch([0])[1])
        generator.set_spellings(table, places)
    assert not torch.allclose(logits, plain)
    full = logits[0].argmax(-1).tolist()

    stream = CTCUnitStream(generator, fixture_model.network.model.embed_tokens)
    hidden = data.hidden[data.tokens(0)].float()
    units = []
    for position, token in enumerate(ids):
        new = push_units([stream], hidden[position : position + 1], [token], [""])[0]
        held = len(stream.waiting)
        if position in number:
            assert new == [] and held == position - start + 2  # the number is still open
        elif position == number.stop:
            assert held == 1  # it ended: every token up to the one that ended it, less one of lookahead
        units += new
    units += stream.finish()
    assert stream.frames == full
