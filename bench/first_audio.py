"""Time to first audio in-process, and where it goes.

One request at a time through the Engine. From the request's own Timings and a timer around each
vocoder push:

  first audio = encoder + prefill (first token) + the tokens until the first chunk's units are
                there + the vocoder pushes until samples come out (+ small bookkeeping)

Sweeps `first_chunk_units` (units waiting before the first vocoder push; 5/10/20) and the vocoder's
`lookahead_frames` (exact, or fewer frames held back at the price of inexact joins). Models:
`fixture` (test model and vocoder) and `mid` (random: LLM 1024 x 8 layers, Whisper 384 x 4 layers,
published-shape vocoder 512 channels). EOS is ignored (random weights stop at random).
"""

from __future__ import annotations

from _common import FIXTURE_MODEL, FIXTURE_VOCODER, QUESTIONS, emit_json, machine_note, median, no_eos, parse_args, \
    print_table, random_model_folder

import time

FIRST_CHUNKS = (5, 10, 20)
LOOKAHEADS = (None, 8)


class TimedStream:
    """A vocoder stream that records how long each push took and how many samples it gave."""

    def __init__(self, stream, log: list) -> None:
        self.stream, self.log = stream, log

    def push(self, units, final):
        began = time.perf_counter()
        samples = self.stream.push(units, final)
        self.log.append((time.perf_counter() - began, samples.size))
        return samples


def one_request(engine, audio, first_chunk_units: int, max_new_tokens: int) -> dict:
    from omni_serve.engine import AudioChunk, ErrorEvent, Finished, GenerationOptions, SpeechRequest

    pushes: list[tuple[float, int]] = []
    make_stream = engine.model.vocoder.stream
    engine.model.vocoder.stream = lambda: TimedStream(make_stream(), pushes)
    try:
        options = GenerationOptions(max_new_tokens=max_new_tokens, first_chunk_units=first_chunk_units)
        first_chunk = None
        for event in engine.generate(SpeechRequest(audio, options)):
            if isinstance(event, AudioChunk) and first_chunk is None:
                first_chunk = event.samples.size / event.sample_rate
            if isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)
            if isinstance(event, Finished):
                final = event
    finally:
        engine.model.vocoder.stream = make_stream
    t = final.timings
    until_audio = []
    for seconds, samples in pushes:
        until_audio.append(seconds)
        if samples:
            break
    vocoder_s = sum(until_audio)
    first_token_s = t.first_token_s
    return {"first_audio_s": t.first_audio_s, "encode_s": t.encode_s, "prefill_s": t.prefill_s, "first_token_s": first_token_s,
            "tokens_until_chunk_s": t.first_audio_s - first_token_s - vocoder_s, "first_vocoder_s": vocoder_s,
            "vocoder_pushes": len(until_audio), "first_chunk_audio_ms": 1e3 * (first_chunk or 0.0)}


def measure(name: str, repeats: int, max_new_tokens: int, device: str, dtype: str) -> dict:
    from omni_serve.engine import Engine, load_audio

    folder = FIXTURE_MODEL if name == "fixture" else random_model_folder(name)
    vocoder = FIXTURE_VOCODER if name == "fixture" else None
    engine = Engine.from_path(folder, vocoder=vocoder, device=device, dtype=dtype)
    no_eos(engine)
    audio = load_audio(QUESTIONS[0])
    cases = [(chunk, None) for chunk in FIRST_CHUNKS] + [(10, ahead) for ahead in LOOKAHEADS if ahead is not None]
    try:
        if engine.model.device.type == "cuda":  # a GPU pays seconds for each new shape's first use: every case once
            for chunk, ahead in cases:
                engine.model.vocoder.lookahead_frames = ahead
                one_request(engine, audio, chunk, max_new_tokens)
        else:
            one_request(engine, audio, 10, 4)  # warm-up
        runs: dict[tuple, list[dict]] = {case: [] for case in cases}
        for _ in range(repeats):  # interleaved
            for chunk, ahead in cases:
                engine.model.vocoder.lookahead_frames = ahead
                runs[(chunk, ahead)].append(one_request(engine, audio, chunk, max_new_tokens))
        engine.model.vocoder.lookahead_frames = None
    finally:
        engine.close()
    rows = []
    for (chunk, ahead), results in runs.items():
        row = {key: median([r[key] for r in results]) for key in results[0]}
        row.update(first_chunk_units=chunk, lookahead_frames="exact" if ahead is None else ahead,
                   first_audio_all=[r["first_audio_s"] for r in results])
        rows.append(row)
    return {"model": name, "placement": engine.placement, "repeats": repeats, "rows": rows}


def main() -> None:
    args = parse_args("time to first audio and its breakdown", devices=True)
    repeats = args.repeats or (1 if args.quick else 5)
    results = [measure(name, repeats, 24, args.device, args.dtype) for name in ("fixture", "mid")]
    if args.json:
        emit_json({"bench": "first_audio", "note": machine_note(), "results": results})
        return
    print(f"Time to first audio, in-process, one request at a time (ms, medians). {machine_note()}")
    for res in results:
        print_table(f"{res['model']} ({res['placement']}): median of {res['repeats']}",
                    ["first chunk units", "lookahead", "first audio", "encoder", "prefill", "-> first token",
                     "tokens to chunk", "vocoder", "pushes", "first chunk audio"],
                    [[r["first_chunk_units"], r["lookahead_frames"], 1e3 * r["first_audio_s"], 1e3 * r["encode_s"],
                      1e3 * r["prefill_s"], 1e3 * r["first_token_s"], 1e3 * r["tokens_until_chunk_s"],
                      1e3 * r["first_vocoder_s"], r["vocoder_pushes"], r["first_chunk_audio_ms"]] for r in res["rows"]])
    print("\nfirst token = encoder + prefill + choosing it; tokens to chunk = decode until the push that gave audio;"
          " vocoder = pushes until samples came out; first chunk audio = length of the first AudioChunk.")


if __name__ == "__main__":
    main()
