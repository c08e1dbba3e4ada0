"""diffmas: multi-agent LLM systems whose agents talk through a learned latent channel.

Public API (the CLI is a thin layer over it):

    from diffmas import load_backbone, get_method, MethodConfig, DecodeConfig, default_topology
    bb = load_backbone("smollm2-135m")            # or a hub id / local directory
    method = get_method("latent_mas", bb, default_topology("sequential"), MethodConfig(latent_steps=10))
    result = method.run_batch(["What is 12 * 7?"], format="Put the answer in \\\\boxed{}.")[0]
    result.text, result.agents, result.trace_bytes
"""

__version__ = "0.1.0"

from diffmas.backbone import Backbone, Realigner, load_backbone  # noqa: E402
from diffmas.errors import DiffmasError  # noqa: E402
from diffmas.generate import DecodeConfig, Decoded, decode  # noqa: E402
from diffmas.methods import (  # noqa: E402
    AgentRecord,
    Method,
    MethodConfig,
    RunResult,
    get_method,
    list_methods,
    register_method,
)
from diffmas.roles import Role, Topology, build_topology, default_topology, load_topology  # noqa: E402
from diffmas.trace import LatentTrace, Segment  # noqa: E402

__all__ = [
    "AgentRecord",
    "Backbone",
    "DecodeConfig",
    "Decoded",
    "DiffmasError",
    "LatentTrace",
    "Method",
    "MethodConfig",
    "Realigner",
    "Role",
    "RunResult",
    "Segment",
    "Topology",
    "build_topology",
    "decode",
    "default_topology",
    "get_method",
    "list_methods",
    "load_backbone",
    "load_topology",
    "register_method",
]
