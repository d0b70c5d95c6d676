"""Random models in the published folder layout, for tests and for planning on a GPU.

`tiny` is small enough for CPU tests; `8b` has the published shapes (config only, plus weights made
in memory by `random_network`), so memory and latency can be measured without downloading 18 GB.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from omni_serve.model.config import OmniConfig
from omni_serve.model.omni_model import OmniSpeechLlama

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>", "<|finetune_right_pad_id|>"]
TRAINING_TEXT = [
    "You are a helpful language and speech assistant.", "Please directly answer the questions in the user's speech.",
    "What is the capital of France?", "The capital of France is Paris.", "Tell me a joke about cats.",
    "system user assistant", "Hello, how are you today?", "I am fine, thank you.",
]

SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": None, "ctc_decoder_config": "(2,64,4,128)",
        "speech_encoder_hidden_size": 64, "max_position_embeddings": 2048,
        "whisper": {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 64, "n_audio_head": 4, "n_audio_layer": 2,
                    "n_vocab": 51866, "n_text_ctx": 448, "n_text_state": 8, "n_text_head": 2, "n_text_layer": 1},
        "vocoder": {"upsample_initial_channel": 32, "embedding_dim": 16}},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "ctc_decoder_config": "(2,4096,32,11008)",
        "speech_encoder_hidden_size": 1280, "max_position_embeddings": 131072,
        "whisper": {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 1280, "n_audio_head": 20, "n_audio_layer": 32,
                    "n_vocab": 51866, "n_text_ctx": 448, "n_text_state": 8, "n_text_head": 2, "n_text_layer": 1},
        "vocoder": {"upsample_initial_channel": 512, "embedding_dim": 128}},
}


def build_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Llama-3's special tokens, trained on a few sentences (deterministic)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT * 5, trainer)
    tokenizer.add_special_tokens(LLAMA3_SPECIALS)
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   model_max_length=2048)
    fast.save_pretrained(str(folder))
    return fast


def model_config(shape: str, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> dict:
    spec = SHAPES[shape]
    return {
        "architectures": ["OmniSpeech2SLlamaForCausalLM"], "model_type": "omni_speech2s_llama",
        "hidden_size": spec["hidden_size"], "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"], "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"], "vocab_size": spec["vocab_size"] or vocab_size,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": spec["max_position_embeddings"],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<|end_of_text|>"), tokenizer.eos_token_id],
        "speech_encoder": "speech_encoder/whisper.pt", "speech_encoder_type": "whisper", "speech_encoder_ds_rate": 5,
        "speech_encoder_hidden_size": spec["speech_encoder_hidden_size"], "speech_projector_type": "linear",
        "speech_generator_type": "ctc", "ctc_decoder_config": spec["ctc_decoder_config"], "ctc_upsample_factor": 25,
        "ctc_loss_weight": 1.0, "unit_vocab_size": 1000, "speech_normalize": False,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float32",
    }


def random_network(config: OmniConfig, seed: int = 0, gain: float = 2.0) -> OmniSpeechLlama:
    """Random weights with enough scale that greedy outputs vary (std = gain / sqrt(fan_in))."""
    torch.manual_seed(seed)
    network = OmniSpeechLlama(config)
    with torch.no_grad():
        for name, param in network.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.copy_(1 + 0.25 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            elif "embed_tokens" in name:
                param.normal_(0, 1)
            else:
                param.normal_(0, gain / math.sqrt(param.shape[-1]))
    return network


def write_whisper(path: Path, dims: dict, seed: int = 0) -> None:
    """A random openai-whisper checkpoint (encoder and a minimal decoder) with the given dims."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(**dims))
    with torch.no_grad():
        for name, param in model.encoder.named_parameters():
            if "ln" in name and name.endswith("weight"):
                param.copy_(1 + 0.25 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
            else:
                param.normal_(0, 2.0 / math.sqrt(param[0].numel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": dims, "model_state_dict": model.state_dict()}, path)


def write_vocoder(folder: Path, channels: int, embedding_dim: int, seed: int = 0) -> None:
    """A random unit HiFi-GAN saved as fairseq does: weight-normalised convs in {"generator": state}."""
    from omni_serve.model.vocoder import UnitHiFiGAN, VocoderConfig

    raw = {"resblock": "1", "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
           "upsample_initial_channel": channels, "resblock_kernel_sizes": [3, 7, 11],
           "resblock_dilation_sizes": [[1, 3, 5]] * 3, "num_embeddings": 1000, "embedding_dim": embedding_dim,
           "model_in_dim": embedding_dim, "dur_predictor_params": {
               "encoder_embed_dim": embedding_dim, "var_pred_hidden_dim": embedding_dim,
               "var_pred_kernel_size": 3, "var_pred_dropout": 0.5}, "sampling_rate": 16000, "code_hop_size": 320}
    torch.manual_seed(seed)
    model = UnitHiFiGAN(VocoderConfig.from_dict(raw))
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith(".weight") and param.dim() == 3:  # weight-normalised conv: store (g, v)
            prefix = name[: -len("weight")]
            dim0 = param.shape[0]
            state[prefix + "weight_v"] = torch.randn_like(param)
            state[prefix + "weight_g"] = 1.2 * (1 + 0.1 * torch.randn(dim0, 1, 1))
        elif name.startswith("dur_predictor.proj"):
            state[name] = torch.full_like(param, math.log(4)) if name.endswith("bias") else 0.08 * torch.randn_like(param)
        elif name.endswith("bias"):
            state[name] = 0.1 * torch.randn_like(param)
        else:
            state[name] = torch.randn_like(param) if "dict" in name else 1 + 0.25 * torch.randn_like(param)
    for key in [k for k in state if k.startswith("dur_predictor.conv") and k.endswith("weight_v")]:
        prefix = key[: -len("weight_v")]
        v = state.pop(key)
        state.pop(prefix + "weight_g")
        state[prefix + "weight"] = v / math.sqrt(v[0].numel())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"generator": state}, folder / "g_00000000")
    (folder / "config.json").write_text(json.dumps(raw, indent=1))


def make_model_folder(out: Path, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a complete model folder; for `8b` the weights are left out (see `random_network`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    raw = model_config(shape, len(tokenizer), tokenizer)
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    spec = SHAPES[shape]
    if shape == "tiny":
        network = random_network(OmniConfig.from_dict(raw), seed)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(out / "model.safetensors"))
        write_whisper(out / "speech_encoder" / "whisper.pt", spec["whisper"], seed)
        write_vocoder(out / "vocoder", spec["vocoder"]["upsample_initial_channel"], spec["vocoder"]["embedding_dim"], seed)
    else:
        (out / "whisper_dims.json").write_text(json.dumps(spec["whisper"], indent=1))
        (out / "vocoder_config_shape.json").write_text(json.dumps(spec["vocoder"], indent=1))
    return out
