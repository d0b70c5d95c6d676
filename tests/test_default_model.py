"""The embedded default model omni-smol: conversions, espeak-ng units and vocoder, and the whole path.

The model is built once per session from the pip packages (about 15 s) into a temporary folder,
then loaded by the same `load_model` as the published checkpoint.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace

import numpy as np
import pytest
import torch
import whisper
from unit_stream_helpers import streamed_and_offline_units
from whisper.model import Whisper
from whisper.normalizers import EnglishTextNormalizer

from omni_serve.default.build import (
    CHECKPOINT_DIR,
    SPEECH_ENCODER_FILE,
    WHISPER_ADAPTATION_STRENGTH,
    Sources,
    build_default,
    chat_template_spec,
    convert_base_whisper,
    is_built,
)
from omni_serve.default.ctc_train import edit_distance
from omni_serve.default.gguf_llama import unpermute_rope
from omni_serve.default.whisper_lora import SHAPE_FILE as LORA_SHAPE_FILE
from omni_serve.default.whisper_lora import decoder_target_names, merge_lora
from omni_serve.engine import (
    AudioChunk,
    Engine,
    ErrorEvent,
    Finished,
    GenerationOptions,
    SpeechRequest,
    TextDelta,
    prepare_waveform,
)
from omni_serve.model import loader
from omni_serve.model.espeak import (
    PAUSE,
    UNIT_INVENTORY,
    WORD_BOUNDARY,
    EspeakSettings,
    EspeakTextUnitStream,
    EspeakVocoder,
    EspeakVocoderStream,
    phonemizer_for,
    split_mnemonics,
    units_to_phoneme_text,
    wav_samples,
)
from omni_serve.model.loader import OmniModel, load_model
from omni_serve.model.prompt import template_from_config
from omni_serve.model.speech_encoder import load_whisper_checkpoint, log_mel_windows
from omni_serve.model.transcription import TranscriptionFrontEnd, as_typed
from omni_serve.model.units import CTCUnitStream

QUESTION = "What is the capital of France?"


def espeak_question(text: str, voice: str = "en-us+f3", speed: int = 140) -> np.ndarray:
    result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", "--stdin"], input=text.encode(),
                            capture_output=True, check=True)
    return prepare_waveform(wav_samples(result.stdout), 22_050)


def word_error_rate(reference: str, hypothesis: str) -> float:
    normalize = EnglishTextNormalizer()
    ref, hyp = normalize(reference).split(), normalize(hypothesis).split()
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        previous, row = row, [i]
        for j, h in enumerate(hyp, 1):
            row.append(min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + (r != h)))
    return row[-1] / max(1, len(ref))


@pytest.fixture(scope="session")
def built_dir(tmp_path_factory):
    return build_default(tmp_path_factory.mktemp("default") / "omni-smol", progress=False)


@pytest.fixture(scope="session")
def smol(built_dir):
    """In fp32 (the same answers on every CI machine); `test_the_default_runs_in_bf16_where_the_cpu_has_it`
    covers the bf16 that "auto" picks on CPUs with native bf16."""
    return load_model(built_dir, device="cpu", dtype="float32")


# --- conversions ---------------------------------------------------------------------------------


def test_rope_unpermute_inverts_llama_cpp_order():
    """llama.cpp writes q/k rows as permute(w) = reshape(h, 2, d/2h, ...).swapaxes(1, 2); we undo exactly that."""
    heads, rows, cols = 3, 24, 5
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    llama_cpp = weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    np.testing.assert_array_equal(unpermute_rope(llama_cpp, heads), weight)


def test_build_is_reused_and_complete(built_dir):
    assert is_built(built_dir, Sources.locate(), "learned")
    assert build_default(built_dir) == built_dir  # current: returns without rebuilding
    for name in ("config.json", "model.safetensors", "tokenizer.json", SPEECH_ENCODER_FILE, "README.md"):
        assert (built_dir / name).is_file(), name


def test_whisper_checkpoint_loads_strictly(built_dir):
    dims, state = load_whisper_checkpoint(built_dir / SPEECH_ENCODER_FILE)
    assert (dims.n_mels, dims.n_audio_layer, dims.n_text_layer, dims.n_vocab) == (80, 4, 4, 51864)
    Whisper(dims).load_state_dict(state, strict=True)


def test_whisper_is_the_shipped_one_plus_the_trained_adaptation(built_dir, tmp_path):
    """Encoder, embeddings and norms are Whisper tiny.en's own; every decoder linear layer carries the
    LoRA update from checkpoints/omni-smol/, merged (so serving needs no LoRA code)."""
    dims, built = load_whisper_checkpoint(built_dir / SPEECH_ENCODER_FILE)
    _, shipped = load_whisper_checkpoint(convert_base_whisper(tmp_path))
    changed = {key for key in built if not torch.equal(built[key], shipped[key])}
    assert changed == {f"{name}.weight" for name in decoder_target_names(dims.n_text_layer)}
    expected = merge_lora(shipped, CHECKPOINT_DIR, WHISPER_ADAPTATION_STRENGTH)
    for key in changed:
        torch.testing.assert_close(built[key], expected[key])
    adaptation = json.loads((built_dir / "config.json").read_text())["omni_serve"]["transcription"]["whisper_adaptation"]
    assert adaptation["step"] > 0 and adaptation["rank"] == json.loads((CHECKPOINT_DIR / LORA_SHAPE_FILE).read_text())["rank"]
    assert adaptation["merge_strength"] == WHISPER_ADAPTATION_STRENGTH


def test_everyday_words_are_whole_words(built_dir):
    """The Whisper adaptation's everyday vocabulary keeps common words and drops BPE fragments."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from omni_serve.default.transcriber_data import NAME, everyday_words

    llm = LlamaForCausalLM.from_pretrained(built_dir, dtype=torch.float32).eval()
    words = everyday_words(llm, AutoTokenizer.from_pretrained(built_dir), whisper.tokenizer.get_tokenizer(False),
                           max_candidates=1500)
    assert len(words) > 600 and all(w.isalpha() and w.islower() for w in words)
    assert {"people", "water", "house"} <= set(words)
    assert not {"comp", "wor", "dis", "res", "app", "cont"} & set(words)  # whole-word tokens that are fragments
    names = everyday_words(llm, AutoTokenizer.from_pretrained(built_dir), whisper.tokenizer.get_tokenizer(False),
                           max_candidates=600, pattern=NAME)  # what generator (b)'s vocabulary texts add
    assert all(w[0].isupper() and w[1:].islower() for w in names) and {"John", "America", "September"} <= set(names)


def test_everyday_words_the_llm_writes_in_pieces(built_dir):
    """Generator (b)'s vocabulary of longer words: each is written by the LLM in exactly the asked number of
    tokens, and none of them is one of the whole-word tokens the default vocabulary already holds."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from omni_serve.default.transcriber_data import everyday_words

    llm = LlamaForCausalLM.from_pretrained(built_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(built_dir)
    whisper_tokenizer = whisper.tokenizer.get_tokenizer(False)
    split = everyday_words(llm, tokenizer, whisper_tokenizer, max_candidates=400, pieces=(2, 3))
    whole = everyday_words(llm, tokenizer, whisper_tokenizer, max_candidates=1500)
    assert len(split) > 100 and all(w.isalpha() and w.islower() for w in split)
    assert all(len(tokenizer(" " + w, add_special_tokens=False).input_ids) in (2, 3) for w in split)
    assert not set(split) & set(whole)


def test_prompt_is_the_chat_template(smol):
    """Our template pieces reproduce the tokenizer's own ChatML rendering, turn after turn."""
    template = template_from_config(smol.config.extras)
    tokenizer = smol.tokenizer
    messages = [{"role": "system", "content": template.system_prompt}, {"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert template.opening() + template.user_turn("Hi") == expected
    answer = messages + [{"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    expected_two = tokenizer.apply_chat_template(answer, tokenize=False, add_generation_prompt=True)
    ours = expected + "Hello" + tokenizer.eos_token + template.after_answer + template.user_turn("Bye")
    assert ours == expected_two
    assert chat_template_spec(tokenizer, "x")["user_content"] == "<speech>"


# --- loading through the published path ----------------------------------------------------------


def test_default_loads_through_the_published_path(smol):
    assert smol.name == "omni-smol"
    assert isinstance(smol.front_end, TranscriptionFrontEnd)
    assert smol.front_end.options.beam_size == 10 and smol.front_end.options.llm_rescoring_weight == 0.5  # config
    assert smol.front_end.scorer is not None and smol.front_end.scorer.network is smol.network
    assert isinstance(smol.vocoder, EspeakVocoder) and smol.vocoder.sample_rate == 16_000
    assert isinstance(smol.new_unit_stream(), CTCUnitStream)  # generator (b), the trained decoder
    assert not hasattr(smol.network.model, "speech_projector") and hasattr(smol.network, "speech_generator")
    assert torch.equal(smol.network.lm_head.weight, smol.network.model.embed_tokens.weight)  # tied in the file
    assert smol.config.llm.rope_parameters["rope_theta"] == 100000.0


def test_beam_decoding_is_whispers_own(smol):
    """Without the LLM's rescoring the front end's beam search gives what openai-whisper's decode gives (typed)."""
    front_end = smol.front_end
    whisper_only = TranscriptionFrontEnd(front_end.model, front_end.embed_tokens, front_end.tokenizer,
                                         replace(front_end.options, llm_rescoring_weight=None))
    audio = espeak_question("How many legs does a spider have?", "en-gb-x-rp+m7", 150)
    mel = log_mel_windows(audio, front_end.model.dims.n_mels)
    options = whisper.DecodingOptions(language="en", fp16=False, beam_size=front_end.options.beam_size,
                                      without_timestamps=True)
    assert whisper_only.transcribe(audio) == as_typed(whisper.decode(front_end.model, mel, options)[0].text)


def test_question_longer_than_one_window_is_transcribed_whole(smol):
    """Past 30 s, each Whisper window is beam-decoded on its own and the texts joined in order."""
    first, second = espeak_question("What is the capital of France?"), espeak_question("How many legs does a spider have?")
    audio = np.concatenate([first, np.zeros(16_000 * 30 - first.size, dtype=np.float32), second])
    words = EnglishTextNormalizer()(smol.front_end.transcribe(audio)).split()
    assert words.index("france") < words.index("spider")


def test_noise_is_refused_rather_than_answered(smol):
    """Whisper makes up words for noise; its no-speech judgement turns that into a clear error."""
    noise = np.random.default_rng(0).normal(0, 0.05, 48_000).astype(np.float32)
    engine = Engine(smol, max_batch_size=1)
    try:
        events = list(engine.generate(SpeechRequest(noise, GenerationOptions(max_new_tokens=8))))
    finally:
        engine.close()
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert events[0].code == "bad_audio" and "no speech" in events[0].message


def test_a_window_of_noise_after_the_question_is_left_out(smol):
    question = espeak_question(QUESTION)
    noise = np.random.default_rng(1).normal(0, 0.05, 16_000 * 4).astype(np.float32)
    audio = np.concatenate([question, np.zeros(16_000 * 30 - question.size, dtype=np.float32), noise])
    assert smol.front_end.transcribe(audio) == smol.front_end.transcribe(question)


def test_converted_llm_answers_a_typed_question(smol):
    """A wrong conversion (e.g. q/k row order) gives gibberish; the right one knows this."""
    embeds = smol.front_end.embed_text(QUESTION)
    ids = smol.tokenizer(smol.template.opening() + smol.template.user_turn(""), add_special_tokens=False).input_ids
    split = len(smol.tokenizer(smol.template.opening() + smol.template.user_turn("").split("<|im_end|>\n<|im_start|>assistant")[0],
                               add_special_tokens=False).input_ids)
    with torch.inference_mode():
        table = smol.network.model.embed_tokens
        prompt = torch.cat([table(torch.tensor(ids[:split])), embeds, table(torch.tensor(ids[split:]))]).unsqueeze(0)
        cache = smol.network.new_cache()
        step = smol.network.step(prompt, cache)
        tokens = []
        for _ in range(12):
            tokens.append(int(step.logits[0].argmax()))
            step = smol.network.step(smol.network.embed_tokens(torch.tensor([[tokens[-1]]])), cache)
    assert "Paris" in smol.tokenizer.decode(tokens)


# --- espeak-ng units and vocoder ------------------------------------------------------------------


def test_phonemizer_units_are_in_the_inventory():
    settings = EspeakSettings()
    names = phonemizer_for(settings).text("Paris is the capital of France. It has 2,000 years of history!")
    assert set(names) <= set(UNIT_INVENTORY)
    assert names.count(PAUSE) == 2 and names[-1] == PAUSE
    assert names.count(WORD_BOUNDARY) >= 8
    assert split_mnemonics("'aI@_:", frozenset(UNIT_INVENTORY)) == ["'", "aI@", PAUSE]
    assert units_to_phoneme_text(["h", "@", "l", "'", "oU", WORD_BOUNDARY, "w", "'", "3:", "l", "d", PAUSE]) == \
        "[[h@l'oU w'3:ld_:]]"


def test_text_unit_stream_emits_each_word_when_complete():
    settings = EspeakSettings()
    stream = EspeakTextUnitStream(settings)
    deltas = ["The", " capital", " of", " France", " is", " Paris", ".", " It", "'s", " big", "."]
    pushed = [stream.push(torch.zeros(1), 0, delta) for delta in deltas]
    tail = stream.finish()
    assert pushed[0] == [] and pushed[1] != []  # "The" is complete only when " capital" starts
    assert pushed[6] == []  # "Paris." waits for the next word
    names = [settings.units[u] for chunk in [*pushed, tail] for u in chunk]
    assert names.count(PAUSE) == 2 and names[-1] == PAUSE
    assert names.count(WORD_BOUNDARY) == len(["The", "capital", "of", "France", "is", "Paris.", "It's", "big."]) - 2


def test_vocoder_streams_whole_words_at_16k():
    settings = EspeakSettings()
    index = {name: i for i, name in enumerate(settings.units)}
    vocoder = EspeakVocoder(settings)
    units = [index[n] for n in ["h", "@", "l", "'", "oU", WORD_BOUNDARY, "w", "'", "3:", "l", "d", PAUSE]]
    stream = vocoder.stream()
    assert stream.push(units[:3], final=False).size == 0  # half a word waits
    first = stream.push(units[3:8], final=False)
    rest = stream.push(units[8:], final=True)
    assert first.dtype == np.float32 and 0.15 * 16_000 < first.size < 1.0 * 16_000
    assert rest.size > 0
    whole = vocoder.vocode(units)
    assert 0.3 * 16_000 < whole.size < 2.0 * 16_000 and np.abs(whole).max() > 0.05


def test_vocoder_stream_waits_for_clause_ends_only_while_audio_is_in_hand():
    settings = EspeakSettings()
    index = {name: i for i, name in enumerate(settings.units)}
    hello, world = ["h", "@", "l", "'", "oU", WORD_BOUNDARY], ["w", "'", "3:", "l", "d", WORD_BOUNDARY]
    now = [0.0]
    stream = EspeakVocoderStream(EspeakVocoder(settings), clock=lambda: now[0])

    def push(names: list[str], final: bool = False) -> float:
        return stream.push([index[n] for n in names], final).size / 16_000

    assert push(hello + world * 4 + hello[:3]) > 2.0  # nothing in hand yet: every complete word is spoken
    assert stream.in_hand_s() > 2.0  # the clock has not moved: none of it has played
    assert push(hello[3:] + world[:-1] + [PAUSE] + hello) > 0  # through the clause end ...
    assert stream.pending == hello  # ... the word after it waits for its clause
    assert push(world) == 0  # still a clause open and audio in hand: nothing new is spoken
    now[0] = 60.0  # playback caught up
    assert stream.in_hand_s() < 0 and push([]) > 0 and stream.pending == []
    assert push(hello[:2], final=True) > 0  # the last push speaks what is left, word or not


# --- end to end ------------------------------------------------------------------------------------


def test_spoken_question_gets_text_and_matching_speech(smol):
    """Speak a question, get text and audio; Whisper's transcript of the audio is close to the text."""
    assert_spoken_answer_is_heard(smol)


def assert_spoken_answer_is_heard(model: OmniModel) -> None:
    """Text and streamed audio come back for a spoken question, and the audio says the text.

    "Says" is measured against espeak-ng reading the same text directly: Whisper tiny.en mishears
    espeak's voice on its own (about 15-25% WER), so the streamed speech may add at most 20 points.
    """
    audio = espeak_question(QUESTION)
    engine = Engine(model, max_batch_size=1)
    try:
        events = list(engine.generate(SpeechRequest(audio, GenerationOptions(max_new_tokens=40))))
    finally:
        engine.close()
    final = events[-1]
    assert isinstance(final, Finished)
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert final.text.strip() and "".join(e.text for e in events if isinstance(e, TextDelta)) == final.text
    assert len(chunks) >= 1 and all(c.sample_rate == 16_000 for c in chunks)
    speech = np.concatenate([c.samples for c in chunks])
    assert speech.size > 16_000 * 0.5
    settings = model.vocoder.settings
    direct = espeak_question(final.text, settings.voice, settings.speed)
    streamed_wer = word_error_rate(final.text, model.front_end.transcribe(speech))
    assert streamed_wer <= word_error_rate(final.text, model.front_end.transcribe(direct)) + 0.2
    assert streamed_wer <= 0.6


def test_the_default_runs_in_bf16_where_the_cpu_has_it(built_dir, monkeypatch):
    """"auto" on a CPU with native bf16 runs the LLM in the model's `cpu_dtype` (bf16 halves the bytes each
    token reads: the default's main CPU cost), keeps Whisper in fp32, and still answers aloud; on a CPU
    without it (emulated bf16 is slower than fp32), fp32."""
    assert json.loads((built_dir / "config.json").read_text())["omni_serve"]["cpu_dtype"] == "bfloat16"
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    assert loader.pick_dtype(torch.device("cpu"), "auto", "bfloat16") == torch.float32
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    assert loader.pick_dtype(torch.device("cpu"), "auto", None) == torch.float32
    assert loader.pick_dtype(torch.device("cpu"), "float32", "bfloat16") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'half'; choose from auto, float32"):
        loader.pick_dtype(torch.device("cpu"), "half")
    model = load_model(built_dir, device="cpu")
    assert model.network.lm_head.weight.dtype == torch.bfloat16
    assert model.network.speech_generator.output_proj.weight.dtype == torch.bfloat16
    assert model.front_end.model.encoder.conv1.weight.dtype == torch.float32
    assert_spoken_answer_is_heard(model)
    # The units of a typed answer still spell it (bf16 rounds the decoder's inputs and weights).
    events, _ = streamed_and_offline_units(model, QUESTION, max_new_tokens=24)
    settings = EspeakSettings.from_extras(model.config.extras)
    target = phonemizer_for(settings).text(events[-1].text)
    spoken = [settings.units[u] for u in events[-1].units]
    assert edit_distance(target, spoken) <= 0.15 * len(target)


def test_learned_generator_streams_what_the_trained_decoder_computes_offline(smol):
    """Generator (b), the default: the shipped trained decoder, merged into the folder, streams in the
    engine the units that one full pass of the decoder (as in training) gives over the same answer."""
    from safetensors.torch import load_file

    from omni_serve.default.build import CHECKPOINT_DIR

    model = smol
    assert model.config.unit_generator == "ctc" and model.config.ctc_token_embedding
    generator = model.network.speech_generator
    for key, value in load_file(str(CHECKPOINT_DIR / "ctc_decoder.safetensors")).items():
        assert torch.equal(generator.state_dict()[key], value.float()), key

    shape = json.loads((CHECKPOINT_DIR / "ctc_decoder.json").read_text())
    assert model.config.ctc_number_places == shape.get("number_places", False)
    assert not model.config.ctc_decode_end_token  # trained on texts without one: the end of turn adds no sound

    # The second answer holds numbers ("365.25"): a decoder that spells digits by place holds them back.
    for question in (QUESTION, "How many days are in a year?"):
        events, offline = streamed_and_offline_units(model, question, max_new_tokens=24)
        assert sum(e.samples.size for e in events if isinstance(e, AudioChunk)) > 0
        assert offline and events[-1].units == offline
    assert events[-1].stopped_on_eos and any(c.isdigit() for c in events[-1].text)


def test_text_generator_builds_into_its_own_folder_and_answers_aloud(tmp_path_factory):
    """Generator (a), espeak-ng phonemes of the streamed text: its own folder and name, no speech decoder."""
    folder = build_default(tmp_path_factory.mktemp("text") / "omni-smol-espeak_text", progress=False,
                           generator="espeak_text")
    model = load_model(folder, device="cpu", dtype="float32")
    assert model.name == "omni-smol-espeak_text" and model.config.unit_generator == "espeak_text"
    assert isinstance(model.new_unit_stream(), EspeakTextUnitStream)
    assert not hasattr(model.network, "speech_generator")
    assert_spoken_answer_is_heard(model)


def test_demo_launches_the_stack_on_the_built_model():
    from omni_serve.cli.demo import launch_command

    command = launch_command("/models/omni-smol", ["--", "--web-port", "8000"])
    assert command[1:] == ["-m", "omni_serve", "launch", "--model-path", "/models/omni-smol", "--cpu-workers", "1",
                           "--web", "--web-port", "8000"]
