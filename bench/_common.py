"""Shared pieces of the bench scripts: arguments, timing, tables, and random models of chosen sizes.

Every script runs as `python bench/NAME.py` (a table), `--quick` (under about a minute) or `--json`
(one JSON object). The machine is shared, so each figure is the median of repeated runs, with the
spread (min..max) beside it where it matters.

Import this module before torch: it sets OMP_WAIT_POLICY=PASSIVE (unless already set, or `--omp-spin`
is given). With other jobs on the same 2 cores, OpenMP's default spin-waiting makes every small op
wait for a descheduled thread (measured: 256 fixture decoder steps 9.4 s spinning vs 1.0 s passive);
passive waiting keeps the figures about the code, not about the neighbours. On an idle machine
spinning is faster where many small ops follow each other (the streaming vocoder with 10-unit
chunks: RTF 0.147 spinning vs 0.198 passive), so `--omp-spin` shows that case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

TORCH_FIRST = "torch" in sys.modules  # too late to change the OpenMP wait policy
if "--omp-spin" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/NAME.py` without installing
    sys.path.insert(0, str(ROOT))

from omni_serve.cli.infer import DTYPE_CHOICES, DTYPE_HELP  # after the path above

FIXTURES = ROOT / "tests" / "fixtures" / "llama-omni-ref"
FIXTURE_MODEL = FIXTURES / "omni-tiny-ref"
FIXTURE_VOCODER = FIXTURES / "vocoder-tiny-ref"
QUESTIONS = [FIXTURES / "inputs" / "q1.wav", FIXTURES / "inputs" / "q2.wav"]
THREADS = 2
CACHE_DIR = Path(tempfile.gettempdir()) / "omni-serve-bench"

# Random models bigger than the fixture, for the figures where size matters. `mid` is what a CPU can
# decode at a useful rate while batching still pays; `published` is the released decoder/vocoder shape.
MODEL_SHAPES = {
    "mid": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
        "num_key_value_heads": 8, "ctc_decoder_config": "(2,512,8,1408)", "speech_encoder_hidden_size": 384,
        "whisper": {"n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": 384, "n_audio_head": 6, "n_audio_layer": 4,
                    "n_vocab": 51866, "n_text_ctx": 448, "n_text_state": 8, "n_text_head": 2, "n_text_layer": 1},
        "vocoder": {"upsample_initial_channel": 512, "embedding_dim": 128}},
}
PUBLISHED_VOCODER = {"upsample_initial_channel": 512, "embedding_dim": 128}


def parse_args(description: str, add: Callable[[argparse.ArgumentParser], None] | None = None,
               devices: bool = False) -> argparse.Namespace:
    """The common options; `devices` adds --device and --dtype for scripts that can run on a GPU."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a short run (under about a minute)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement (median reported)")
    parser.add_argument("--omp-spin", action="store_true",
                        help="keep OpenMP's default spin-waiting (faster when idle, far slower on shared cores)")
    if devices:
        parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
        parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help=DTYPE_HELP)
    if add:
        add(parser)
    args = parser.parse_args()
    if devices and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    setup_torch()
    return args


def setup_torch() -> None:
    import transformers

    torch.set_num_threads(THREADS)
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        if torch.cuda.is_initialized():  # GPU work is queued: the time counts once it is done
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """'median (min..max)' with three significant figures."""
    return f"{median(values):.3g} ({min(values):.3g}..{max(values):.3g})" if values else "-"


def print_table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def emit_json(figures: dict) -> None:
    print(json.dumps(figures, indent=1, default=float))


def machine_note() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    policy = os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)")
    policy += " (set after torch was imported: ignored)" if TORCH_FIRST else ""
    gpu = f"GPU {torch.cuda.get_device_name()}, " if torch.cuda.is_initialized() else ""
    return (f"{gpu}torch {torch.__version__}, {THREADS} threads, OMP_WAIT_POLICY={policy}, load average "
            f"{' '.join(load)} (shared machine: figures are medians)")


def random_model_folder(name: str, seed: int = 0) -> Path:
    """A complete random model folder (weights, tokenizer, Whisper encoder, vocoder) of MODEL_SHAPES[name].

    Written once under the temp dir and reused. The tokenizer is the tiny one (about 400 ids), so
    the vocabulary stays small; the LLM and decoder sizes are what the name says.
    """
    from safetensors.torch import save_file

    from omni_serve.model.config import OmniConfig
    from omni_serve.model.tiny import build_tokenizer, model_config, random_network, write_vocoder, write_whisper

    spec = MODEL_SHAPES[name]
    folder = CACHE_DIR / f"model-{name}-{seed}"
    if (folder / "done").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    raw = model_config("tiny", len(tokenizer), tokenizer)
    raw.update({k: v for k, v in spec.items() if k not in ("whisper", "vocoder")})
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
    network = random_network(OmniConfig.from_dict(raw), seed)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))
    write_whisper(folder / "speech_encoder" / "whisper.pt", spec["whisper"], seed)
    vocoder = spec["vocoder"]
    write_vocoder(folder / "vocoder", vocoder["upsample_initial_channel"], vocoder["embedding_dim"], seed)
    (folder / "done").write_text("")
    return folder


def published_vocoder_folder(seed: int = 0) -> Path:
    """The published vocoder's shape (512 channels, 128-dim units) with random weights, written once."""
    from omni_serve.model.tiny import write_vocoder

    folder = CACHE_DIR / f"vocoder-published-{seed}"
    if not (folder / "config.json").is_file():
        write_vocoder(folder, PUBLISHED_VOCODER["upsample_initial_channel"], PUBLISHED_VOCODER["embedding_dim"], seed)
    return folder


def no_eos(engine) -> None:
    """Random weights stop on EOS at random; a benchmark needs fixed lengths, so it ignores EOS."""
    engine.eos_ids = frozenset()
