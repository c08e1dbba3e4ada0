"""Trace inspection for humans: what the agents wrote into the latent channel and what the final
agent read of it (`inspect_question`), as JSON and a self-contained HTML page (`write_inspection`),
and aggregated over the inspected questions of eval runs (`aggregate`)."""

from diffmas.inspect.probe import InspectConfig, InspectError, inspect_question

__all__ = ["InspectConfig", "InspectError", "inspect_question"]
