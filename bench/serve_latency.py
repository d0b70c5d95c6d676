"""What the HTTP serving stack costs: time to first audio through controller + worker vs in-process, and
the request bytes per second of speech in our compact form vs the reference's JSON floats.

- TTFA: from having the 16 kHz samples to the first audio chunk. In-process: `Engine.generate` in this
  process. HTTP: `ServeClient.stream` (controller lookup, request encoding, POST to the worker, the worker's
  decoding and checks, the engine, NDJSON back) against a controller + one CPU worker started here, with
  the same thread count. Runs alternate between the two paths; the added time is the median of the
  paired differences (goal: at most 30 ms). The worker's own first-audio time is shown too, so the
  transport's share can be read off.
- Bytes: the request body per second of audio as each client sends it: the reference web client's JSON
  (its prompt and the samples as JSON floats), ours with PCM16 in base64, and ours with the wav file
  as it is; plus the worker's time to parse and decode each (goal for PCM16: at most 1/4 of JSON floats).
The model is the test fixture (tiny random weights): the model's own time is small, so the stack's share shows.

    python bench/serve_latency.py [--quick] [--json] [--repeats N]
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

from _common import (
    FIXTURE_MODEL, FIXTURE_VOCODER, QUESTIONS, THREADS, emit_json, machine_note, median, parse_args, print_table,
    spread,
)

from omni_serve.engine import AudioChunk, Engine, GenerationOptions, SpeechRequest, load_audio
from omni_serve.serve.client import ServeClient, request_from_file, request_from_samples
from omni_serve.serve.launcher import die_with_parent_hook, free_port
from omni_serve.serve.protocol import AudioEvent, FinalEvent, GenerateRequest
from omni_serve.serve.server import wait_until_ready

GOAL_ADDED_S = 0.030
GOAL_BYTES_RATIO = 0.25
MAX_NEW_TOKENS = 24  # first audio comes after 10 units; the rest of the answer is not timed
REFERENCE_STOP = "<|eot_id|>"


def start_stack() -> tuple[list[subprocess.Popen], str]:
    """A controller and one CPU worker on free loopback ports; (processes, controller URL)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    env.pop("OMNI_SERVE_TOKEN", None)
    hook = die_with_parent_hook()
    controller_port, worker_port = free_port(), free_port()
    controller_url = f"http://127.0.0.1:{controller_port}"
    python = [sys.executable, "-m", "omni_serve"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env, "preexec_fn": hook}
    processes = [subprocess.Popen(python + ["controller", "--port", str(controller_port), "--log-level", "warning"],
                                  **quiet)]
    processes.append(subprocess.Popen(python + [
        "worker", "--model-path", str(FIXTURE_MODEL), "--vocoder", str(FIXTURE_VOCODER), "--device", "cpu",
        "--num-threads", str(THREADS), "--port", str(worker_port), "--controller-url", controller_url,
        "--log-level", "warning"], **quiet))
    wait_until_ready(f"{controller_url}/ready", 180, alive=lambda: all(p.poll() is None for p in processes))
    return processes, controller_url


def in_process_ttfa(engine: Engine, samples) -> float:
    began = time.perf_counter()
    first = None
    for event in engine.generate(SpeechRequest(samples, GenerationOptions(max_new_tokens=MAX_NEW_TOKENS))):
        if first is None and isinstance(event, AudioChunk):
            first = time.perf_counter() - began
    return first


async def http_ttfa(client: ServeClient, samples) -> tuple[float, float]:
    """(client-side TTFA, the worker's own first_audio_s for the same request)."""
    began = time.perf_counter()
    first = worker_first = None
    async for event in client.stream(request_from_samples(samples, max_new_tokens=MAX_NEW_TOKENS)):
        if first is None and isinstance(event, AudioEvent):
            first = time.perf_counter() - began
        elif isinstance(event, FinalEvent):
            worker_first = event.timings["first_audio_s"]
        elif event.type == "error":
            raise RuntimeError(event.message)
    return first, worker_first


async def measure_ttfa(engine: Engine, controller_url: str, clips: list, repeats: int) -> dict:
    local, remote, worker_own, added, transport = [], [], [], [], []
    async with ServeClient(controller_url) as client:
        for samples in clips:  # warm both paths
            in_process_ttfa(engine, samples)
            await http_ttfa(client, samples)
        for _ in range(repeats):
            for samples in clips:
                a = in_process_ttfa(engine, samples)
                b, own = await http_ttfa(client, samples)
                local.append(a)
                remote.append(b)
                worker_own.append(own)
                added.append(b - a)
                transport.append(b - own)
    return {"in_process_s": local, "http_s": remote, "worker_own_s": worker_own, "added_s": added,
            "outside_engine_s": transport}


def body_of(request: GenerateRequest) -> bytes:
    """The body exactly as `ServeClient` sends it."""
    return request.model_dump_json(exclude_none=True).encode()


def measure_bytes(repeats: int) -> list[dict]:
    from omni_serve.serve.settings import WorkerSettings
    from omni_serve.serve.worker import Worker, prepare

    class NamedEngine:  # `prepare` needs only the model name and the limits
        model_name = FIXTURE_MODEL.name

    worker = Worker(WorkerSettings(), NamedEngine())
    prompt = json.loads((FIXTURE_MODEL.parent / "expected.json").read_text())["omni"]["q1"]["prompt"]
    rows = []
    for path in QUESTIONS:
        samples = load_audio(path)
        seconds = samples.size / 16000
        # The reference web client's payload, posted with `requests.post(json=...)` (json.dumps defaults).
        reference = {"model": FIXTURE_MODEL.name, "prompt": prompt, "temperature": 0.0, "top_p": 0.7,
                     "max_new_tokens": 512, "stop": REFERENCE_STOP, "audio": samples.astype("float32").tolist()}
        forms = {
            "reference JSON floats": json.dumps(reference).encode(),
            "compact PCM16 base64": body_of(request_from_samples(samples, max_new_tokens=512)),
            "compact wav file base64": body_of(request_from_file(path, max_new_tokens=512)),
        }
        base = len(forms["reference JSON floats"])
        for name, body in forms.items():
            decode = [0.0] * repeats
            for i in range(repeats):
                began = time.perf_counter()
                prepare(worker, body)
                decode[i] = time.perf_counter() - began
            rows.append({"clip": path.stem, "form": name, "audio_s": seconds, "bytes": len(body),
                         "bytes_per_audio_s": len(body) / seconds, "ratio_to_reference": len(body) / base,
                         "worker_decode_ms": median(decode) * 1000})
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    repeats = args.repeats or (5 if args.quick else 20)
    clips = [load_audio(path) for path in QUESTIONS]
    bytes_rows = measure_bytes(3 if args.quick else 10)
    engine = Engine.from_path(FIXTURE_MODEL, FIXTURE_VOCODER, device="cpu")
    processes, controller_url = start_stack()
    try:
        ttfa = asyncio.run(measure_ttfa(engine, controller_url, clips, repeats))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        engine.close()
    added = median(ttfa["added_s"])
    compact = [row for row in bytes_rows if row["form"] == "compact PCM16 base64"]
    ratio = max(row["ratio_to_reference"] for row in compact)
    figures = {
        "machine": machine_note(),
        "requests": len(ttfa["added_s"]),
        "ttfa_in_process_s": median(ttfa["in_process_s"]), "ttfa_http_s": median(ttfa["http_s"]),
        "ttfa_worker_own_s": median(ttfa["worker_own_s"]), "ttfa_outside_engine_s": median(ttfa["outside_engine_s"]),
        "ttfa_added_s": added,
        "ttfa_added_p90_s": sorted(ttfa["added_s"])[int(0.9 * (len(ttfa["added_s"]) - 1))],
        "ttfa_added_goal_s": GOAL_ADDED_S, "ttfa_goal_met": added <= GOAL_ADDED_S,
        "bytes": bytes_rows, "compact_bytes_ratio": ratio, "bytes_goal_ratio": GOAL_BYTES_RATIO,
        "bytes_goal_met": ratio <= GOAL_BYTES_RATIO,
    }
    if args.json:
        emit_json(figures)
        return
    ms = lambda values: spread([v * 1000 for v in values])
    print(machine_note())
    print_table(f"Time to first audio, fixture model, CPU, {len(ttfa['added_s'])} requests (ms: median (min..max))",
                ["path", "TTFA ms"],
                [["in-process Engine.generate", ms(ttfa["in_process_s"])],
                 ["HTTP: client -> controller -> worker", ms(ttfa["http_s"])],
                 ["  of which the worker's engine (its timings)", ms(ttfa["worker_own_s"])],
                 ["  the rest: client, controller, HTTP, decode", ms(ttfa["outside_engine_s"])],
                 ["HTTP added (paired difference)", ms(ttfa["added_s"])]])
    print(f"added: median {added * 1000:.1f} ms, p90 {figures['ttfa_added_p90_s'] * 1000:.1f} ms "
          f"(goal <= {GOAL_ADDED_S * 1000:.0f} ms: {'met' if figures['ttfa_goal_met'] else 'NOT met'})")
    print_table("Request bytes per second of audio",
                ["clip", "form", "bytes", "bytes/audio s", "ratio", "worker parse+decode ms"],
                [[r["clip"], r["form"], r["bytes"], round(r["bytes_per_audio_s"]), round(r["ratio_to_reference"], 3),
                  round(r["worker_decode_ms"], 2)] for r in bytes_rows])
    print(f"compact PCM16 / reference JSON floats: {ratio:.3f} "
          f"(goal <= {GOAL_BYTES_RATIO}: {'met' if figures['bytes_goal_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
