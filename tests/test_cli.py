"""`omni-serve infer` and `make-tiny` as a user runs them: subprocesses, from other working directories."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import soundfile
from conftest import FIXTURES, MODEL_DIR, VOCODER_DIR


def omni(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "omni_serve", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def test_infer_reproduces_reference_from_another_directory(tmp_path, expected):
    """The config's relative speech_encoder path resolves through the model folder's ancestors."""
    out = tmp_path / "out"
    result = omni("infer", "--model-path", MODEL_DIR, "--vocoder", VOCODER_DIR, "--output-dir", out,
                  "--max-new-tokens", 24, FIXTURES / "inputs" / "q1.wav", FIXTURES / "inputs" / "q2.wav", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for question in ("q1", "q2"):
        record = json.loads((out / f"{question}.json").read_text())
        assert record["token_ids"] == expected["omni"][question]["generated_ids"]
        assert record["units"] == expected["omni"][question]["units"]
    audio, rate = soundfile.read(out / "q1.wav", dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(audio, np.load(FIXTURES / "vocoder-outputs" / "q1_all_units_dur.npy"), atol=1e-5, rtol=0)


def test_infer_accepts_a_jsonl_manifest_and_reports_bad_inputs(tmp_path, expected):
    shutil.copy(FIXTURES / "inputs" / "q2.wav", tmp_path / "question.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not really")
    manifest = tmp_path / "batch.jsonl"
    manifest.write_text(json.dumps({"audio": "question.wav", "id": "first"}) + "\n"
                        + json.dumps({"audio": "broken.wav"}) + "\n")
    result = omni("infer", "--model-path", MODEL_DIR, "--output-dir", tmp_path / "out", "--max-new-tokens", 24, manifest)
    assert result.returncode == 1
    assert "broken.wav" in result.stderr and "Traceback" not in result.stderr
    record = json.loads((tmp_path / "out" / "first.json").read_text())
    assert record["token_ids"] == expected["omni"]["q2"]["generated_ids"]
    assert not (tmp_path / "out" / "first.wav").exists()  # no vocoder given


def test_infer_refuses_a_penalty_out_of_range_before_loading(tmp_path):
    result = omni("infer", "--model-path", tmp_path / "no-model-here", "--frequency-penalty", 3,
                  FIXTURES / "inputs" / "q1.wav", cwd=tmp_path)
    assert result.returncode == 2
    assert "frequency_penalty and presence_penalty must be in [-2, 2]" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_speech_encoder_names_every_place_tried(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    result = omni("infer", "--model-path", model, FIXTURES / "inputs" / "q1.wav", cwd=tmp_path)
    assert result.returncode == 2
    assert "speech_encoder/tiny-whisper.pt" in result.stderr
    assert str(tmp_path / "speech_encoder" / "tiny-whisper.pt") in result.stderr
    assert str(model / "speech_encoder" / "tiny-whisper.pt") in result.stderr
    assert "--speech-encoder" in result.stderr and "Traceback" not in result.stderr


def test_explicit_speech_encoder_flag_wins(tmp_path, expected):
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    result = omni("infer", "--model-path", model, "--speech-encoder", FIXTURES / "speech_encoder" / "tiny-whisper.pt",
                  "--output-dir", tmp_path / "out", "--max-new-tokens", 24, FIXTURES / "inputs" / "q2.wav")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "q2.json").read_text())["units"] == expected["omni"]["q2"]["units"]


def test_make_tiny_writes_a_loadable_published_layout(tmp_path):
    folder = tmp_path / "tiny"
    assert omni("make-tiny", "--out", folder).returncode == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "speech_encoder/whisper.pt",
                 "vocoder/config.json", "vocoder/g_00000000"):
        assert (folder / name).is_file(), name
    result = omni("infer", "--model-path", folder, "--output-dir", tmp_path / "out", "--max-new-tokens", 6,
                  FIXTURES / "inputs" / "q1.wav", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "q1.json").read_text())
    assert len(record["token_ids"]) >= 1
    assert (tmp_path / "out" / "q1.wav").is_file()  # the folder's own vocoder/ is used
    eight = tmp_path / "eight"
    assert omni("make-tiny", "--out", eight, "--shape", "8b").returncode == 0
    config = json.loads((eight / "config.json").read_text())
    assert config["hidden_size"] == 4096 and config["ctc_decoder_config"] == "(2,4096,32,11008)"
