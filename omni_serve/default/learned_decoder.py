"""Unit generator (b) of omni-smol: the CTC speech decoder trained by `omni-serve train`, added to a built folder.

The trained decoder (`checkpoints/omni-smol/ctc_decoder.safetensors` with its shape in
`ctc_decoder.json`) goes into the folder's model.safetensors under the published checkpoint's
`speech_generator.` prefix, and its shape into config.json's published fields, so the model loads
through the same code as the published checkpoint; only the `omni_serve` block adds the two
options the published decoder lacks (token embedding, token positions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from omni_serve.default.ctc_train import SHAPE_FILE, WEIGHTS_FILE
from omni_serve.default.gguf_llama import LlamaShape
from omni_serve.model.errors import CheckpointError
from omni_serve.model.espeak import EspeakSettings


def attach_learned_decoder(folder: Path, trained: Path, llm: LlamaShape) -> dict[str, Any]:
    """Merge the decoder in `trained` into `folder`'s model.safetensors; the config.json fields it needs.

    The decoder's layers take the LLM's rope and norm settings (as the published one does), so the
    shape it was trained with must match them.
    """
    if not (trained / WEIGHTS_FILE).is_file() or not (trained / SHAPE_FILE).is_file():
        raise CheckpointError(f"no trained speech decoder ({WEIGHTS_FILE}, {SHAPE_FILE}) in {trained}")
    shape = json.loads((trained / SHAPE_FILE).read_text())
    if tuple(shape["units"]) != EspeakSettings().units:
        raise CheckpointError("the trained decoder's units differ from the espeak vocoder's unit inventory")
    if shape["llm_hidden"] != llm.hidden_size or float(shape["rope_theta"]) != float(llm.rope_theta):
        raise CheckpointError("the trained decoder was made for another LLM (hidden size or rope theta differ)")
    state = load_file(str(folder / "model.safetensors"))
    for key, value in load_file(str(trained / WEIGHTS_FILE)).items():
        state[f"speech_generator.{key}"] = value.float()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return {
        "published": {
            "speech_generator_type": "ctc",
            "ctc_decoder_config": f"({shape['layers']},{shape['hidden']},{shape['heads']},{shape['ffn']})",
            "ctc_upsample_factor": shape["upsample_factor"],
            "unit_vocab_size": len(shape["units"]),
        },
        "omni_serve": {
            "unit_generator": "ctc",
            "ctc_token_embedding": bool(shape["token_embedding"]),
            "ctc_token_positions": bool(shape["token_positions"]),
            "ctc_token_spelling": int(shape.get("token_spelling", 0)),
            "ctc_spelling_context": [int(shape.get("spelling_before", 0)), int(shape.get("spelling_after", 0))],
            "ctc_number_places": bool(shape.get("number_places", False)),
            "ctc_decode_end_token": False,  # its training texts end without one: it would add a stray sound
            "ctc_decoder_step": shape.get("step"),
        },
    }
