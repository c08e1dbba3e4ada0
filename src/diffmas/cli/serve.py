"""`diffmas serve`: the OpenAI-compatible HTTP service (see docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c


@app.command()
def serve(
    ctx: typer.Context,
    method: str = typer.Option("latent_mas", help="Default method (a request may override it)."),
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    reads: str = c.ReadsOpt,
    adapter: Optional[Path] = c.AdapterOpt,
    chat_template_kwargs: Optional[str] = c.ChatKwargsOpt,
    max_new_tokens: int = c.MaxNewOpt,
    upstream_max_new_tokens: int = c.UpstreamNewOpt,
    backend: str = typer.Option("hf", help="hf (this process) or vllm (decoding agents in a vLLM server)."),
    vllm_url: Optional[str] = typer.Option(None, "--vllm-url", help="Base URL of `vllm serve --enable-prompt-embeds`."),
    vllm_merged: bool = typer.Option(
        False, "--vllm-merged", help="The vLLM server serves --adapter merged into its weights (export_merged)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on."),
    served_name: str = typer.Option("diffmas", "--served-name", help="The model name responses report."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Requests run together in one batch."),
    max_wait_ms: float = typer.Option(20.0, "--max-wait-ms", help="How long a batch waits to fill."),
    max_queue: int = typer.Option(64, "--max-queue", help="Waiting requests beyond this get 429."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Seconds before a request gets 504."),
    max_prompt_tokens: int = typer.Option(1024, "--max-prompt-tokens", help="Longer questions get 413."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="Larger max_tokens get 413."),
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
) -> None:
    """Serve the methods over HTTP: POST /v1/chat/completions, GET /health, GET /metrics."""
    import uvicorn

    from diffmas.serve import RequestSettings, ServeConfig, build_engine, create_app

    c.check_methods([method])
    trained = c.trained_agent_settings(ctx, adapter, latent_steps, topology, agents, roles, chat_template_kwargs, reads)
    defaults = RequestSettings(
        method=method,
        latent_steps=trained["latent_steps"],
        topology=trained["topology"],
        agents=trained["agents"],
        reads=trained["reads"],
        max_tokens=max_new_tokens,
        upstream_max_tokens=upstream_max_new_tokens,
    )
    config = ServeConfig(
        defaults=defaults,
        model=model,
        served_name=served_name,
        roles=str(trained["roles"]) if trained["roles"] else None,
        adapter=str(adapter) if adapter else None,
        chat_kwargs=c.parse_chat_kwargs(trained["chat_template_kwargs"]),
        backend=backend,
        vllm_url=vllm_url,
        vllm_merged=vllm_merged,
        dtype=dtype,
        device=device,
        host=host,
        port=port,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
    )
    web = create_app(config, build_engine(config))
    c.err_console.print(f"serving {method} ({backend}) on http://{host}:{port}/v1/chat/completions")
    # in-flight requests get as long as a request may take before the server stops
    uvicorn.run(web, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(config.shutdown_grace_s))
