"""Shared fixtures: the reference parity data (copied from the reference run) and engines built on it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

FIXTURES = Path(__file__).parent / "fixtures" / "llama-omni-ref"
MODEL_DIR = FIXTURES / "omni-tiny-ref"
VOCODER_DIR = FIXTURES / "vocoder-tiny-ref"
QUESTIONS = ("q1", "q2")

torch.set_num_threads(2)
transformers.logging.set_verbosity_error()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("OMNI_TEST_DEVICE", "cpu"),
                     help="device of the fixture model (cpu, cuda, cuda:1): run the parity and engine tests on a GPU")


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """Where the fixture model runs. On CUDA, TF32 is switched off: the parity tolerances are for fp32
    arithmetic, and TF32 convolutions and matrix products keep only 10 mantissa bits."""
    chosen = torch.device(request.config.getoption("--device"))
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            pytest.exit(f"--device {chosen} asked for, but torch sees no CUDA device", returncode=4)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return chosen


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="session")
def intermediates() -> dict:
    from safetensors.torch import load_file

    return load_file(FIXTURES / "intermediates.safetensors")


@pytest.fixture(scope="session")
def fixture_model(device):
    from omni_serve.model.loader import load_model

    return load_model(MODEL_DIR, vocoder=VOCODER_DIR, device=str(device), dtype="float32")  # parity is fp32


@pytest.fixture(scope="session")
def engine(fixture_model):
    from omni_serve.engine import Engine

    engine = Engine(fixture_model)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def question_audio() -> dict[str, np.ndarray]:
    from omni_serve.engine import load_audio

    return {q: load_audio(FIXTURES / "inputs" / f"{q}.wav") for q in QUESTIONS}


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: tiny ops on a shared two-core machine ran many times
    slower with two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def quality_bench(monkeypatch):
    """bench/quality.py as a module: its held-out questions and voices, which no training may use."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location("quality_bench", folder / "quality.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench
