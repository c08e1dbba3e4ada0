"""`diffmas run QUESTION`: answer one question with one method and show what it cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c
from diffmas.errors import DiffmasError


@app.command()
def run(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="The question to answer."),
    method: str = typer.Option("latent_mas", help="single, text_mas, latent_mas or diffmas."),
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    format: str = typer.Option("", "--format", help="Answer-format instruction for the final agent."),
    max_new_tokens: int = c.MaxNewOpt,
    upstream_max_new_tokens: int = c.UpstreamNewOpt,
    temperature: float = c.TemperatureOpt,
    upstream_temperature: Optional[float] = c.UpstreamTemperatureOpt,
    top_p: float = c.TopPOpt,
    chat_template_kwargs: Optional[str] = c.ChatKwargsOpt,
    reads: str = c.ReadsOpt,
    trace_policy: Optional[str] = c.TracePolicyOpt,
    trace_budget: Optional[str] = c.TraceBudgetOpt,
    trace_scope: str = c.TraceScopeOpt,
    compile: str = c.CompileOpt,
    adapter: Optional[Path] = c.AdapterOpt,
    seed: int = c.SeedOpt,
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the full result record as JSON."),
) -> None:
    """Answer one question with one method; print the answer and its cost."""
    from diffmas.evaluate.runner import load_method
    from diffmas.roles import build_topology

    if not question.strip():
        raise DiffmasError("the question is empty; pass the question to answer, e.g. diffmas run 'What is 2+2?'")
    c.check_methods([method])
    trained = c.trained_agent_settings(ctx, adapter, latent_steps, topology, agents, roles, chat_template_kwargs, reads)
    latent_steps, topology, agents, roles, chat_template_kwargs, reads = (
        trained[k] for k in ("latent_steps", "topology", "agents", "roles", "chat_template_kwargs", "reads")
    )
    topo = build_topology(topology, agents, roles)
    config = c.build_config(
        latent_steps,
        max_new_tokens,
        upstream_max_new_tokens,
        temperature,
        top_p,
        seed,
        upstream_temperature,
        chat_template_kwargs,
        reads,
        trace_policy,
        trace_budget,
        trace_scope,
        compile,
    )
    built = load_method(method, topo, config, model=model, dtype=dtype, device=device, adapter=adapter)
    result = built.run_batch([question], format=format)[0]
    if as_json:
        record = {
            "question": question,
            "model": model,
            "adapter": str(adapter) if adapter else None,
            "topology": topo.to_dict(),
            "config": config.to_dict(),
            **result.to_dict(),
        }
        print(json.dumps(record, indent=2))
        return
    c.console.print(f"[b]answer[/b] ({method}):\n{result.text.strip()}\n")
    c.console.print(c.cost_table(result))
