"""The vLLM backend: the decoding agents run in a vLLM server, the latent agents run here.

Why it is exact. The final agent's KV trace is a pure function of its input embeddings and their
positions: token embeddings for prompt tokens, realigned hidden states for latent steps. Positions
count real entries only, so under a sequential topology with reads=all the final agent's context
equals a causal LM prefill of its row's real trace inputs concatenated in order, then its own
prompt. The upstream agents run here as always (on a trace that records its inputs); the final
agent's context goes to vLLM as `prompt_embeds`. Text agents (text_mas, single) send token ids.

Why a separate process. vLLM's CPU build pins torch and a transformers older than the project's,
so it lives in its own environment (`make vllm`) and is reached over its OpenAI API: start it
with `vllm serve MODEL_DIR --enable-prompt-embeds --dtype float32` (see docs/serving.md).

What it refuses. Hierarchical and chain topologies and reads other than `all` hide columns from a
latent agent: that is an attention mask a plain causal prefill cannot express.

Trained adapters are merged: `export_merged` writes a model directory with the decoding agent's
LoRA merged into the base weights, vLLM serves that directory, and the backend is told which
adapter it holds (`merged_adapter`); the upstream agents still run here under their own adapters.
A decoding agent whose adapter is not the served one is refused.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from diffmas.accounting import PhaseMeter, Stopwatch
from diffmas.channel import text_context, tokenize
from diffmas.errors import DiffmasError
from diffmas.generate import DecodeConfig
from diffmas.methods import AgentRecord, Ask, LatentMAS, Method, RunResult, Single, TextMAS, asks_of
from diffmas.trace import TraceOverflowError


class VLLMBackendError(DiffmasError):
    """The vLLM server cannot run this request, or answered with an error."""


@dataclass
class Completion:
    """One decoded answer from vLLM."""

    token_ids: list[int]  # generated ids, a final EOS included (as the HF loop records them)
    text: str  # decoded here, with the backbone's tokenizer, as the HF loop decodes
    logprobs: list[float]
    truncated: bool  # stopped by max_tokens or the context, not EOS


def embeds_payload(embeds: torch.Tensor) -> str:
    """(T, d) tensor -> what vLLM's `prompt_embeds` field takes: base64 of `torch.save`."""
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu", torch.float32).contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMBackend:
    name = "vllm"

    def __init__(self, url: str, timeout_s: float = 600.0, max_parallel: int = 64, merged_adapter: str | None = None):
        """merged_adapter: the peft adapter name whose weights the vLLM server serves merged
        (see `export_merged`); None: the server serves the plain base model."""
        import httpx

        self.url = url.rstrip("/")
        self.merged_adapter = merged_adapter
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="vllm-request")
        self._model: str | None = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # ------------------------------------------------------------------ what runs here
    def check(self, method: Method) -> None:
        """One clear line for what vLLM cannot express; nothing for what it can."""
        if not isinstance(method, (LatentMAS, TextMAS, Single)):
            raise VLLMBackendError(f"backend 'vllm' runs single, text_mas, latent_mas and diffmas, not {method.name!r}")
        decoding = list(method.topology.roles) if isinstance(method, TextMAS) else [method.topology.final]
        for role in decoding:
            adapter = method.adapters.get(role.name)
            if adapter != self.merged_adapter:
                served = f"adapter {self.merged_adapter!r} merged" if self.merged_adapter else "plain weights"
                raise VLLMBackendError(
                    f"backend 'vllm': agent {role.name!r} decodes under adapter {adapter!r} but the vLLM server serves "
                    f"{served} (serve a directory from export_merged and pass its adapter, or use --backend hf)"
                )
        if isinstance(method, LatentMAS):
            if method.topology.kind != "sequential":
                raise VLLMBackendError(
                    "backend 'vllm' runs latent methods on the sequential topology only, "
                    f"got {method.topology.kind!r}: its hidden segments need an attention mask vLLM "
                    "cannot express (use --backend hf)"
                )
            if getattr(method.config, "trace_budget", None) is not None:
                raise VLLMBackendError(
                    "backend 'vllm' cannot run a trace budget: evicted, pooled or quantised entries are no "
                    "longer a prefill of their input embeddings (use --backend hf)"
                )
            if method.config.reads != "all":
                raise VLLMBackendError(
                    f"backend 'vllm' runs latent methods with reads=all only, got reads={method.config.reads!r}: "
                    "hiding trace columns needs an attention mask vLLM cannot express (use --backend hf)"
                )

    # ------------------------------------------------------------------ one call per batch
    def run_batch(
        self,
        method: Method,
        questions: Sequence[str],
        format: str = "",
        seeds: Sequence[int] | None = None,
        privates: Sequence[Mapping[str, str]] | None = None,
    ) -> list[RunResult]:
        self.check(method)
        if not questions:
            return []
        seeds = list(seeds) if seeds is not None else [method.config.decode.seed] * len(questions)
        asks = asks_of(questions, privates)
        cost = PhaseMeter(method.backbone.device)
        with torch.no_grad(), cost.measure():
            if isinstance(method, LatentMAS):
                agents, out, lengths = self._latent(method, asks, format, seeds)
            else:
                agents, out, lengths = self._text(method, asks, format, seeds)
        per_entry = method.backbone.kv_bytes_per_entry
        return [
            RunResult(
                method=method.name,
                text=out[b].text,
                agents=[rows[b] for rows in agents],
                trace_len=lengths[b],
                trace_bytes=lengths[b] * per_entry,
                wall_s=cost.wall_s,
                peak_memory_bytes=cost.peak_bytes,
                batch_size=len(asks),
                truncated=out[b].truncated,
                token_logprobs=out[b].logprobs,
            )
            for b in range(len(asks))
        ]

    def _latent(self, method: LatentMAS, asks: list[Ask], format: str, seeds: list[int]):
        """Upstream here (recording the trace's inputs), the final agent in vLLM from embeddings."""
        bb = method.backbone
        method.record_inputs = True
        try:
            up = method.build_upstream(asks, seeds)
        finally:
            method.record_inputs = False
        final = method.topology.final
        prompts = method.prompts(final, asks, format, up.contexts)
        clock = Stopwatch(bb.device).start()
        contexts = []
        n_prompt = []
        for b, prompt in enumerate(prompts):
            ids, _ = tokenize(bb.tokenizer, [prompt], bb.device)
            n_prompt.append(ids.shape[1])
            contexts.append(torch.cat([up.trace.real_inputs(b), bb.embed(ids)[0]], dim=0))  # (n_real, d)
        out = self._complete(
            bb,
            [{"prompt_embeds": embeds_payload(e)} for e in contexts],
            [len(e) for e in contexts],
            method.config.decode,
            seeds,
        )
        wall = clock.elapsed()
        records = [
            AgentRecord(final.name, n_prompt[b], 0, len(out[b].token_ids), wall, out[b].text) for b in range(len(asks))
        ]
        # As the HF loop accounts it: the last generated token is never appended to the trace.
        lengths = [len(contexts[b]) + max(len(out[b].token_ids) - 1, 0) for b in range(len(asks))]
        return [*up.agents, records], out, lengths

    def _text(self, method: Method, asks: list[Ask], format: str, seeds: list[int]):
        """Every decoding agent in vLLM from token ids: text_mas's upstream agents, then the final one."""
        bb = method.backbone
        messages: list[list[tuple[str, str]]] = [[] for _ in asks]
        agents, lengths = [], [0] * len(asks)
        roles = list(method.topology.upstream) if isinstance(method, TextMAS) else []
        for i, role in enumerate(roles):
            contexts = [self._readable(method, msgs, i) for msgs in messages]
            prompts = method.prompts(role, asks, "", contexts)
            agent_seeds = [s * 1009 + i + 1 for s in seeds]  # as TextMAS draws them
            records, out = self._decode_agent(bb, role.name, prompts, method.config.upstream_decode(), agent_seeds)
            agents.append(records)
            for b, (msgs, o) in enumerate(zip(messages, out)):
                msgs.append((role.name, o.text))
                lengths[b] = max(lengths[b], records[b].n_prompt_tokens + max(len(o.token_ids) - 1, 0))
        final_index = len(method.topology.roles) - 1
        contexts = [self._readable(method, msgs, final_index) if roles else "" for msgs in messages]
        prompts = method.prompts(method.topology.final, asks, format, contexts)
        records, out = self._decode_agent(bb, method.topology.final.name, prompts, method.config.decode, seeds)
        for b, o in enumerate(out):
            lengths[b] = max(lengths[b], records[b].n_prompt_tokens + max(len(o.token_ids) - 1, 0))
        return [*agents, records], out, lengths

    @staticmethod
    def _readable(method: Method, messages, index: int) -> str:
        if isinstance(method, TextMAS):
            return method._readable(messages, index)
        return text_context(messages)

    def _decode_agent(self, bb, name: str, prompts: list[str], config: DecodeConfig, seeds: list[int]):
        clock = Stopwatch(bb.device).start()
        ids = [bb.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = self._complete(bb, [{"prompt": row} for row in ids], [len(row) for row in ids], config, seeds)
        wall = clock.elapsed()
        return [
            AgentRecord(name, len(ids[b]), 0, len(out[b].token_ids), wall, out[b].text) for b in range(len(ids))
        ], out

    # ------------------------------------------------------------------ the HTTP side
    @property
    def model(self) -> str:
        """The served model's name, asked once."""
        if self._model is None:
            data = self._get("/v1/models")["data"]
            if not data:
                raise VLLMBackendError(f"the vLLM server at {self.url} serves no model")
            self._model = data[0]["id"]
        return self._model

    def _get(self, path: str) -> dict:
        import httpx

        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise VLLMBackendError(f"cannot reach the vLLM server at {self.url}: {exc}") from exc
        return self._json(response)

    def _json(self, response) -> dict:
        if response.status_code != 200:
            raise VLLMBackendError(f"vLLM server answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def _complete(
        self, bb, prompts: list[dict], prompt_lengths: list[int], config: DecodeConfig, seeds: list[int]
    ) -> list[Completion]:
        """One request per row, sent together: vLLM batches them continuously, and each row keeps
        its own seed (a question's sample does not depend on its neighbours, as in the HF loop)."""
        futures = [
            self._pool.submit(self._complete_one, bb, prompt, n, config, seed)
            for prompt, n, seed in zip(prompts, prompt_lengths, seeds)
        ]
        return [f.result() for f in futures]

    def _complete_one(self, bb, prompt: dict, n_prompt: int, config: DecodeConfig, seed: int) -> Completion:
        import httpx

        room = bb.max_length - n_prompt
        if room < 1:
            raise TraceOverflowError(
                f"the final agent's context is {n_prompt} positions, the model's is {bb.max_length}; "
                "shorten the prompts, use fewer agents or latent steps"
            )
        body = {
            "model": self.model,
            **prompt,
            "max_tokens": min(config.max_new_tokens, room),
            "temperature": config.temperature,
            "top_p": config.top_p,
            "seed": int(seed),
            "min_tokens": config.min_new_tokens,
            "ignore_eos": config.ignore_eos,
            "stop_token_ids": bb.eos_token_ids,
            "return_token_ids": True,
            "logprobs": 0,
        }
        try:
            response = self._http.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise VLLMBackendError(f"cannot reach the vLLM server at {self.url}: {exc}") from exc
        choice = self._json(response)["choices"][0]
        ids = [int(t) for t in choice.get("token_ids") or []]
        eos = set(bb.eos_token_ids)
        stopped = choice.get("finish_reason") == "stop"
        if stopped and (not ids or ids[-1] not in eos):
            stop = choice.get("stop_reason")
            ids.append(int(stop) if isinstance(stop, int) else bb.eos_token_ids[0])  # the HF loop keeps the EOS
        logprobs = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
        text = bb.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(ids, text, logprobs, truncated=not (ids and ids[-1] in eos))


def export_merged(backbone, adapter: str, out_dir: str | Path) -> Path:
    """A model directory with peft adapter `adapter` merged into the base weights, for vLLM to
    serve (the backbone itself is left as it is). Returns the directory."""
    import copy

    if not backbone.has_adapters or adapter not in backbone.model.peft_config:
        raise VLLMBackendError(f"no adapter {adapter!r} is loaded on the backbone to merge")
    model = copy.deepcopy(backbone.model)
    merged = model.merge_and_unload(adapter_names=[adapter])
    out = Path(out_dir)
    merged.save_pretrained(out)
    backbone.tokenizer.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- a local vLLM server

# The CPU build's defaults spin an OpenMP thread per core even when idle; on a machine shared with
# the HF side (tests, benchmarks) one passive thread leaves it room. Unset on a GPU.
CPU_SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def server_command(python: str, model_dir: str, port: int, served_name: str, extra: Sequence[str] = ()) -> list[str]:
    """`vllm serve` as the vLLM backend needs it: prompt embeddings on, fp32 for exact
    equivalence with the HF backend on CPU, eager mode. (vllm-cpu's own `vllm` script looks for the
    `vllm` distribution and fails, so the API server module is run directly.)"""
    return [
        python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", served_name, "--enable-prompt-embeds", "--dtype", "float32",
        "--max-model-len", "2048", "--enforce-eager", "--host", "127.0.0.1", "--port", str(port), *extra,
    ]  # fmt: skip


def start_server(python: str, model_dir: str, port: int, log_path: str, served_name: str = "model", cpu: bool = True):
    """Start a vLLM server process (its own session, so it can be stopped with its workers) and
    wait until it answers; returns (process, base URL). Stop it with `stop_server`."""
    import os
    import subprocess
    import time

    import httpx

    env = {**os.environ, **(CPU_SERVER_ENV if cpu else {})}
    log = open(log_path, "w")
    process = subprocess.Popen(
        server_command(python, model_dir, port, served_name),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise VLLMBackendError(f"the vLLM server exited with {process.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop_server(process)
            raise VLLMBackendError(f"the vLLM server did not answer within 600 s; see {log_path}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)


def stop_server(process) -> None:
    import os
    import signal
    import subprocess

    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
