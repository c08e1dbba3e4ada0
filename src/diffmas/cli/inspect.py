"""`diffmas inspect QUESTION --out DIR`: one question under the probes -> DIR/inspection.json + DIR/index.html."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from diffmas.cli import app
from diffmas.cli import common as c
from diffmas.errors import DiffmasError


def _layers(text: Optional[str]) -> Optional[list[int]]:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DiffmasError(f"--lens-layers must be comma-separated layer numbers, e.g. 6,12,30; got {text!r}") from None


@app.command("inspect")
def inspect_(
    ctx: typer.Context,
    question: Optional[str] = typer.Argument(None, help="The question (or take one from --task/--index)."),
    out: Path = typer.Option(..., "--out", help="Folder for inspection.json and index.html."),
    method: str = typer.Option("latent_mas", help="latent_mas or diffmas (single, text_mas: the final agent only)."),
    task: Optional[str] = typer.Option(None, "--task", help="Take the question from this task (with --index)."),
    index: int = typer.Option(0, "--index", help="Which example of --task (0 = the first)."),
    split: str = c.SplitOpt,
    data_dir: Optional[Path] = c.DataDirOpt,
    latent_steps: int = c.LatentStepsOpt,
    model: str = c.ModelOpt,
    topology: str = c.TopologyOpt,
    agents: Optional[int] = c.AgentsOpt,
    roles: Optional[Path] = c.RolesOpt,
    format: str = typer.Option("", "--format", help="Answer-format instruction (default: the task's)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Decode budget of the final agent."),
    upstream_max_new_tokens: int = c.UpstreamNewOpt,
    temperature: float = c.TemperatureOpt,
    top_p: float = c.TopPOpt,
    chat_template_kwargs: Optional[str] = c.ChatKwargsOpt,
    reads: str = c.ReadsOpt,
    adapter: Optional[Path] = c.AdapterOpt,
    seed: int = c.SeedOpt,
    top_k: int = typer.Option(5, "--top-k", help="Tokens per logit-lens reading and nearest-token list."),
    lens_layers: Optional[str] = typer.Option(
        None, "--lens-layers", help="1-based layers, e.g. 6,12,30 (default: 4 spread)."
    ),
    watch: list[str] = typer.Option([], "--watch", help="A word whose rank every lens reading records (repeatable)."),
    dtype: str = c.DtypeOpt,
    device: str = c.DeviceOpt,
) -> None:
    """Run one question with probes: trace timeline, logit lens of latent steps, attention shares."""
    from diffmas.evaluate.runner import load_method
    from diffmas.inspect import InspectConfig, inspect_question
    from diffmas.inspect.page import write_inspection
    from diffmas.inspect.runs import inspect_example
    from diffmas.roles import build_topology

    if (question is None or not question.strip()) == (task is None):
        raise DiffmasError("give either a QUESTION or --task TASK [--index I], not both or neither")
    if index < 0:
        raise DiffmasError(f"--index must be >= 0, got {index}")
    c.check_methods([method])
    config = InspectConfig(top_k=top_k, lens_layers=_layers(lens_layers), watch=list(watch))
    example, task_obj = None, None
    if task is not None:
        from diffmas.tasks import get_task

        task_obj = get_task(task)
        examples = task_obj.load(split, data_dir=data_dir, limit=index + 1)
        if index >= len(examples):
            raise DiffmasError(
                f"--index {index}: {task} ({split}) has {len(examples)} examples (0..{len(examples) - 1})"
            )
        example = examples[index]
    trained = c.trained_agent_settings(ctx, adapter, latent_steps, topology, agents, roles, chat_template_kwargs, reads)
    topo = build_topology(trained["topology"], trained["agents"], trained["roles"], task_obj)
    method_config = c.build_config(
        trained["latent_steps"],
        max_new_tokens,
        upstream_max_new_tokens,
        temperature,
        top_p,
        seed,
        None,
        trained["chat_template_kwargs"],
        trained["reads"],
    )
    built = load_method(method, topo, method_config, model=model, dtype=dtype, device=device, adapter=adapter)
    if example is not None:
        record = inspect_example(built, task_obj, example, seed, config)
    else:
        record = inspect_question(built, question, format, seed, config=config)
    record["adapter"] = str(adapter) if adapter else None
    json_path, html_path = write_inspection(record, out)
    c.console.print(f"[b]answer[/b] ({method}): {record['answer']['text'].strip()}")
    if "correct" in record:
        c.console.print(f"gold: {record['gold']}  correct: {record['correct']}")
    c.console.print(f"wrote {json_path} and {html_path}")
