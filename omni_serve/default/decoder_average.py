"""Weight averaging of trained CTC decoders: one decoder whose weights are the mean of several runs'.

Runs that continue one another (`omni-serve train --init-from`) end near each other, and the mean
of their weights is often heard better than either (a cheap ensemble that costs nothing at run
time): omni-smol's shipped decoder is the mean of `run9` and `run10`, `run9` continued on three more
files (see its model card). Runs trained from unrelated starts have no such common basin; averaging
them gives noise, and only the listener can tell, so this checks shapes, not lineage.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from omni_serve.default.ctc_train import SHAPE_FILE, WEIGHTS_FILE, saved_decoder

ARCHITECTURE = ("layers", "hidden", "heads", "ffn", "upsample_factor", "token_embedding", "token_positions",
                "token_spelling", "spelling_before", "spelling_after", "number_places", "llm_hidden", "units",
                "rope_theta")


def decoder_shape(run: Path) -> dict[str, Any]:
    if not (run / SHAPE_FILE).is_file():
        raise ValueError(f"{run} has no {SHAPE_FILE}: not a trained or exported decoder")
    return json.loads((run / SHAPE_FILE).read_text())


def average_decoders(runs: Sequence[Path], out: Path) -> dict[str, Any]:
    """Write the mean of `runs`' decoders to `out` as `train` exports one (fp16 weights and a shape
    record that also names the runs); returns that record."""
    if len(runs) < 2:
        raise ValueError("averaging needs at least two runs")
    shapes = [decoder_shape(run) for run in runs]
    for run, shape in zip(runs[1:], shapes[1:]):
        differ = [key for key in ARCHITECTURE if shape.get(key) != shapes[0].get(key)]
        if differ:
            raise ValueError(f"{run} holds a decoder of another shape than {runs[0]} ({', '.join(differ)} differ)")
    weights = [saved_decoder(run)[0] for run in runs]
    sizes = {name: tuple(value.shape) for name, value in weights[0].items()}
    for run, other in zip(runs[1:], weights[1:]):
        if {name: tuple(value.shape) for name, value in other.items()} != sizes:
            raise ValueError(f"{run}'s weights differ from {runs[0]}'s in names or sizes")
    mean = {name: torch.stack([w[name].float() for w in weights]).mean(0).half().contiguous() for name in sizes}
    out.mkdir(parents=True, exist_ok=True)
    save_file(mean, str(out / WEIGHTS_FILE))
    record = {**shapes[-1], "step": max(int(shape["step"]) for shape in shapes),
              "averaged_from": [{"run": run.name, "step": shape["step"]} for run, shape in zip(runs, shapes)]}
    (out / SHAPE_FILE).write_text(json.dumps(record, indent=1))
    return record
