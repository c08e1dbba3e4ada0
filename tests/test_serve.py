"""`diffmas serve` on a tiny random model: a real uvicorn server on loopback, started and stopped
by each test, talked to over HTTP."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from diffmas.backends.hf import HFBackend
from diffmas.serve import Engine, RequestSettings, ServeConfig, create_app

from conftest import make_backbone

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Count to four.", "Which is larger, 7 or 9?"]


class GatedEngine(Engine):
    """An engine whose batches wait for `gate`: the tests decide when the worker is busy."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.batch_sizes: list[int] = []

    def run(self, jobs):
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        self.batch_sizes.append(len(jobs))
        return super().run(jobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(**overrides):
    """A server on the tiny tied model; yields (base url, engine)."""
    defaults = RequestSettings(method="latent_mas", latent_steps=2, max_tokens=12)
    config = ServeConfig(**{"defaults": defaults, "max_wait_ms": 5.0, "max_prompt_tokens": 64, **overrides})
    engine = GatedEngine(make_backbone(tied=True), HFBackend())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, engine), host="127.0.0.1", port=port, log_level="error"))
    engine.server = server
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        engine.gate.set()
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "server did not shut down"


def chat(url: str, question: str, timeout: float = 60, **extra) -> httpx.Response:
    body = {"model": "diffmas", "messages": [{"role": "user", "content": question}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=5).json()


def test_answers_a_chat_completion_with_its_cost():
    with serving() as (url, _):
        response = chat(url, QUESTIONS[0])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        cost = body["diffmas"]
        assert [a["role"] for a in cost["agents"]] == ["planner", "critic", "refiner", "solver"]
        assert [a["latent_steps"] for a in cost["agents"]] == [2, 2, 2, 0]
        assert cost["trace_bytes"] > 0 and cost["trace_len"] > 0
        assert body["usage"]["completion_tokens"] == cost["agents"][-1]["generated_tokens"] >= 1
        # per-request overrides through the extra fields
        single = chat(url, QUESTIONS[0], method="single", max_tokens=3).json()["diffmas"]
        assert single["method"] == "single" and [a["role"] for a in single["agents"]] == ["solver"]
        assert single["agents"][0]["generated_tokens"] <= 3
        assert health(url)["status"] == "ok"
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'diffmas_requests_total{status="200"} 2.0' in metrics
        assert "diffmas_trace_bytes_total" in metrics and "diffmas_queue_length 0.0" in metrics


def stream_events(url: str, question: str, **extra) -> list:
    body = {"messages": [{"role": "user", "content": question}], "stream": True, **extra}
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


def test_streams_the_final_agents_tokens():
    with serving() as (url, _):
        plain = chat(url, QUESTIONS[1]).json()
        events = stream_events(url, QUESTIONS[1])
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert "".join(deltas) == plain["choices"][0]["message"]["content"]
        assert sum(1 for d in deltas if d) >= 2  # token by token, not one final blob
        assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert chunks[-1]["diffmas"]["tokens"] == plain["diffmas"]["tokens"]


def test_concurrent_requests_are_batched_and_equal_unbatched():
    with serving(max_batch_size=4, max_wait_ms=2000.0) as (url, engine):
        alone = [chat(url, q).json() for q in QUESTIONS]  # each waits 2 s for company, then runs alone
        assert all(a["diffmas"]["batch_size"] == 1 for a in alone)
        engine.gate.clear()  # hold the worker so the four arrive together
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(chat, url, q) for q in QUESTIONS]
            wait_for(lambda: health(url)["queue_length"] + health(url)["in_flight"] == 4)
            engine.gate.set()
            together = [f.result().json() for f in futures]
        assert [t["diffmas"]["batch_size"] for t in together] == [4, 4, 4, 4]
        assert engine.batch_sizes[-1] == 4
        for a, t in zip(alone, together):
            assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
            assert t["diffmas"]["tokens"] == a["diffmas"]["tokens"]
            assert t["diffmas"]["trace_bytes"] == a["diffmas"]["trace_bytes"]


def test_bad_and_over_long_requests_get_clear_errors():
    with serving(max_tokens_limit=32, max_body_bytes=4096) as (url, _):
        long = chat(url, "word " * 200)
        assert long.status_code == 413 and "at most 64" in long.json()["error"]["message"]
        many = chat(url, QUESTIONS[0], max_tokens=1000)
        assert many.status_code == 413 and "max_tokens=1000" in many.json()["error"]["message"]
        huge = chat(url, "x" * 5000)
        assert huge.status_code == 413 and "limit is 4096" in huge.json()["error"]["message"]
        broken = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=10)
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        unknown = chat(url, QUESTIONS[0], method="latent_maz")
        assert unknown.status_code == 400 and "latent_mas" in unknown.json()["error"]["message"]
        no_user = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
        assert no_user.status_code == 400 and "one user message" in no_user.json()["error"]["message"]
        typed = chat(url, QUESTIONS[0], latent_steps=-1)
        assert typed.status_code == 400 and "latent_steps" in typed.json()["error"]["message"]
        assert chat(url, QUESTIONS[0]).status_code == 200  # still serving


def test_full_queue_is_429_with_retry_after():
    with serving(max_batch_size=1, max_queue=1) as (url, engine):
        engine.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat, url, QUESTIONS[0])
            wait_for(lambda: health(url)["in_flight"] == 1)
            queued = pool.submit(chat, url, QUESTIONS[1])
            wait_for(lambda: health(url)["queue_length"] == 1)
            rejected = chat(url, QUESTIONS[2])
            assert rejected.status_code == 429
            assert int(rejected.headers["Retry-After"]) >= 1
            assert "queue is full" in rejected.json()["error"]["message"]
            engine.gate.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'diffmas_requests_total{status="429"} 1.0' in metrics


def test_a_client_that_disconnects_frees_its_slot():
    with serving(max_batch_size=1, max_queue=1) as (url, engine):
        engine.gate.clear()
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(chat, url, QUESTIONS[0])
            wait_for(lambda: health(url)["in_flight"] == 1)
            # a queued plain request whose client gives up ...
            with pytest.raises(httpx.ReadTimeout):
                chat(url, QUESTIONS[1], timeout=0.5)
            wait_for(lambda: health(url)["queue_length"] == 0)
            # ... and a queued stream closed after its first chunk
            body = {"messages": [{"role": "user", "content": QUESTIONS[2]}], "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=10) as response:
                assert response.status_code == 200
                lines = response.iter_lines()  # held: a dropped iterator closes the response
                assert next(lines).startswith("data: ")
                assert health(url)["queue_length"] == 1
            wait_for(lambda: health(url)["queue_length"] == 0)
            engine.gate.set()
            assert running.result().status_code == 200
        assert chat(url, QUESTIONS[3]).status_code == 200  # the freed slot serves the next client
        assert engine.batch_sizes == [1, 1]  # the two abandoned requests never ran


def test_a_request_past_its_timeout_gets_504():
    with serving(request_timeout_s=0.5) as (url, engine):
        engine.gate.clear()
        late = chat(url, QUESTIONS[0])
        assert late.status_code == 504 and "0.5 s" in late.json()["error"]["message"]
        engine.gate.set()
        wait_for(lambda: health(url)["in_flight"] == 0)


def test_graceful_shutdown_finishes_in_flight_requests():
    with serving(max_batch_size=1) as (url, engine):
        engine.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(chat, url, QUESTIONS[0])
            wait_for(lambda: health(url)["in_flight"] == 1)
            queued = pool.submit(chat, url, QUESTIONS[1])
            wait_for(lambda: health(url)["queue_length"] == 1)
            engine.server.should_exit = True  # what SIGTERM does
            wait_for(lambda: not _accepts(url))
            engine.gate.set()
            assert running.result().status_code == 200
            assert queued.result().status_code == 200


def _accepts(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import make_model, make_tokenizer

    make_model(tied=False).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(
        [sys.executable, "-m", "diffmas", "serve", "--model", str(tmp_path), "--backend", "vllm"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2 and "--vllm-url" in bad.stderr and "Traceback" not in bad.stderr
    port = free_port()
    command = [sys.executable, "-m", "diffmas", "serve", "--model", str(tmp_path), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--latent-steps", "1", "--max-new-tokens", "4"], env=env, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is None and _accepts(url), timeout=120)
        answer = chat(url, QUESTIONS[0])
        assert answer.status_code == 200 and answer.json()["diffmas"]["agents"][0]["latent_steps"] == 1
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, so the exit status is SIGTERM's
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "stopped cleanly" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
