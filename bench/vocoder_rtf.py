"""Unit HiFi-GAN real-time factor (vocoder seconds / audio seconds) and streaming exactness.

Speed, with the published vocoder shape (512 channels, 128-dim units, random weights):
- whole utterance: `UnitHiFiGAN.forward` (durations, then one pass over all frames);
- streamed as the engine does by default (a first push of 10 units, then 40 at a time), and with
  chunks of 10 and 40 units: our `HiFiGANStream` (each sample computed once), and the
  previous approach, kept here to compare: each push re-synthesises a window with the receptive
  field of context on both sides.

Exactness, on the fixture vocoder and the fixture's 60 units (reference audio from fairseq):
the reference's independent chunking vs whole-utterance audio, our stream vs whole, and what a
smaller `lookahead_frames` costs in error and saves in latency.
"""

from __future__ import annotations

import json

from _common import FIXTURE_VOCODER, FIXTURES, emit_json, machine_note, median, parse_args, print_table, \
    published_vocoder_folder, timed

import numpy as np
import torch

GOAL_RTF = 0.15
CHUNKS = (10, 40)
LOOKAHEADS = (None, 16, 8, 4, 2, 0)


def window_stream(model, frames: torch.Tensor, frame_ends: list[int]) -> torch.Tensor:
    """The previous streaming method: per push, synthesise [emitted - R, target + R) and keep the new part."""
    receptive, spf, emitted, pieces = model.receptive_field_frames(), model.samples_per_frame, 0, []
    for index, available in enumerate(frame_ends):
        final = index == len(frame_ends) - 1
        target = available if final else available - receptive
        if target <= emitted:
            continue
        start, end = max(0, emitted - receptive), available if final else min(available, target + receptive)
        audio = model.synthesize(frames[:, :, start:end])
        pieces.append(audio[(emitted - start) * spf : (target - start) * spf])
        emitted = target
    return torch.cat(pieces)


def stream_units(model, units: list[int], chunk: int, lookahead: int | None = None,
                 first: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Our stream fed `first` units (default `chunk`), then `chunk` at a time: joined audio and the
    samples out after each push."""
    from omni_serve.model.units import HiFiGANStream

    stream = HiFiGANStream(model, lookahead)
    ends = list(range(first or chunk, len(units), chunk)) + [len(units)]
    pieces = [stream.push(units[start:end], final=end == len(units)) for start, end in zip([0] + ends, ends)]
    return np.concatenate(pieces), [p.size for p in pieces]


def speed(units_count: int, repeats: int) -> dict:
    from omni_serve.engine import GenerationOptions
    from omni_serve.model.vocoder import load_unit_hifigan

    model = load_unit_hifigan(published_vocoder_folder())
    units = torch.randint(0, 1000, (1, units_count), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        durations = model.durations(units)
        frames = model.frames(units, durations)
    audio_s = frames.shape[2] * model.samples_per_frame / model.config.sampling_rate
    unit_list = units[0].tolist()
    frame_ends_by_chunk = {}
    for chunk in CHUNKS:  # frames known after each push (durations lag 2 units; close enough for cost)
        ends = np.cumsum(durations[0].tolist())
        frame_ends_by_chunk[chunk] = [int(ends[min(i + chunk, units_count) - 1]) for i in range(0, units_count, chunk)]
    defaults = GenerationOptions()
    first, later = defaults.first_chunk_units, defaults.chunk_units
    cases = {"whole utterance": lambda: model(units),
             f"stream {first} units, then {later} (engine default)": lambda: stream_units(model, unit_list, later,
                                                                                        first=first)}
    for chunk in CHUNKS:
        cases[f"stream {chunk} units (ours)"] = lambda chunk=chunk: stream_units(model, unit_list, chunk)
        cases[f"stream {chunk} units (window recompute, before)"] = (
            lambda chunk=chunk: window_stream(model, frames, frame_ends_by_chunk[chunk]))
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved, so load changes hit every case alike
            for name, fn in cases.items():
                times[name] += timed(fn, 1, warmup=0)
    rows = {name: {"rtf": median(ts) / audio_s, "rtf_min": min(ts) / audio_s, "rtf_max": max(ts) / audio_s,
                   "seconds": median(ts)} for name, ts in times.items()}
    return {"units": units_count, "frames": int(frames.shape[2]), "audio_s": audio_s, "repeats": repeats, "cases": rows}


def exactness() -> dict:
    from omni_serve.model.vocoder import load_unit_hifigan

    model = load_unit_hifigan(FIXTURE_VOCODER)
    units = json.loads((FIXTURES / "expected.json").read_text())["vocoder"]["units_60"]
    whole = np.load(FIXTURES / "vocoder-outputs" / "units60_dur.npy")
    ours_whole = model(torch.tensor([units])).numpy()
    spf, rate = model.samples_per_frame, model.config.sampling_rate
    rows = [{"method": "ours: whole utterance", "samples": ours_whole.size, "max_abs_diff": _diff(ours_whole, whole)}]
    for chunk in CHUNKS:
        independent = np.concatenate([model(torch.tensor([units[i : i + chunk]])).numpy()
                                      for i in range(0, len(units), chunk)])
        rows.append({"method": f"reference: independent chunks of {chunk}", "samples": independent.size,
                     "max_abs_diff": _diff(independent, whole)})
    for chunk in (1, *CHUNKS):
        joined, _ = stream_units(model, units, chunk)
        rows.append({"method": f"ours: stream, chunks of {chunk}", "samples": joined.size,
                     "max_abs_diff": _diff(joined, whole)})
    lookahead = []
    for frames_ahead in LOOKAHEADS:  # units one at a time: the lag is what is held back after each push
        joined, _ = stream_units(model, units, 1, frames_ahead)
        stream = _held_back(model, units, frames_ahead)
        lookahead.append({"lookahead_frames": "exact" if frames_ahead is None else frames_ahead,
                          "max_abs_diff": _diff(joined, whole), "mean_held_back_frames": stream,
                          "held_back_ms": 1000 * stream * spf / rate})
    return {"units": len(units), "whole_samples": whole.size, "rows": rows, "lookahead": lookahead,
            "receptive_field_frames": model.receptive_field_frames()}


def _held_back(model, units: list[int], lookahead: int | None) -> float:
    """Mean frames synthesised later than their units were final (units pushed one by one)."""
    from omni_serve.model.units import HiFiGANStream

    stream, held = HiFiGANStream(model, lookahead), []
    for index, unit in enumerate(units[:-1]):
        stream.push([unit], final=False)
        if len(stream.frame_units) > model.receptive_field_frames() * 2:
            held.append(len(stream.frame_units) - stream.emitted / model.samples_per_frame)
    return float(np.mean(held))


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.size, b.size)
    return float(np.abs(a[:n] - b[:n]).max())


def main() -> None:
    args = parse_args("vocoder real-time factor and streaming exactness")
    repeats = args.repeats or (2 if args.quick else 7)
    result = {"bench": "vocoder_rtf", "note": machine_note(), "goal_rtf": GOAL_RTF,
              "speed": speed(60 if args.quick else 250, repeats), "exactness": exactness()}
    cases = result["speed"]["cases"]
    result["goal_met"] = {name: case["rtf"] <= GOAL_RTF for name, case in cases.items() if "before" not in name}
    if args.json:
        emit_json(result)
        return
    sp = result["speed"]
    print(f"Vocoder real-time factor, published shape (512 ch, 128-dim units), {sp['units']} units = "
          f"{sp['frames']} frames = {sp['audio_s']:.2f} s of audio. {machine_note()}")
    print_table(f"RTF (vocoder s / audio s), median of {sp['repeats']} interleaved runs; goal <= {GOAL_RTF}",
                ["case", "RTF", "min..max", "goal met"],
                [[name, c["rtf"], f"{c['rtf_min']:.3f}..{c['rtf_max']:.3f}",
                  "-" if "before" in name else c["rtf"] <= GOAL_RTF] for name, c in cases.items()])
    ex = result["exactness"]
    print_table(f"Exactness vs fairseq whole-utterance audio (fixture vocoder, {ex['units']} units, "
                f"{ex['whole_samples']} samples)", ["method", "samples", "max abs diff"],
                [[r["method"], r["samples"], f"{r['max_abs_diff']:.2e}"] for r in ex["rows"]])
    print_table(f"lookahead_frames: error vs latency (units pushed one by one; receptive field "
                f"{ex['receptive_field_frames']} frames, 20 ms each)",
                ["lookahead", "max abs diff", "held back (frames)", "held back (ms audio)"],
                [[r["lookahead_frames"], f"{r['max_abs_diff']:.2e}", r["mean_held_back_frames"], r["held_back_ms"]]
                 for r in ex["lookahead"]])


if __name__ == "__main__":
    main()
