"""The HTTP service: an OpenAI-compatible chat completions endpoint in front of the batcher.

Endpoints: POST /v1/chat/completions (plain or SSE streaming), GET /v1/models, GET /health,
GET /metrics (Prometheus text). The event loop never runs the model: it validates, enqueues and
awaits; the batcher's one worker thread runs the batches.

Request fields (OpenAI's): `messages` (one user message, the question; an optional system message
is the final agent's answer instruction), `max_tokens` / `max_completion_tokens`, `temperature`,
`top_p`, `seed`, `stream`, `n` (1 only). diffmas's extra fields (the `extra_body` of OpenAI
clients), each overriding the server's flag: `method`, `latent_steps`, `topology`, `agents`,
`reads`, `upstream_max_tokens`. Every answer carries a `diffmas` cost record.

Errors are OpenAI-shaped ({"error": {"message", "type", "code"}}): 400 malformed or invalid,
413 too long, 429 queue full (with Retry-After), 503 shutting down, 504 timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from diffmas.errors import DiffmasError
from diffmas.serve.batcher import BatchCancelled, Batcher, Job, QueueFull, ShuttingDown
from diffmas.serve.config import RequestSettings, ServeConfig
from diffmas.serve.engine import Engine
from diffmas.serve.engine import Request as Row
from diffmas.serve.metrics import Metrics
from diffmas.trace import TraceOverflowError

log = logging.getLogger("diffmas.serve")
KEEPALIVE_S = 0.5  # a waiting stream sends an SSE comment this often, so a gone client is noticed


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI fields diffmas does not use are accepted and ignored
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    # diffmas's own fields
    method: str | None = None
    latent_steps: int | None = Field(default=None, ge=0)
    topology: str | None = None
    agents: int | None = Field(default=None, ge=1)
    reads: str | None = None
    upstream_max_tokens: int | None = Field(default=None, ge=1)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(config: ServeConfig, engine: Engine) -> FastAPI:
    metrics = Metrics()
    state: dict[str, Any] = {"batcher": None, "closing": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = Batcher(
            engine.run, config.max_batch_size, config.max_wait_ms / 1000, config.max_queue, metrics
        )
        try:
            yield
        finally:
            state["closing"] = True
            # in a thread: the running batch may take a while to finish
            await asyncio.to_thread(state["batcher"].close, config.shutdown_grace_s)
            log.warning("diffmas serve: stopped cleanly")

    app = FastAPI(title="diffmas", lifespan=lifespan)
    app.state.metrics, app.state.engine, app.state.config = metrics, engine, config
    app.state.serve_state = state

    @app.get("/health")
    async def health():
        batcher: Batcher = state["batcher"]
        body = {
            "status": "shutting_down" if state["closing"] else "ok",
            "model": config.served_name,
            "method": config.defaults.method,
            "backend": engine.backend.name,
            "queue_length": batcher.queue_length,
            "in_flight": batcher.in_flight,
        }
        return JSONResponse(body, status_code=503 if state["closing"] else 200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.served_name, "object": "model", "owned_by": "diffmas"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        arrived = time.monotonic()
        try:
            settings, row = await _parse(request, config, engine)
            job = _enqueue(state, settings, row)
        except HTTPError as exc:
            return _count(metrics, arrived, error_response(exc.status, exc.message, exc.kind, exc.headers))
        if row.stream:
            return StreamingResponse(
                _stream(state, config, metrics, engine, job, settings, arrived),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        response = await _answer(request, state, config, engine, job, settings)
        if response.status_code == 200:
            metrics.observe_result(job.future.result())
        return _count(metrics, arrived, response)

    return app


# ----------------------------------------------------------------------------- parsing


async def _parse(request: Request, config: ServeConfig, engine: Engine) -> tuple[RequestSettings, Row]:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
        raise HTTPError(413, f"request body is {declared} bytes; the limit is {config.max_body_bytes}")
    body = await request.body()
    if len(body) > config.max_body_bytes:
        raise HTTPError(413, f"request body is {len(body)} bytes; the limit is {config.max_body_bytes}")
    try:
        chat = ChatRequest.model_validate(json.loads(body))
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"request body is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise HTTPError(400, f"{where}: {first['msg']}") from None
    question, format = _question(chat.messages)
    max_tokens = chat.max_completion_tokens or chat.max_tokens
    if max_tokens is not None and max_tokens > config.max_tokens_limit:
        raise HTTPError(413, f"max_tokens={max_tokens} is above this server's limit of {config.max_tokens_limit}")
    n_tokens = engine.count_tokens(question)
    if n_tokens > config.max_prompt_tokens:
        raise HTTPError(413, f"the question is {n_tokens} tokens; this server takes at most {config.max_prompt_tokens}")
    if engine.fixed_topology is not None and (chat.topology or chat.agents):
        raise HTTPError(400, "this server's roles are fixed (by its roles file or adapter): drop topology/agents")
    try:
        settings = config.defaults.with_overrides(
            method=chat.method,
            latent_steps=chat.latent_steps,
            topology=chat.topology,
            agents=chat.agents,
            reads=chat.reads,
            max_tokens=max_tokens,
            upstream_max_tokens=chat.upstream_max_tokens,
            temperature=chat.temperature,
            top_p=chat.top_p,
            format=format,
        )
        engine.method(settings)  # unknown names, unsupported combinations: one clear line now
    except DiffmasError as exc:
        raise HTTPError(400, str(exc)) from None
    seed = chat.seed if chat.seed is not None else 0
    return settings, Row(question=question, seed=seed, stream=chat.stream)


def _question(messages: list[Message]) -> tuple[str, str]:
    """(question, format): the one user message, and the system message as the answer instruction."""
    users = [m for m in messages if m.role == "user"]
    if len(users) != 1 or any(m.role == "assistant" for m in messages):
        raise HTTPError(
            400,
            f"send exactly one user message (the question); got {len(users)} and multi-turn chats are not supported",
        )
    if not users[0].content.strip():
        raise HTTPError(400, "the user message is empty; it is the question to answer")
    system = "\n".join(m.content for m in messages if m.role in ("system", "developer"))
    return users[0].content, system


def _enqueue(state: dict, settings: RequestSettings, row: Row) -> Job:
    batcher: Batcher = state["batcher"]
    loop = asyncio.get_running_loop()
    job = Job(key=settings, payload=row, loop=loop, future=loop.create_future())
    if row.stream:
        job.tokens = asyncio.Queue()
    try:
        batcher.submit(job)
    except QueueFull:
        wait = batcher.retry_after_s()
        raise HTTPError(
            429,
            f"the queue is full ({batcher.max_queue} requests waiting); retry in about {wait} s",
            "rate_limit_error",
            {"Retry-After": str(wait)},
        ) from None
    except ShuttingDown:
        raise HTTPError(503, "the server is shutting down", "server_error") from None
    return job


# ----------------------------------------------------------------------------- answering


def _failure(exc: BaseException, timeout_s: float) -> tuple[int, str, str]:
    """(status, message, type) for what a job failed with."""
    if isinstance(exc, asyncio.TimeoutError):
        return 504, f"the request was not answered within {timeout_s:g} s", "timeout_error"
    if isinstance(exc, ShuttingDown):
        return 503, "the server shut down before answering this request", "server_error"
    if isinstance(exc, TraceOverflowError):
        return 413, str(exc), "invalid_request_error"
    if isinstance(exc, DiffmasError):
        return 400, str(exc), "invalid_request_error"
    if isinstance(exc, BatchCancelled):
        return 499, "the request was cancelled", "cancelled"
    return 500, f"internal error: {type(exc).__name__}: {exc}", "server_error"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is read already: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _answer(request, state, config: ServeConfig, engine: Engine, job: Job, settings) -> Response:
    batcher: Batcher = state["batcher"]
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {job.future, gone}, timeout=config.request_timeout_s, return_when="FIRST_COMPLETED"
        )
    finally:
        gone.cancel()
    if job.future not in done:
        batcher.cancel(job)
        if gone in done:
            return Response(status_code=499)  # nobody reads it; counted as cancelled
        status, message, kind = _failure(asyncio.TimeoutError(), config.request_timeout_s)
        return error_response(status, message, kind)
    if job.future.exception() is not None:
        status, message, kind = _failure(job.future.exception(), config.request_timeout_s)
        return error_response(status, message, kind)
    result = job.future.result()
    return JSONResponse(_completion(config, engine, job, settings, result))


def _finish_reason(result) -> str:
    return "length" if result.truncated else "stop"


def _cost(job: Job, settings: RequestSettings, result, engine: Engine) -> dict:
    """The cost record of one answer: tokens per agent, trace bytes, time."""
    return {
        "method": result.method,
        "backend": engine.backend.name,
        "settings": settings.to_dict(),
        "agents": [
            {
                "role": a.role,
                "prompt_tokens": a.n_prompt_tokens,
                "latent_steps": a.n_latent_steps,
                "generated_tokens": a.n_generated_tokens,
                "wall_s": a.wall_s,
            }
            for a in result.agents
        ],
        "tokens": result.n_tokens,
        "trace_len": result.trace_len,
        "trace_bytes": result.trace_bytes,
        "batch_size": result.batch_size,
        "batch_wall_s": result.wall_s,
        "queue_s": (job.started or job.arrived) - job.arrived,
        "latency_s": time.monotonic() - job.arrived,
        "peak_memory_bytes": result.peak_memory_bytes,
    }


def _usage(result) -> dict:
    final = result.agents[-1]
    prompt = final.n_prompt_tokens
    completion = final.n_generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion(config: ServeConfig, engine: Engine, job: Job, settings, result) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": config.served_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": _finish_reason(result),
            }
        ],
        "usage": _usage(result),
        "diffmas": _cost(job, settings, result, engine),
    }


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(state, config: ServeConfig, metrics: Metrics, engine: Engine, job: Job, settings, arrived: float):
    """SSE chunks: the role, the final agent's text as it decodes, the finish reason with usage and
    cost, then [DONE]. A client that leaves makes the next send fail: the job is cancelled."""
    batcher: Batcher = state["batcher"]
    chunk_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": config.served_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return _sse(body)

    status, getter = 200, None
    try:
        yield chunk({"role": "assistant", "content": ""})
        deadline = arrived + config.request_timeout_s
        while not (job.future.done() and job.tokens.empty()):
            if time.monotonic() > deadline:
                raise asyncio.TimeoutError()
            getter = getter or asyncio.ensure_future(job.tokens.get())
            done, _ = await asyncio.wait({getter, job.future}, timeout=KEEPALIVE_S, return_when="FIRST_COMPLETED")
            if getter in done:
                yield chunk({"content": getter.result()})
                getter = None
            elif not done:
                yield b": keepalive\n\n"  # a gone client makes this send fail
        if job.future.exception() is not None:
            raise job.future.exception()
        result = job.future.result()
        metrics.observe_result(result)
        yield chunk({}, _finish_reason(result), usage=_usage(result), diffmas=_cost(job, settings, result, engine))
        yield _sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        raise
    except Exception as exc:  # the stream has begun: the error travels as an SSE event
        status, message, kind = _failure(exc, config.request_timeout_s)
        yield _sse({"error": {"message": message, "type": kind, "code": status}})
    finally:
        if getter is not None:
            getter.cancel()
        batcher.cancel(job)
        metrics.requests.labels(status=str(status)).inc()
        metrics.latency.observe(time.monotonic() - arrived)


def _count(metrics: Metrics, arrived: float, response: Response) -> Response:
    metrics.requests.labels(status=str(response.status_code)).inc()
    metrics.latency.observe(time.monotonic() - arrived)
    return response
