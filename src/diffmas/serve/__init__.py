"""`diffmas serve`: an OpenAI-compatible HTTP service over the methods (see docs/serving.md).

from diffmas.serve import ServeConfig, build_engine, create_app
app = create_app(config, build_engine(config))      # then uvicorn.run(app, ...)
"""

from __future__ import annotations

from diffmas.serve.app import create_app
from diffmas.serve.config import RequestSettings, ServeConfig, ServeError
from diffmas.serve.engine import Engine

__all__ = ["Engine", "RequestSettings", "ServeConfig", "ServeError", "build_engine", "create_app"]


def build_engine(config: ServeConfig) -> Engine:
    """Load the model (and adapter) the config names, and the backend it decodes with."""
    from diffmas.backbone import load_backbone
    from diffmas.backends import get_backend
    from diffmas.roles import build_topology
    from diffmas.train.adapters import attach_checked, check_adapter_dir

    d = config.defaults
    fixed = build_topology(d.topology, d.agents, config.roles) if (config.roles or config.adapter) else None
    if config.adapter:
        check_adapter_dir(config.adapter)
    backbone = load_backbone(config.model, dtype=config.dtype, device=config.device)
    adapters = attach_checked(backbone, config.adapter, fixed) if config.adapter else None
    merged = adapters.get(fixed.final.name) if (adapters and config.vllm_merged) else None
    backend = get_backend(config.backend, config.vllm_url, config.request_timeout_s, merged)
    engine = Engine(backbone, backend, fixed, adapters, config.chat_kwargs)
    engine.method(d)  # the server's own defaults must run: fail at start, not at the first request
    return engine
