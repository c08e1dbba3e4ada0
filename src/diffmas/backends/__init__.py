"""Decoding backends: where the agents that decode text run.

`hf` is today's path (the trace and the one decode loop in `generate.py`); `vllm` sends the
decoding agents to a vLLM server (prompt embeddings for the final agent of latent_mas / diffmas,
token ids for text agents) while the upstream latent agents still run here. Both take a built
`Method` and return its `RunResult`s, so the CLI and the server use either the same way.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

from diffmas.errors import DiffmasError
from diffmas.methods import Method, RunResult

BACKENDS = ("hf", "vllm")


class Backend(Protocol):
    name: str

    def run_batch(
        self,
        method: Method,
        questions: Sequence[str],
        format: str = "",
        seeds: Sequence[int] | None = None,
        privates: Sequence[Mapping[str, str]] | None = None,
    ) -> list[RunResult]: ...

    def check(self, method: Method) -> None:
        """Raise a DiffmasError when this backend cannot run `method` as configured."""
        ...


def get_backend(
    name: str, vllm_url: str | None = None, vllm_timeout_s: float = 600.0, merged_adapter: str | None = None
) -> Backend:
    """A backend by name; `vllm` needs the base URL of a `vllm serve --enable-prompt-embeds` server
    (and, where it serves weights with an adapter merged in, that adapter's name)."""
    if name == "hf":
        from diffmas.backends.hf import HFBackend

        return HFBackend()
    if name == "vllm":
        from diffmas.backends.vllm import VLLMBackend

        if not vllm_url:
            raise DiffmasError(
                "backend 'vllm' needs the URL of a running vLLM server: --vllm-url http://127.0.0.1:8000 "
                "(start one with `vllm serve MODEL_DIR --enable-prompt-embeds`, see docs/serving.md)"
            )
        return VLLMBackend(vllm_url, timeout_s=vllm_timeout_s, merged_adapter=merged_adapter)
    raise DiffmasError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
