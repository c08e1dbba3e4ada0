"""Options shared by subcommands, and the one place that turns them into typed configs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from diffmas.backbone import DEFAULT_MODEL
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, MethodError, list_methods
from diffmas.roles import Topology, default_topology, load_topology

console = Console()
err_console = Console(stderr=True)

ModelOpt = typer.Option(DEFAULT_MODEL, "--model", help="Embedded name, local model directory or hub id.")
DtypeOpt = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
DeviceOpt = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ...")
LatentStepsOpt = typer.Option(10, "--latent-steps", "-m", help="Latent steps per upstream agent.")
TopologyOpt = typer.Option("sequential", help="sequential or hierarchical.")
AgentsOpt = typer.Option(None, "--agents", help="Number of agents including the final one.")
RolesOpt = typer.Option(None, "--roles", help="YAML/JSON file with {kind, roles: [{name, system, user}]}.")
MaxNewOpt = typer.Option(256, "--max-new-tokens", help="Decode budget of the final agent.")
UpstreamNewOpt = typer.Option(256, "--upstream-max-new-tokens", help="Decode budget of text_mas upstream agents.")
TemperatureOpt = typer.Option(0.0, help="0 = greedy.")
TopPOpt = typer.Option(1.0, "--top-p")
SeedOpt = typer.Option(0)


def check_methods(names: list[str]) -> None:
    """Fail before loading a model when a method name is wrong."""
    import difflib

    for name in names:
        if name not in list_methods():
            close = difflib.get_close_matches(name, list_methods(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MethodError(f"unknown method {name!r}{hint}; choose one of {', '.join(list_methods())}")


def build_topology(kind: str, n_agents: Optional[int], roles: Optional[Path]) -> Topology:
    if roles is not None:
        return load_topology(roles)
    return default_topology(kind, n_agents)  # type: ignore[arg-type]


def build_config(latent_steps: int, max_new_tokens: int, upstream_max_new_tokens: int,
                 temperature: float, top_p: float, seed: int) -> MethodConfig:
    return MethodConfig(
        latent_steps=latent_steps,
        decode=DecodeConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed),
        upstream_max_new_tokens=upstream_max_new_tokens,
    )


def mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def cost_table(result) -> Table:
    """Per-agent tokens and time, plus trace size and peak memory, for one RunResult."""
    table = Table(title=f"cost ({result.method})", title_justify="left")
    for col in ("agent", "prompt tok", "latent steps", "generated tok", "wall s"):
        table.add_column(col, justify="left" if col == "agent" else "right")
    for a in result.agents:
        table.add_row(a.role, str(a.n_prompt_tokens), str(a.n_latent_steps), str(a.n_generated_tokens),
                      f"{a.wall_s:.2f}")
    tot = result.n_tokens
    table.add_row("[b]total", str(tot["prompt"]), str(tot["latent"]), str(tot["generated"]),
                  f"{result.wall_s:.2f}", end_section=True)
    table.caption = (f"trace: {result.trace_len} positions, {mib(result.trace_bytes)} KV  |  "
                     f"peak memory: {mib(result.peak_memory_bytes)}")
    return table
