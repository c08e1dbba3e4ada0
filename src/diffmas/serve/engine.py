"""The model side of the server: one backbone, methods built per request settings, and the run of
one batch (with the final agent's tokens streamed to the requests that asked for it)."""

from __future__ import annotations

from dataclasses import dataclass

from diffmas.backends import Backend
from diffmas.generate import DecodeConfig, listening
from diffmas.methods import Method, MethodConfig, RunResult, get_method
from diffmas.roles import Topology, default_topology
from diffmas.serve.batcher import BatchCancelled, Job
from diffmas.serve.config import RequestSettings


@dataclass(frozen=True)
class Request:
    """What one job carries to the worker thread."""

    question: str
    seed: int
    stream: bool


class TextStream:
    """Turns one row's generated ids into text deltas: a delta is sent once it decodes cleanly
    (a multi-byte character split over tokens waits for its last byte)."""

    def __init__(self, tokenizer, job: Job):
        self.tokenizer, self.job = tokenizer, job
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._send(text)

    def finish(self, text: str) -> None:
        """The answer as the method returned it: whatever was not streamed yet goes now."""
        self._send(text)

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.push_text(text[len(self.sent) :])
            self.sent = text


class Engine:
    """Runs batches of requests on one backbone.

    topology: fixed by a roles file or a trained adapter (None: built from each request's settings).
    adapters: role name -> loaded peft adapter name (diffmas).
    """

    def __init__(
        self,
        backbone,
        backend: Backend,
        topology: Topology | None = None,
        adapters: dict[str, str] | None = None,
        chat_kwargs: dict | None = None,
    ):
        self.backbone = backbone
        self.backend = backend
        self.fixed_topology = topology
        self.adapters = adapters
        self.chat_kwargs = dict(chat_kwargs or {})
        self._methods: dict[RequestSettings, Method] = {}

    def method(self, settings: RequestSettings) -> Method:
        """The method a request's settings name, checked against the backend (cached)."""
        key = settings.with_overrides(format="")  # the format is an argument of run_batch, not of the method
        if key not in self._methods:
            method = get_method(key.method, self.backbone, self._topology(key), self._config(key), self.adapters)
            self.backend.check(method)
            self._methods[key] = method
        return self._methods[key]

    def _topology(self, s: RequestSettings) -> Topology:
        # fixed roles: the app refuses requests that ask for another topology
        return self.fixed_topology or default_topology(s.topology, s.agents)  # type: ignore[arg-type]

    def _config(self, s: RequestSettings) -> MethodConfig:
        return MethodConfig(
            latent_steps=s.latent_steps,
            decode=DecodeConfig(max_new_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p),
            upstream_max_new_tokens=s.upstream_max_tokens,
            chat_kwargs=self.chat_kwargs,
            reads=s.reads,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ the worker thread's call
    def run(self, jobs: list[Job]) -> list[RunResult]:
        """One batch: every job has the same settings (the batcher groups them)."""
        settings: RequestSettings = jobs[0].key
        method = self.method(settings)
        requests: list[Request] = [job.payload for job in jobs]
        streams = {b: TextStream(self.backbone.tokenizer, job) for b, job in enumerate(jobs) if requests[b].stream}
        final = method.topology.final.name

        def listener(agent: str, ids: list) -> None:
            if all(job.cancelled for job in jobs):
                raise BatchCancelled()  # every client is gone: stop decoding for nobody
            if agent != final:
                return
            for b, stream in streams.items():
                if ids[b] is not None:
                    stream.add(ids[b])

        with listening(listener):
            results = self.backend.run_batch(
                method, [r.question for r in requests], format=settings.format, seeds=[r.seed for r in requests]
            )
        for b, stream in streams.items():
            stream.finish(results[b].text)
        return results
