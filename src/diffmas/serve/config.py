"""Server settings (fixed at start) and the per-request settings a client may override."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from diffmas.backbone import DEFAULT_MODEL
from diffmas.errors import DiffmasError
from diffmas.methods import list_methods
from diffmas.roles import TOPOLOGY_KINDS
from diffmas.trace import READS


class ServeError(DiffmasError):
    """A server setting or a request is invalid."""


@dataclass(frozen=True)
class RequestSettings:
    """What one request runs with: the server's defaults, overridden by the request's extra fields.

    Requests with equal settings (and equal answer format) can share a batch.
    """

    method: str = "latent_mas"
    latent_steps: int = 10
    topology: str = "sequential"
    agents: int | None = None  # total agents including the final one (None: the topology's default)
    reads: str = "all"
    max_tokens: int = 256  # the final agent's decode budget
    upstream_max_tokens: int = 256  # text_mas upstream agents' budget
    temperature: float = 0.0
    top_p: float = 1.0
    format: str = ""  # the final agent's answer instruction (the request's system message)

    def __post_init__(self):
        if self.method not in list_methods():
            raise ServeError(f"method={self.method!r}: choose one of {', '.join(list_methods())}")
        if self.topology not in TOPOLOGY_KINDS:
            raise ServeError(f"topology={self.topology!r}: choose one of {', '.join(TOPOLOGY_KINDS)}")
        if self.reads not in READS:
            raise ServeError(f"reads={self.reads!r}: choose one of {', '.join(READS)}")
        if self.latent_steps < 0:
            raise ServeError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.agents is not None and self.agents < 1:
            raise ServeError(f"agents must be >= 1 (the final agent included), got {self.agents}")
        if self.max_tokens < 1 or self.upstream_max_tokens < 1:
            raise ServeError(f"max_tokens must be >= 1, got {self.max_tokens} / {self.upstream_max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ServeError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")

    def with_overrides(self, **fields) -> "RequestSettings":
        return replace(self, **{k: v for k, v in fields.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServeConfig:
    """`diffmas serve`'s settings; `defaults` are what a request runs with unless it says otherwise."""

    defaults: RequestSettings = RequestSettings()
    model: str = DEFAULT_MODEL  # embedded name, local directory or hub id
    served_name: str = "diffmas"  # the `model` reported in responses and /v1/models
    roles: str | None = None  # roles file: then topology/agents cannot be overridden per request
    adapter: str | None = None  # trained adapter directory (diffmas); fixes topology and roles
    chat_kwargs: dict = field(default_factory=dict)  # extra chat-template arguments, e.g. enable_thinking
    backend: str = "hf"  # hf, or vllm (decoding agents in a vLLM server at vllm_url)
    vllm_url: str | None = None
    # the vLLM server serves the final agent's adapter merged into its weights (backends.vllm.export_merged)
    vllm_merged: bool = False
    dtype: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8  # requests run together in one batch
    max_wait_ms: float = 20.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting beyond this are answered 429
    request_timeout_s: float = 300.0  # a request not answered by then is answered 504
    max_prompt_tokens: int = 1024  # a question longer than this (in tokens) is answered 413
    max_tokens_limit: int = 1024  # a request may not ask for more new tokens than this (413)
    max_body_bytes: int = 1 << 20  # a larger request body is answered 413
    shutdown_grace_s: float = 30.0  # on shutdown, in-flight requests get this long to finish

    def __post_init__(self):
        if self.max_batch_size < 1 or self.max_queue < 1:
            raise ServeError(f"max_batch_size and max_queue must be >= 1, got {self.max_batch_size}, {self.max_queue}")
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ServeError("max_wait_ms must be >= 0 and request_timeout_s > 0")
        if self.backend not in ("hf", "vllm"):
            raise ServeError(f"backend={self.backend!r}: choose hf or vllm")
        if self.backend == "vllm" and not self.vllm_url:
            raise ServeError(
                "backend 'vllm' needs the URL of a running vLLM server: --vllm-url http://127.0.0.1:8001 "
                "(see docs/serving.md)"
            )
        if self.vllm_merged and not self.adapter:
            raise ServeError("--vllm-merged says the vLLM server holds a merged adapter: pass that --adapter too")
        if self.defaults.max_tokens > self.max_tokens_limit:
            raise ServeError(
                f"the default max_tokens {self.defaults.max_tokens} is above max_tokens_limit {self.max_tokens_limit}"
            )
