"""Agents as data: roles (name + prompt templates) and topologies (who reads whom).

A role's templates may use four fields:
  {question} the task's question text (options included for multiple choice)
  {context}  what earlier agents handed over as text (text_mas); empty on the latent channel,
             where the earlier agents' messages are in the trace instead
  {format}   the task's answer-format instruction (normally used by the final agent only)
  {private}  this role's own input, if the task gives one (`Example.private`); empty otherwise

Topologies:
  sequential    every agent reads everything written before it (Planner -> Critic -> Refiner -> Solver)
  hierarchical  independent specialists each write to the trace without seeing one another;
                the final aggregator reads all of it
  chain         each agent reads only the agent just before it (sender -> relay ... -> reader):
                what reaches the last agent must have crossed every hop
The last role of a topology is the final agent: the only one that decodes text in latent_mas.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from diffmas.errors import DiffmasError

TopologyKind = Literal["sequential", "hierarchical", "chain"]
TOPOLOGY_KINDS = ("sequential", "hierarchical", "chain")
TEMPLATE_FIELDS = ("question", "context", "format", "private")


class RoleError(DiffmasError):
    """A role or topology definition is invalid."""


@dataclass(frozen=True)
class Role:
    name: str  # unique within a topology; also the per-role adapter name
    system: str  # system message
    user: str  # user message template with {question}, {context}, {format}, {private}

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").isalnum():
            raise RoleError(f"role name {self.name!r} must be a non-empty identifier (letters, digits, _)")
        try:
            self.user.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
            raise RoleError(
                f"role {self.name!r}: user template has an unknown or broken field ({exc}); "
                f"allowed fields are {fields} (write {{{{ }}}} for literal braces)"
            ) from exc
        if "{question}" not in self.user:
            raise RoleError(f"role {self.name!r}: user template must contain {{question}}")

    def messages(self, question: str, context: str = "", format: str = "", private: str = "") -> list[dict]:
        """Chat messages for this agent."""
        user = self.user.format(question=question, context=context, format=format, private=private)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user.strip()}]


@dataclass(frozen=True)
class Topology:
    kind: TopologyKind
    roles: tuple[Role, ...]  # upstream agents first, the final agent last

    def __post_init__(self):
        if self.kind not in TOPOLOGY_KINDS:
            raise RoleError(f"unknown topology {self.kind!r}; choose one of {', '.join(TOPOLOGY_KINDS)}")
        if not self.roles:
            raise RoleError("a topology needs at least one role (the final agent)")
        names = [r.name for r in self.roles]
        if len(set(names)) != len(names):
            raise RoleError(f"role names must be unique, got {names}")

    @property
    def upstream(self) -> tuple[Role, ...]:
        return self.roles[:-1]

    @property
    def final(self) -> Role:
        return self.roles[-1]

    def hidden_from(self, index: int) -> tuple[str, ...]:
        """Names of earlier agents that agent `index` must not read.

        Hierarchical specialists are independent of one another; the final agent reads all.
        In a chain every agent reads only its predecessor.
        """
        if self.kind == "chain":
            return tuple(r.name for r in self.roles[: max(index - 1, 0)])
        if self.kind == "sequential" or index == len(self.roles) - 1:
            return ()
        return tuple(r.name for r in self.roles[:index])

    def with_final_only(self) -> "Topology":
        """The single-agent baseline: the final agent alone, same prompt."""
        return Topology(kind="sequential", roles=(self.final,))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "roles": [asdict(r) for r in self.roles]}

    @classmethod
    def from_dict(cls, data: dict) -> "Topology":
        try:
            roles = tuple(Role(**r) for r in data["roles"])
            return cls(kind=data.get("kind", "sequential"), roles=roles)
        except (KeyError, TypeError) as exc:
            raise RoleError(
                f"bad topology definition ({exc}); expected {{kind: sequential|hierarchical, "
                "roles: [{name, system, user}, ...]}"
            ) from exc


# ----------------------------------------------------------------------------- defaults

SYSTEM = "You are a helpful assistant working in a team of agents that solve a problem together."

_CONTEXT = "{context}"  # empty on the latent channel; the text channel fills in earlier messages

PLANNER = Role(
    name="planner",
    system=SYSTEM,
    user="You are the Planner. Design a short step-by-step plan to solve the question. "
    "Do not give the final answer.\n\nQuestion: {question}\n" + _CONTEXT,
)
CRITIC = Role(
    name="critic",
    system=SYSTEM,
    user="You are the Critic. Check the plan proposed so far for the question below and point out "
    "mistakes or missing steps.\n\nQuestion: {question}\n" + _CONTEXT,
)
REFINER = Role(
    name="refiner",
    system=SYSTEM,
    user="You are the Refiner. Using the plan and the feedback so far, write an improved, correct "
    "plan for the question.\n\nQuestion: {question}\n" + _CONTEXT,
)
SOLVER = Role(
    name="solver",
    system=SYSTEM,
    user="You are the Solver. Earlier agents may have left notes; use them if they help, ignore "
    "them if not.\n" + _CONTEXT + "\nQuestion: {question}\n\n{format}",
)

SPECIALISTS = tuple(
    Role(
        name=name,
        system=SYSTEM,
        user=f"You are the {title} specialist. Think about the question from your field's point of view "
        "and reason step by step.\n\nQuestion: {question}\n" + _CONTEXT,
    )
    for name, title in (("math", "mathematics"), ("science", "science"), ("code", "programming"))
)
AGGREGATOR = Role(
    name="aggregator",
    system=SYSTEM,
    user="You are the Aggregator. Several specialists have analysed the question; combine what is "
    "useful and solve it.\n" + _CONTEXT + "\nQuestion: {question}\n\n{format}",
)


def default_topology(kind: TopologyKind = "sequential", n_agents: int | None = None) -> Topology:
    """Planner -> Critic -> Refiner -> Solver, or three specialists -> Aggregator.

    n_agents: total agents including the final one (fewer drops middle roles; more repeats
        the middle role with numbered names).
    """
    if kind in ("sequential", "chain"):
        upstream = [PLANNER, CRITIC, REFINER]
        final = SOLVER
    elif kind == "hierarchical":
        upstream = list(SPECIALISTS)
        final = AGGREGATOR
    else:
        raise RoleError(f"unknown topology {kind!r}; choose one of {', '.join(TOPOLOGY_KINDS)}")
    if n_agents is not None:
        upstream = _resize(upstream, n_agents - 1)
    return Topology(kind=kind, roles=(*upstream, final))


def build_topology(
    kind: str = "sequential", n_agents: int | None = None, roles: str | Path | None = None, task=None
) -> Topology:
    """The topology a config names: its roles file when given, else the task's own roles (tasks
    such as the communication benchmark bring them), else the default of that kind and size."""
    if roles:
        return load_topology(roles)
    own = task.topology(n_agents) if task is not None else None
    return own or default_topology(kind, n_agents)  # type: ignore[arg-type]


def _resize(upstream: list[Role], n: int) -> list[Role]:
    if n < 0:
        raise RoleError("n_agents must be at least 1 (the final agent)")
    if n <= len(upstream):
        return upstream[:n]
    extra = [
        Role(f"{upstream[-1].name}_{i}", upstream[-1].system, upstream[-1].user)
        for i in range(2, n - len(upstream) + 2)
    ]
    return upstream + extra


def load_topology(path: str | Path) -> Topology:
    """Read a topology from YAML or JSON ({kind, roles: [{name, system, user}]}).

    Every problem with the file (missing, not UTF-8, a syntax error, a field of the wrong type) is
    a RoleError naming the file and, where the parser knows it, the line.
    """
    path = Path(path)
    if not path.is_file():
        raise RoleError(f"roles file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RoleError(f"roles file {str(path)!r} is not UTF-8 text (line {line}); save it as UTF-8") from None
    parsed = _parse_roles_text(path, text)
    if not isinstance(parsed, dict):
        raise RoleError(f"{path}: expected a mapping with 'kind' and 'roles'")
    _check_role_fields(path, parsed.get("roles"))
    return Topology.from_dict(parsed)


def _parse_roles_text(path: Path, text: str):
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise RoleError(f"roles file {str(path)!r} is not valid YAML{where} ({problem})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RoleError(
            f"roles file {str(path)!r} is not valid JSON at line {exc.lineno}, column {exc.colno} "
            f"({exc.msg}); YAML files need a .yaml or .yml suffix"
        ) from None


def _check_role_fields(path: Path, roles) -> None:
    """Roles as a list of {name, system, user} strings (YAML turns `name: 1` or `user:` into others)."""
    if not isinstance(roles, list) or not roles:
        raise RoleError(
            f"roles file {str(path)!r}: 'roles' must be a non-empty list of {{name, system, user}} mappings"
        )
    for i, role in enumerate(roles, start=1):
        if not isinstance(role, dict):
            raise RoleError(
                f"roles file {str(path)!r}: role {i} must be a mapping with name, system and user, "
                f"got {type(role).__name__}"
            )
        for key in ("name", "system", "user"):
            if key in role and not isinstance(role[key], str):
                raise RoleError(
                    f"roles file {str(path)!r}: role {i} field {key!r} must be a string, "
                    f"got {type(role[key]).__name__} (quote it in YAML)"
                )


def render_prompt(
    tokenizer,
    role: Role,
    question: str,
    context: str = "",
    format: str = "",
    chat_kwargs: dict | None = None,
    private: str = "",
) -> str:
    """The agent's chat, rendered with the tokenizer's chat template, ready for the assistant turn."""
    return tokenizer.apply_chat_template(
        role.messages(question, context, format, private),
        tokenize=False,
        add_generation_prompt=True,
        **(chat_kwargs or {}),
    )
