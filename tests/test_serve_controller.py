"""The controller as a real process, with workers played by the test: registration, heartbeats, expiry,
dispatch, the token, the worker allow-list, body caps, health/ready/metrics. Plus the pure pieces
(registry, address checks) in-process. No model is loaded here, so this file runs in seconds.
"""

from __future__ import annotations

import random

import httpx
import pytest
from serve_helpers import controller_process, wait_for

from omni_serve.serve.launcher import free_port
from omni_serve.serve.protocol import WorkerStatus
from omni_serve.serve.registry import WorkerRegistry
from omni_serve.serve.security import AddressRefused, check_worker_address
from omni_serve.serve.settings import LOOPBACK_HOSTS

TOKEN = "controller-test-token"
EXPIRY_S = 3.0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    process = controller_process(tmp_path_factory.mktemp("controller"), token=TOKEN, expiry_s=EXPIRY_S).start()
    try:
        process.wait("/health")
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=10, trust_env=False) as client:
        yield client


def fake_worker() -> str:
    """An allowed address where nothing listens: the controller must never need to call it."""
    return f"http://127.0.0.1:{free_port()}"


def register(http, controller, address, model, queue_length=0, headers=AUTH, **extra):
    body = {"worker_name": address, "check_heart_beat": True,
            "worker_status": {"model_names": [model], "speed": 1, "queue_length": queue_length}, **extra}
    return http.post(f"{controller.url}/register_worker", json=body, headers=headers)


def beat(http, controller, address, queue_length=0, headers=AUTH):
    body = {"worker_name": address, "queue_length": queue_length}
    return http.post(f"{controller.url}/receive_heart_beat", json=body, headers=headers)


def models(http, controller) -> list[str]:
    return http.post(f"{controller.url}/list_models").json()["models"]


def address_for(http, controller, model) -> str:
    return http.post(f"{controller.url}/get_worker_address", json={"model": model}).json()["address"]


def test_register_heartbeat_and_expiry(controller, http):
    worker = fake_worker()
    assert register(http, controller, worker, "m-expiry").json() == {"registered": True}
    assert "m-expiry" in models(http, controller)
    assert beat(http, controller, worker, 2).json() == {"exist": True}
    assert address_for(http, controller, "m-expiry") == worker
    assert beat(http, controller, fake_worker()).json() == {"exist": False}  # unknown: must register
    wait_for(lambda: "m-expiry" not in models(http, controller), timeout_s=4 * EXPIRY_S, what="expiry")
    assert address_for(http, controller, "m-expiry") == ""
    assert beat(http, controller, worker).json() == {"exist": False}  # forgotten: it will register again


def test_dispatch_goes_to_the_shortest_queue(controller, http):
    busy, idle = fake_worker(), fake_worker()
    register(http, controller, busy, "m-dispatch", queue_length=3)
    register(http, controller, idle, "m-dispatch", queue_length=0)
    assert address_for(http, controller, "m-dispatch") == idle
    beat(http, controller, busy, 0)
    beat(http, controller, idle, 5)
    assert address_for(http, controller, "m-dispatch") == busy
    # Each address handed out counts as queued until the next beat, so a burst alternates.
    beat(http, controller, busy, 0)
    beat(http, controller, idle, 0)
    handed = [address_for(http, controller, "m-dispatch") for _ in range(6)]
    assert handed.count(busy) == handed.count(idle) == 3
    assert address_for(http, controller, "no-such-model") == ""


def test_conversations_stick_to_their_worker(controller, http):
    first, second = fake_worker(), fake_worker()
    register(http, controller, first, "m-sticky")
    register(http, controller, second, "m-sticky")
    ask = lambda: http.post(f"{controller.url}/get_worker_address",
                            json={"model": "m-sticky", "conversation_id": "c1"}).json()["address"]
    chosen = ask()
    assert all(ask() == chosen for _ in range(5))


def test_the_token_is_required_to_register_and_beat(controller, http):
    worker = fake_worker()
    missing = register(http, controller, worker, "m-token", headers={})
    assert missing.status_code == 401 and missing.json()["code"] == "unauthorized"
    wrong = register(http, controller, worker, "m-token", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert beat(http, controller, worker, headers={}).status_code == 401
    assert "m-token" not in models(http, controller)
    assert register(http, controller, worker, "m-token").status_code == 200


@pytest.mark.parametrize("address", [
    "http://10.1.2.3:8000", "http://example.com:80", "http://127.0.0.1.evil.example:80", "http://169.254.169.254",
    "file:///etc/passwd", "http://user:pw@127.0.0.1:9", "http://127.0.0.1:9/path?x=1", "gopher://127.0.0.1:70",
])
def test_registration_of_a_host_outside_the_allow_list_is_refused(controller, http, address):
    # No worker_status: a controller that accepted the address would have to call it back.
    response = http.post(f"{controller.url}/register_worker", json={"worker_name": address}, headers=AUTH)
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "forbidden"
    assert all(entry["name"] != address for entry in http.get(f"{controller.url}/list_workers").json()["workers"])


def test_an_oversized_body_gets_413(controller, http):
    response = http.post(f"{controller.url}/register_worker", content=b"{" + b" " * 200_000 + b"}",
                         headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"


def test_a_registration_without_status_is_completed_by_asking_the_worker(controller, http):
    register = lambda name: http.post(f"{controller.url}/register_worker", json={"worker_name": name}, headers=AUTH)
    unreachable = register(fake_worker())
    assert unreachable.status_code == 400 and unreachable.json()["code"] == "unreachable"
    # Any allowed server answering /worker_get_status will do: the controller itself answers it.
    assert register(controller.url).json() == {"registered": True}


def test_a_reported_failure_drops_only_a_dead_worker(controller, http):
    dead = fake_worker()
    register(http, controller, dead, "m-report")
    # The controller's own address answers /health: a live "worker" that a client wrongly reports.
    register(http, controller, controller.url, "m-report")
    report = lambda name: http.post(f"{controller.url}/report_worker_failure", json={"worker_name": name}, headers=AUTH)
    assert report(controller.url).json() == {"removed": False}
    assert report(dead).json() == {"removed": True}
    assert address_for(http, controller, "m-report") == controller.url


def test_refresh_drops_workers_that_do_not_answer(controller, http):
    worker = fake_worker()
    register(http, controller, worker, "m-refresh")
    listed = lambda: [entry["name"] for entry in http.get(f"{controller.url}/list_workers").json()["workers"]]
    assert worker in listed()
    http.post(f"{controller.url}/refresh_all_workers").raise_for_status()
    assert worker not in listed()


def test_health_ready_and_metrics(tmp_path):
    process = controller_process(tmp_path, expiry_s=30).start()
    try:
        process.wait("/health")
        with httpx.Client(timeout=10, trust_env=False) as http:
            assert http.get(f"{process.url}/health").json() == {"status": "ok"}
            not_ready = http.get(f"{process.url}/ready")
            assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
            worker = fake_worker()
            register(http, process, worker, "m-metrics", queue_length=2, headers={})
            ready = http.get(f"{process.url}/ready")
            assert ready.status_code == 200 and ready.json()["models"] == ["m-metrics"]
            address_for(http, process, "m-metrics")
            address_for(http, process, "absent")
            status = http.post(f"{process.url}/worker_get_status").json()
            assert status == {"model_names": ["m-metrics"], "speed": 1, "queue_length": 3}
            text = http.get(f"{process.url}/metrics").text
    finally:
        process.stop()
    assert "omni_controller_workers 1.0" in text
    assert f'omni_controller_worker_queue_length{{worker="{worker}"}} 3.0' in text
    assert 'omni_controller_dispatches_total{model="m-metrics",outcome="ok"} 1.0' in text
    assert 'omni_controller_dispatches_total{model="absent",outcome="no_worker"} 1.0' in text
    assert 'omni_controller_registrations_total{outcome="ok"} 1.0' in text


# --- in-process pieces ----------------------------------------------------------------------------


def test_registry_expiry_and_lottery_weights():
    now = [0.0]
    registry = WorkerRegistry(expiry_s=10, clock=lambda: now[0], rng=random.Random(0))
    registry.register("http://a", WorkerStatus(model_names=["m"], speed=1))
    registry.register("http://b", WorkerStatus(model_names=["m"], speed=3))
    picks = [registry.choose("m", "lottery").name for _ in range(4000)]
    assert 0.70 < picks.count("http://b") / len(picks) < 0.80  # weighted by speed: 3/4
    now[0] = 9.0
    assert registry.heartbeat("http://a", 0)
    now[0] = 15.0
    assert [info.name for info in registry.live()] == ["http://a"]  # b's last beat was at 0
    assert not registry.heartbeat("http://b", 0)


def test_worker_address_checks():
    assert check_worker_address("http://127.0.0.1:21002/", LOOPBACK_HOSTS) == "http://127.0.0.1:21002"
    assert check_worker_address("http://LOCALHOST:5", LOOPBACK_HOSTS) == "http://localhost:5"
    assert check_worker_address("http://[::1]:5", LOOPBACK_HOSTS) == "http://[::1]:5"
    assert check_worker_address("http://10.0.0.7:5", ("10.0.0.0/8",)) == "http://10.0.0.7:5"
    assert check_worker_address("https://gpu-1:5", ("gpu-1",)) == "https://gpu-1:5"
    for bad in ("http://10.0.0.7:5", "http://localhost.evil:5", "ftp://127.0.0.1:5", "127.0.0.1:5", "http://:5"):
        with pytest.raises(AddressRefused):
            check_worker_address(bad, LOOPBACK_HOSTS)
