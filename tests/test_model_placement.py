"""A model is built wholly where it is asked to be: a tensor left on a fixed device breaks every GPU request,
and CI has no GPU, so the meta device stands in for it."""

from __future__ import annotations

import torch
from conftest import MODEL_DIR

from omni_serve.model.config import OmniConfig
from omni_serve.model.omni_model import OmniSpeechLlama


def test_every_parameter_and_buffer_is_made_on_the_device_being_built_on():
    """`load_network` builds under `torch.device(device)`; the CTC decoder's rotary frequencies were once
    made on the CPU whatever that device was (found on an H200: every request failed)."""
    with torch.device("meta"):
        network = OmniSpeechLlama(OmniConfig.from_file(MODEL_DIR / "config.json"))
    tensors = [*network.named_parameters(), *network.named_buffers()]
    assert tensors
    assert [name for name, tensor in tensors if tensor.device.type != "meta"] == []
