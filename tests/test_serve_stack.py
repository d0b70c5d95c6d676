"""A controller and two CPU workers as real processes (token set): answers through the HTTP stack equal
in-process inference, the reference's request and stream shapes, errors before streaming, dispatch to
the least-loaded worker, a departing client freeing its slot, 50 concurrent clients; then faults: the
controller restarted, a worker killed in the middle of an answer.

The processes are started once for the whole file (loading models is what takes time here). The fault
tests come last, in this order, because the last one leaves a worker dead. A worker that dies without
anyone reporting it is forgotten at the heartbeat expiry: see test_serve_controller.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from itertools import pairwise

import httpx
import numpy as np
import pytest
from conftest import FIXTURES
from serve_helpers import MODEL_NAME, Q1_WAV, Q2_WAV, Stack, controller_process, wait_for, worker_status

from omni_serve.engine import load_audio
from omni_serve.serve.client import ServeClient, collect, request_from_file, request_from_samples
from omni_serve.serve.protocol import REFERENCE_DELIMITER, ErrorEvent, FinalEvent, TextEvent, UnitsEvent

TOKEN = "stack-test-token"
INTERVAL_S = 1.0  # worker heartbeat
EXPIRY_S = 5.0
FAILURE_NOTICE_S = 5.0  # a client hears of a dead worker within this
LOAD_CLIENTS = 50
# A request that runs for tens of seconds: greedy decoding stops after 249 tokens, this sample after ~1500.
LONG = {"max_new_tokens": 1500, "temperature": 1.0, "seed": 0, "first_chunk_units": 1, "chunk_units": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("stack")
    stack = Stack.start(log_dir, n_workers=2, token=TOKEN, interval_s=INTERVAL_S, expiry_s=EXPIRY_S)
    stack.log_dir = log_dir
    try:
        yield stack
    finally:
        stack.stop()


def run(coroutine, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coroutine, timeout_s))


async def answer(stack, request):
    async with ServeClient(stack.controller.url, TOKEN) as client:
        return await collect(client.stream(request))


@pytest.mark.parametrize("question", ["q1", "q2"])
def test_stream_through_the_controller_equals_in_process_inference(stack, expected, question):
    wav = FIXTURES / "inputs" / f"{question}.wav"
    record = expected["omni"][question]
    compact = request_from_samples(load_audio(wav), max_new_tokens=24)  # PCM16 of the 16 kHz samples
    encoded = request_from_file(wav, max_new_tokens=24)  # the wav file as it is
    for request in (compact, encoded):
        final, audio = run(answer(stack, request))
        assert isinstance(final, FinalEvent), final
        assert final.token_ids == record["generated_ids"]
        assert final.units == record["units"]
        assert final.worker in [worker.url for worker in stack.workers]
    # The streamed audio is the whole-utterance vocoding, to PCM16 precision.
    whole = np.load(FIXTURES / "vocoder-outputs" / f"{question}_all_units_dur.npy")
    np.testing.assert_allclose(audio, whole, atol=2e-4, rtol=0)


def test_stream_events_arrive_in_order(stack):
    async def events():
        async with ServeClient(stack.controller.url, TOKEN) as client:
            return [event async for event in client.stream(request_from_file(Q2_WAV, max_new_tokens=24))]

    stream = run(events())
    final = stream[-1]
    assert isinstance(final, FinalEvent) and final.timings["first_audio_s"] > 0
    assert "".join(e.text for e in stream if isinstance(e, TextEvent)) == final.text
    assert [u for e in stream if isinstance(e, UnitsEvent) for u in e.units] == final.units
    assert [e.type for e in stream].index("audio") < len(stream) - 1  # audio streams before the end


def test_reference_client_request_and_stream_shape(stack, expected):
    """What the reference's web client sends and reads, unchanged (NUL-delimited, whole text so far)."""
    record = expected["omni"]["q2"]
    address = httpx.post(f"{stack.controller.url}/get_worker_address", json={"model": MODEL_NAME}).json()["address"]
    samples = load_audio(Q2_WAV)
    payload = {"model": MODEL_NAME, "prompt": record["prompt"], "temperature": 0.0, "top_p": 0.7,
               "max_new_tokens": 24, "stop": "<|eot_id|>", "audio": samples.tolist()}
    response = httpx.post(f"{address}/worker_generate_stream", json=payload, headers=stack.headers(), timeout=60)
    assert response.status_code == 200
    chunks = [json.loads(part) for part in response.content.split(REFERENCE_DELIMITER) if part]
    assert len(chunks) > 2 and all(chunk["error_code"] == 0 for chunk in chunks)
    assert all(chunk["text"].startswith(record["prompt"]) for chunk in chunks)
    units = [chunk["unit"].split() for chunk in chunks]
    assert all(later[: len(earlier)] == earlier for earlier, later in pairwise(units))  # all units so far
    assert chunks[-1]["unit"] == record["units_str"]
    # Refusals keep a shape the reference's client can read (text + error_code) beside our code/message.
    payload["audio"] = [0.0] * 16000
    refused = httpx.post(f"{address}/worker_generate_stream", json=payload, headers=stack.headers())
    assert refused.status_code == 400
    assert refused.json()["error_code"] != 0 and "silent" in refused.json()["text"]


def post(worker, body, headers=None, **kwargs):
    return httpx.post(f"{worker.url}/worker_generate_stream", headers=headers, timeout=30, **kwargs,
                      **({"json": body} if body is not None else {}))


def test_errors_come_before_the_stream_with_clear_codes(stack):
    worker, auth = stack.workers[0], stack.headers()
    pcm = lambda seconds: base64.b64encode((np.sin(np.arange(int(16000 * seconds)) / 9) * 8000)
                                           .astype("<i2").tobytes()).decode()
    cases = [
        ({"pcm16_b64": pcm(1)}, {}, 401, "unauthorized"),
        ({"pcm16_b64": pcm(1)}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
        ({"audio_b64": base64.b64encode(b"RIFF not audio at all").decode()}, auth, 400, "bad_audio"),
        ({"pcm16_b64": base64.b64encode(bytes(32000)).decode()}, auth, 400, "bad_audio"),  # silence
        ({"pcm16_b64": pcm(11)}, auth, 413, "too_long"),  # the workers here allow 10 s
        ({"pcm16_b64": pcm(1), "model": "another-model"}, auth, 404, "unknown_model"),
        ({"pcm16_b64": pcm(1), "audio_b64": "AAAA"}, auth, 400, "bad_request"),
        ({"pcm16_b64": pcm(1), "temperature": -1}, auth, 400, "bad_request"),
    ]
    for body, headers, status, code in cases:
        response = post(worker, body, headers)
        assert (response.status_code, response.json()["code"]) == (status, code), (body.keys(), response.text)
        assert response.json()["message"]
    refused = post(worker, {"pcm16_b64": pcm(1), "temperature": -1}, auth).json()["message"]
    assert refused.startswith("invalid request: temperature: ")  # the field, as the client wrote it
    too_big = post(worker, None, auth, content=b"x" * (3 * 1024 * 1024))  # the workers here cap bodies at 2 MiB
    assert too_big.status_code == 413 and too_big.json()["code"] == "too_large"
    assert worker_status(worker.url)["queue_length"] == 0  # refusals hold no slot


def test_dispatch_prefers_the_least_loaded_worker(stack):
    busy, idle = stack.workers

    def queues() -> dict[str, int]:
        workers = httpx.get(f"{stack.controller.url}/list_workers").json()["workers"]
        return {entry["name"]: entry["queue_length"] for entry in workers}

    with httpx.Client(timeout=60) as http:
        request = request_from_file(Q1_WAV, **LONG)
        with http.stream("POST", f"{busy.url}/worker_generate_stream", content=request.model_dump_json(),
                         headers={**stack.headers(), "Content-Type": "application/json"}) as response:
            lines = response.iter_lines()  # keep it: a dropped iterator closes the response
            first = next(lines)  # generating now
            assert response.status_code == 200, first
            # Wait for both workers' heartbeats to report their real queues (dispatch counts are provisional).
            wait_for(lambda: queues() == {busy.url: 1, idle.url: 0}, timeout_s=10, what="heartbeats", show=queues)
            chosen = httpx.post(f"{stack.controller.url}/get_worker_address", json={"model": MODEL_NAME}).json()
            assert chosen["address"] == idle.url


def test_a_client_that_disconnects_frees_the_worker_slot(stack):
    worker = stack.workers[1]
    request = request_from_file(Q1_WAV, **LONG)
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{worker.url}/worker_generate_stream", content=request.model_dump_json(),
            headers={**stack.headers(), "Content-Type": "application/json"}) as response:
        lines = response.iter_lines()
        next(lines)
        next(lines)
        assert worker_status(worker.url)["queue_length"] == 1
    # leaving the block closed the connection mid-answer
    wait_for(lambda: worker_status(worker.url)["queue_length"] == 0, timeout_s=5, what="slot released")


def test_fifty_concurrent_clients_complete_or_get_a_clear_503(stack, expected):
    record = expected["omni"]["q1"]
    request = request_from_file(Q1_WAV, max_new_tokens=24)

    async def crowd():
        limits = httpx.Limits(max_connections=LOAD_CLIENTS * 2, max_keepalive_connections=LOAD_CLIENTS)
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits, trust_env=False) as http:
            client = ServeClient(stack.controller.url, TOKEN, http=http)
            return await asyncio.gather(*(collect(client.stream(request)) for _ in range(LOAD_CLIENTS)))

    results = run(crowd(), timeout_s=150)  # none hangs
    finals = [last for last, _ in results if isinstance(last, FinalEvent)]
    busy = [last for last, _ in results if isinstance(last, ErrorEvent)]
    assert len(finals) + len(busy) == LOAD_CLIENTS
    assert finals and all(final.token_ids == record["generated_ids"] for final in finals)
    assert all(error.code == "busy" and error.status == 503 and error.retry_after >= 1 for error in busy), busy[:3]
    for process in (stack.controller, *stack.workers):
        assert httpx.get(f"{process.url}/health").status_code == 200
    for worker in stack.workers:
        wait_for(lambda url=worker.url: worker_status(url)["queue_length"] == 0, timeout_s=10, what="idle after load")
    metrics = "".join(httpx.get(f"{worker.url}/metrics").text for worker in stack.workers)
    accepted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('omni_worker_requests_total{shape="compact"}'))
    assert accepted >= len(finals)
    if busy:
        assert 'omni_worker_errors_total{code="busy"}' in metrics
    assert "omni_worker_first_audio_seconds_count" in metrics


# --- faults (last: the final test leaves a worker dead) ------------------------------------------


def test_workers_return_within_one_heartbeat_interval_after_a_controller_restart(stack):
    port = int(stack.controller.url.rsplit(":", 1)[1])
    stack.controller.kill()
    time.sleep(INTERVAL_S)  # the workers notice: their beats fail
    stack.controller = controller_process(stack.log_dir, port=port, token=TOKEN, expiry_s=EXPIRY_S).start()
    stack.controller.wait("/health")
    took = stack.wait_registered(2, timeout_s=10)
    assert took <= INTERVAL_S, f"workers took {took:.2f} s to come back"
    assert httpx.post(f"{stack.controller.url}/list_models").json()["models"] == [MODEL_NAME]


def test_a_worker_killed_mid_stream(stack, expected):
    """The client hears within 5 s, the controller drops the worker, the next request goes to the live one."""
    by_url = {worker.url: worker for worker in stack.workers}

    async def scenario():
        async with ServeClient(stack.controller.url, TOKEN) as client:
            stream = client.stream(request_from_file(Q1_WAV, **LONG))
            await stream.__anext__()  # the answer has started
            victim = next(url for url in by_url if worker_status(url)["queue_length"] == 1)
            by_url[victim].kill()
            killed_at = time.monotonic()
            rest = [event async for event in stream]
            heard_after = time.monotonic() - killed_at
            workers = (await client.http.get(f"{stack.controller.url}/list_workers")).json()["workers"]
            listed = [entry["name"] for entry in workers]
            final, _ = await collect(client.stream(request_from_file(Q1_WAV, max_new_tokens=24)))
            return victim, rest, heard_after, listed, final

    victim, rest, heard_after, listed, final = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert heard_after < FAILURE_NOTICE_S
    assert not any(isinstance(event, FinalEvent) for event in rest)
    assert isinstance(rest[-1], ErrorEvent) and rest[-1].code == "worker_failed", rest[-1:]
    survivor = next(url for url in by_url if url != victim)
    assert listed == [survivor]  # dropped at once, not after the heartbeat expiry
    assert isinstance(final, FinalEvent) and final.worker == survivor
    assert final.token_ids == expected["omni"]["q1"]["generated_ids"]

