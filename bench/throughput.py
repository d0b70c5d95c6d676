"""Engine throughput with 1, 4 and 8 concurrent streams: aggregate tokens per second.

All streams are submitted at once; the engine prefills each, then decodes them together (one LLM
step and one speech-decoder pass for all rows per token). Random weights stop on EOS at random, so
EOS is ignored and every request generates exactly `max_new_tokens`.

Figures per stream count:
- decode tokens/s: tokens generated after the last prefill / time from the last prefill to the end
  (the batched phase: what batching changes);
- end-to-end tokens/s: all tokens / time from submitting to the last answer (includes the encoder
  and the prefills, which run one request at a time);
- CPU ms/token: process CPU time per token (robust to other jobs on the machine).

Models: `fixture` (the test model: tiny, so per-row Python work dominates), `mid` (random, LLM
hidden 1024 x 8 layers, speech decoder (2,512,8,1408): big enough that batching matters), and the
embedded default with each unit generator, `omni-smol` (its trained CTC decoder) and
`omni-smol-espeak_text` (no speech decoder): the real model a CPU user runs (`--models` picks). The
vocoder is off for the main figures (`--vocode` turns it on: it runs per request on the engine's
vocoder thread, beside the decoding) since its cost is the vocoder bench's subject.
"""

from __future__ import annotations

from _common import FIXTURE_MODEL, FIXTURE_VOCODER, QUESTIONS, emit_json, machine_note, median, no_eos, parse_args, \
    print_table, random_model_folder

import threading
import time

GOAL_SPEEDUP = 4.0
STREAMS = (1, 4, 8)
MODEL_TOKENS = {"fixture": 128, "mid": 64, "omni-smol": 64, "omni-smol-espeak_text": 64}  # tokens per stream


def add_options(parser) -> None:
    parser.add_argument("--vocode", action="store_true",
                        help="also run the vocoder (fixture vocoder for the fixture model)")
    parser.add_argument("--models", default="fixture,mid,omni-smol,omni-smol-espeak_text",
                        help=f"comma-separated, from {', '.join(MODEL_TOKENS)}")


def run_batch(engine, audios, streams: int, max_new_tokens: int, vocode: bool) -> dict:
    from omni_serve.engine import ErrorEvent, Finished, GenerationOptions, SpeechRequest

    finished: list[tuple[float, Finished]] = []
    done = threading.Event()

    def emit(submitted: float):
        def on_event(event) -> None:
            if isinstance(event, ErrorEvent):
                raise RuntimeError(event.message)
            if isinstance(event, Finished):
                finished.append((submitted, event))
                if len(finished) == streams:
                    done.set()
        return on_event

    options = GenerationOptions(max_new_tokens=max_new_tokens, vocode=vocode)
    cpu, began = time.process_time(), time.perf_counter()
    for index in range(streams):
        engine.submit(SpeechRequest(audios[index % len(audios)], options), emit(time.perf_counter()))
    if not done.wait(timeout=1800):
        raise RuntimeError("requests did not finish")
    cpu = time.process_time() - cpu
    ends = [submitted + f.timings.total_s for submitted, f in finished]
    decode_start = max(submitted + f.timings.first_token_s for submitted, f in finished)
    tokens = sum(f.num_tokens for _, f in finished)
    assert all(f.num_tokens == max_new_tokens for _, f in finished), "a request stopped early"
    return {"decode_tps": (tokens - streams) / (max(ends) - decode_start), "e2e_tps": tokens / (max(ends) - began),
            "cpu_ms_per_token": 1e3 * cpu / tokens}


def measure(name: str, max_new_tokens: int, repeats: int, vocode: bool, device: str, dtype: str) -> dict:
    from omni_serve.engine import Engine, load_audio

    vocoder = FIXTURE_VOCODER if name == "fixture" else None
    if name == "fixture":
        folder = FIXTURE_MODEL
    elif name.startswith("omni-smol"):
        from omni_serve.default.build import GENERATORS, build_default, variant_name  # needs the default's extras

        folder = build_default(generator={variant_name(g): g for g in GENERATORS}[name])
    else:
        folder = random_model_folder(name)
    engine = Engine.from_path(folder, vocoder=vocoder, device=device, dtype=dtype, max_batch_size=max(STREAMS))
    no_eos(engine)
    audios = [load_audio(path) for path in QUESTIONS]
    try:
        if engine.model.device.type == "cuda":  # a GPU pays seconds for each new shape's first use: every case once
            for streams in STREAMS:
                run_batch(engine, audios, streams, max_new_tokens, vocode)
        else:
            run_batch(engine, audios, 2, 8, vocode)  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in STREAMS}
        for _ in range(repeats):  # interleaved, so load changes hit every stream count alike
            for streams in STREAMS:
                runs[streams].append(run_batch(engine, audios, streams, max_new_tokens, vocode))
    finally:
        engine.close()
    rows = {}
    for streams, results in runs.items():
        rows[streams] = {key: median([r[key] for r in results]) for key in results[0]}
        rows[streams]["decode_tps_all"] = [r["decode_tps"] for r in results]
    base = rows[1]
    for streams in STREAMS:
        rows[streams]["decode_speedup"] = rows[streams]["decode_tps"] / base["decode_tps"]
        rows[streams]["e2e_speedup"] = rows[streams]["e2e_tps"] / base["e2e_tps"]
    return {"model": name, "placement": engine.placement, "max_new_tokens": max_new_tokens, "vocode": vocode,
            "repeats": repeats, "streams": rows, "goal_met": rows[8]["decode_speedup"] >= GOAL_SPEEDUP}


def main() -> None:
    args = parse_args("engine throughput vs concurrent streams", add_options, devices=True)
    repeats = args.repeats or (1 if args.quick else 3)
    names = args.models.split(",")
    unknown = set(names) - set(MODEL_TOKENS)
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODEL_TOKENS)}")
    results = [measure(name, MODEL_TOKENS[name] // (4 if args.quick else 1), repeats, args.vocode, args.device,
                       args.dtype) for name in names]
    if args.json:
        emit_json({"bench": "throughput", "note": machine_note(), "goal_speedup_at_8": GOAL_SPEEDUP, "results": results})
        return
    print(f"Engine throughput, all streams submitted at once, EOS ignored. {machine_note()}")
    for res in results:
        rows = [[n, r["decode_tps"], f"{r['decode_speedup']:.2f}x", r["e2e_tps"], f"{r['e2e_speedup']:.2f}x",
                 r["cpu_ms_per_token"], " ".join(f"{v:.1f}" for v in r["decode_tps_all"])]
                for n, r in res["streams"].items()]
        vocoder = "on" if res["vocode"] else "off"
        print_table(f"{res['model']} ({res['placement']}): {res['max_new_tokens']} tokens per stream, "
                    f"vocoder {vocoder}, median of {res['repeats']}; goal: decode speedup at 8 >= {GOAL_SPEEDUP}x "
                    f"({'met' if res['goal_met'] else 'MISSED'})",
                    ["streams", "decode tok/s", "speedup", "e2e tok/s", "speedup", "CPU ms/token", "decode tok/s runs"],
                    rows)


if __name__ == "__main__":
    main()
