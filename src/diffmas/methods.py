"""Methods: single agent, text multi-agent and latent multi-agent, as small compositions of the
trace, the channels and the one decode loop.

Every method has the same entry point, `run_batch(questions, format, seeds)`, and returns one
`RunResult` per question with the answer text and its cost (tokens per agent, wall time, trace
size, peak memory). `diffmas` is `latent_mas` run under trained LoRA adapters.

Per-agent adapters: `adapters` maps a role name to a peft adapter name. Each agent's prompt,
latent steps and generated tokens are computed under its own adapter; later agents read those
trace entries as written.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch

from diffmas.accounting import PhaseMeter, Stopwatch
from diffmas.backbone import Backbone
from diffmas.budget import TraceBudget, apply_budget, probe_for, row_seeds
from diffmas.channel import latent_steps, prefill, text_context
from diffmas.errors import DiffmasError
from diffmas.fast_path import check_compile_mode, static_step
from diffmas.generate import DecodeConfig, Decoded, continuation_logprobs, decode
from diffmas.roles import Role, Topology, default_topology, render_prompt
from diffmas.trace import READS, LatentTrace, Reads


class MethodError(DiffmasError):
    """Unknown method or invalid method settings."""


@dataclass
class MethodConfig:
    latent_steps: int = 10  # m: latent steps per upstream agent (latent_mas, diffmas)
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # the final agent's decoding
    upstream_max_new_tokens: int = 256  # text_mas: decode budget of each upstream agent
    # text_mas: upstream agents' temperature (None: the final agent's). 0 makes the upstream text
    # deterministic, so k samples of a question share it and differ only in the final answer.
    upstream_temperature: float | None = None
    chat_kwargs: dict = field(default_factory=dict)  # extra chat-template args, e.g. enable_thinking
    # Which entries of earlier agents each agent attends to: all (the paper's trace), latent (only
    # their latent steps) or none (no communication). text_mas: none drops the messages.
    reads: Reads = "all"
    # Bound on what each upstream agent leaves in the trace (latent_mas, diffmas); None: everything.
    trace_budget: TraceBudget | None = None
    # Inference's one-position steps (decode, latent) compiled on static, bucketed trace buffers:
    # off (eager, the default), auto, or a backend/mode of `diffmas.fast_path.COMPILE_MODES`.
    compile: str = "off"

    def __post_init__(self):
        if isinstance(self.decode, dict):
            self.decode = DecodeConfig(**self.decode)
        self.trace_budget = TraceBudget.from_any(self.trace_budget)
        if self.reads not in READS:
            raise MethodError(f"reads={self.reads!r}: choose one of {', '.join(READS)}")
        if self.latent_steps < 0:
            raise MethodError(f"latent_steps must be >= 0, got {self.latent_steps}")
        if self.upstream_max_new_tokens < 1:
            raise MethodError(f"upstream_max_new_tokens must be >= 1, got {self.upstream_max_new_tokens}")
        if self.upstream_temperature is not None and self.upstream_temperature < 0:
            raise MethodError(f"upstream_temperature must be >= 0, got {self.upstream_temperature}")
        check_compile_mode(self.compile)

    def upstream_decode(self) -> DecodeConfig:
        """How text_mas upstream agents decode: the final agent's settings with their own budget."""
        temperature = self.decode.temperature if self.upstream_temperature is None else self.upstream_temperature
        return DecodeConfig(
            **{
                **asdict(self.decode),
                "max_new_tokens": self.upstream_max_new_tokens,
                "min_new_tokens": 0,
                "temperature": temperature,
            }
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AgentRecord:
    role: str
    n_prompt_tokens: int
    n_latent_steps: int
    n_generated_tokens: int
    wall_s: float  # time of this agent's phase for the whole batch
    text: str | None = None  # decoded output, for agents that decode


@dataclass
class RunResult:
    method: str
    text: str  # the final agent's answer
    agents: list[AgentRecord]
    trace_len: int  # real positions of the largest trace built for this question
    trace_bytes: int  # KV bytes of the largest trace: trace_len x layers x 2 x kv_heads x head_dim x
    # dtype size, or less where a quantised budget packs entries
    wall_s: float  # whole batch, all agents
    peak_memory_bytes: int  # whole batch; CUDA max allocated or CPU peak RSS
    batch_size: int
    truncated: bool  # the final agent hit max_new_tokens or the context limit
    token_logprobs: list[float] = field(default_factory=list)  # final agent, per generated token
    token_ids: list[int] = field(default_factory=list)  # final agent's generated ids (inspection labels)
    token_entropies: list[float] = field(default_factory=list)  # final agent, top-k entropy per token
    option_logprobs: list[float] | None = None  # per option: sum log p(option text | context), if asked
    # option scoring's own cost (whole batch), kept out of wall_s and peak_memory_bytes
    option_wall_s: float | None = None
    option_peak_memory_bytes: int | None = None

    @property
    def n_tokens(self) -> dict[str, int]:
        """Totals over agents."""
        return {
            "prompt": sum(a.n_prompt_tokens for a in self.agents),
            "latent": sum(a.n_latent_steps for a in self.agents),
            "generated": sum(a.n_generated_tokens for a in self.agents),
        }

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- registry

METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def wrap(cls):
        if name in METHODS:
            raise MethodError(f"method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(
    name: str,
    backbone: Backbone,
    topology: Topology | None = None,
    config: MethodConfig | None = None,
    adapters: Mapping[str, str] | None = None,
) -> "Method":
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"unknown method {name!r}{hint}; choose one of {', '.join(METHODS)}")
    return METHODS[name](backbone, topology, config, adapters)


def check_budget(name: str, config: MethodConfig) -> None:
    """A trace budget bounds the latent trace: refuse it, before any model is loaded, elsewhere
    and with the compiled fast path (a budget rewrites and packs trace columns outside its static
    buffers)."""
    if config.trace_budget is None:
        return
    if not issubclass(METHODS[name], LatentMAS):
        raise MethodError(f"a trace budget applies to the latent channel (latent_mas, diffmas), not {name}")
    if config.compile != "off":
        raise MethodError(
            f"--compile {config.compile} does not combine with a trace budget (--trace-policy "
            f"{config.trace_budget.policy}): the budget rewrites trace columns outside the static buffers; drop one"
        )


def list_methods() -> list[str]:
    return list(METHODS)


# ----------------------------------------------------------------------------- base


@dataclass
class Upstream:
    """What the upstream agents leave for the final agent."""

    agents: list[list[AgentRecord]]  # per upstream agent, per row
    trace: LatentTrace  # the trace the final agent writes on (fresh for text handoff)
    contexts: list[str]  # per row, earlier agents' text for the final prompt ("" on the latent channel)
    traces: list[LatentTrace]  # every trace built, for size accounting

    def select(self, rows: list[int]) -> "Upstream":
        """The upstream of the given rows (rows may repeat: samples of one question share it)."""
        trace = self.trace.select(rows)
        # keep `trace` inside `traces`: the final agent writes to it and its size is accounted there
        traces = [trace if t is self.trace else t.select(rows) for t in self.traces]
        return Upstream(
            agents=[[records[r] for r in rows] for records in self.agents],
            trace=trace,
            contexts=[self.contexts[r] for r in rows],
            traces=traces,
        )


@dataclass(frozen=True)
class OptionQuery:
    """Multiple choice scored by likelihood: log p(option text | context) under the final agent."""

    question: str  # the bare question, as lm-evaluation-harness puts it ("Question: ...\nAnswer:")
    options: tuple[str, ...]  # continuations, each with its leading space


OPTION_CONTEXT = "{context}Question: {question}\nAnswer:"  # plain text, no chat template


@dataclass(frozen=True)
class Ask:
    """One question as every agent receives it: the shared text and each role's own input."""

    question: str
    private: Mapping[str, str] = field(default_factory=dict)  # role name -> that role's own input

    def key(self) -> tuple:
        return (self.question, tuple(sorted(self.private.items())))


def asks_of(questions: Sequence[str], privates: Sequence[Mapping[str, str]] | None = None) -> list[Ask]:
    """Questions (and their per-role inputs, if any) as `Ask`s."""
    privates = privates if privates is not None else [{}] * len(questions)
    return [Ask(q, dict(p)) for q, p in zip(questions, privates)]


class Method:
    name: ClassVar[str]
    # runtime only: traces keep their input embeddings (the vLLM backend rebuilds the final
    # agent's context from them); never saved with a config
    record_inputs: bool = False

    def __init__(
        self,
        backbone: Backbone,
        topology: Topology | None = None,
        config: MethodConfig | None = None,
        adapters: Mapping[str, str] | None = None,
    ):
        self.backbone = backbone
        self.topology = topology or default_topology()
        self.config = config or MethodConfig()
        self.adapters = dict(adapters or {})
        check_budget(self.name, self.config)
        self.step = static_step(backbone, self.config.compile)  # None: eager

    # -- one call per batch of questions
    def run_batch(
        self,
        questions: Sequence[str],
        format: str = "",
        seeds: Sequence[int] | None = None,
        options: Sequence[OptionQuery] | None = None,
        privates: Sequence[Mapping[str, str]] | None = None,
    ) -> list[RunResult]:
        """questions: task-formatted question texts; format: the task's answer instruction;
        seeds: one per question (sampling), default all `config.decode.seed`;
        options: per question, also score these option texts by likelihood after the upstream
            agents (on a copy of the trace) and store them in `RunResult.option_logprobs`;
        privates: per question, role name -> that role's own input (`{private}` in its template)."""
        if not questions:
            return []
        seeds = list(seeds) if seeds is not None else [self.config.decode.seed] * len(questions)
        privates = list(privates) if privates is not None else [{}] * len(questions)
        if (
            len(seeds) != len(questions)
            or (options is not None and len(options) != len(questions))
            or len(privates) != len(questions)
        ):
            raise MethodError(
                f"got {len(seeds)} seeds, {len(options or [])} option sets and "
                f"{len(privates)} private inputs for {len(questions)} questions"
            )
        # The method's cost leaves out option scoring (its copies of the trace included), which
        # is measured on its own: cost figures compare methods, not how they were scored.
        cost, option_cost = PhaseMeter(self.backbone.device), PhaseMeter(self.backbone.device)
        scored = None
        with torch.no_grad():
            with cost.measure():
                asks = asks_of(questions, privates)
                # Everything before sampling is computed once per distinct question where it cannot
                # depend on the seed (k samples of a question), then handed to every row that asks.
                rows = self._distinct_rows(asks)
                owners = sorted(set(rows)) if rows else list(range(len(asks)))
                picks = [owners.index(r) for r in rows] if rows else None
                up = self.build_upstream([asks[i] for i in owners], [seeds[i] for i in owners])
            if options is not None:
                with option_cost.measure():
                    scored = self._score_options(up, [options[i] for i in owners])
            with cost.measure():
                final_records, out, up = self._final_agent(up, [asks[i] for i in owners], format, seeds, picks)
        if picks is not None and scored is not None:
            scored = [scored[p] for p in picks]
        results = self._results([*up.agents, final_records], out, up.traces, cost.wall_s, cost.peak_bytes, scored)
        if options is not None:
            for r in results:
                r.option_wall_s, r.option_peak_memory_bytes = option_cost.wall_s, option_cost.peak_bytes
        return results

    def _distinct_rows(self, asks: list["Ask"]) -> list[int] | None:
        """For each question, the row of its first occurrence — when the upstream may be shared.

        k samples of one question then share its upstream trace and its option scores; only the
        final agent's decoding differs, and results equal building everything per row.
        None: no question repeats, or the upstream depends on the sampling seed.
        """
        first: dict[tuple, int] = {}
        rows = [first.setdefault(ask.key(), i) for i, ask in enumerate(asks)]
        if len(first) == len(asks) or not self.upstream_is_deterministic():
            return None
        return rows

    def upstream_is_deterministic(self) -> bool:
        """Whether the upstream agents' output ignores the sampling seed (no upstream decoding)."""
        return True

    def build_upstream(self, asks: list["Ask"], seeds: list[int] | None = None) -> Upstream:
        """Run the upstream agents (autograd as the caller set it: training reuses this).

        The base method has none: the final agent works alone on a fresh trace."""
        trace = self.new_trace(len(asks))
        return Upstream(agents=[], trace=trace, contexts=[""] * len(asks), traces=[trace])

    # -- shared pieces
    def new_trace(self, batch_size: int) -> LatentTrace:
        """A fresh trace that applies this method's `reads` to every agent writing on it; on the
        compiled fast path when it is on and autograd is off (training builds its traces eagerly)."""
        step = None if torch.is_grad_enabled() else self.step
        return LatentTrace(
            self.backbone, batch_size, reads=self.config.reads, record_inputs=self.record_inputs, step=step
        )

    def prompts(self, role: Role, asks: Sequence["Ask"], format: str, contexts=None) -> list[str]:
        """The role's chat prompt for each question (with earlier agents' text, if any)."""
        contexts = contexts or [""] * len(asks)
        return [
            render_prompt(
                self.backbone.tokenizer,
                role,
                a.question,
                c,
                format,
                self.config.chat_kwargs,
                a.private.get(role.name, ""),
            )
            for a, c in zip(asks, contexts)
        ]

    def adapter_for(self, role: Role):
        """Context in which `role` runs: its adapter, or the bare backbone if it has none."""
        return self.backbone.use_adapter(self.adapters.get(role.name))

    def _decode_agent(
        self, trace: LatentTrace, role: Role, prompts: list[str], config: DecodeConfig, seeds: Sequence[int]
    ) -> tuple[list[AgentRecord], Decoded]:
        """An agent that decodes: its prompt on top of `trace`, then decoding."""
        clock = Stopwatch(self.backbone.device).start()
        with self.adapter_for(role):
            hidden = prefill(trace, role.name, prompts)
            out = decode(trace, role.name, hidden, config, seeds)
        return _records(trace, role.name, clock.elapsed(), out), out

    def _final_agent(
        self, up: Upstream, asks, format, seeds, picks: list[int] | None = None
    ) -> tuple[list[AgentRecord], Decoded, Upstream]:
        """The final agent's prompt on the trace, then decoding with one seed per row.

        picks: rows of `up` each output row continues from (None: one to one); the prompt is
        prefilled once per distinct row before the rows are copied for sampling.
        Returns the records, the decoded answers and the (row-expanded) upstream.
        """
        final = self.topology.final
        prompts = self.prompts(final, asks, format, up.contexts)
        clock = Stopwatch(self.backbone.device).start()
        with self.adapter_for(final):
            hidden = prefill(up.trace, final.name, prompts)
            if picks is not None:
                up, hidden = up.select(picks), hidden[picks]
            out = decode(up.trace, final.name, hidden, self.config.decode, seeds)
        return _records(up.trace, final.name, clock.elapsed(), out), out, up

    def _score_options(self, up: Upstream, queries: Sequence[OptionQuery]) -> list[list[float]]:
        """Sum log-prob of each option under the final agent, read through a copy of the trace."""
        final = self.topology.final
        contexts = [OPTION_CONTEXT.format(context=c, question=q.question) for c, q in zip(up.contexts, queries)]
        with self.adapter_for(final):
            return continuation_logprobs(up.trace, final.name, contexts, [list(q.options) for q in queries])

    def _results(
        self,
        agents,
        final: Decoded,
        traces: list[LatentTrace],
        wall: float,
        peak: int,
        scored: list[list[float]] | None,
    ) -> list[RunResult]:
        rows = len(final.texts)
        lengths = [max(t.n_real()[b] for t in traces) for b in range(rows)]
        held = [t.real_bytes() for t in traces]
        return [
            RunResult(
                method=self.name,
                text=final.texts[b],
                agents=[agent_rows[b] for agent_rows in agents],
                trace_len=lengths[b],
                trace_bytes=max(h[b] for h in held),
                wall_s=wall,
                peak_memory_bytes=peak,
                batch_size=rows,
                truncated=final.truncated[b],
                token_logprobs=final.logprobs[b],
                token_ids=final.token_ids[b],
                token_entropies=final.entropies[b],
                option_logprobs=scored[b] if scored is not None else None,
            )
            for b in range(rows)
        ]


def _records(trace: LatentTrace, agent: str, wall: float, out: Decoded | None = None) -> list[AgentRecord]:
    """Per-row accounting of one agent, read off the trace segments it wrote."""
    prompt = trace.agent_tokens(agent, "prompt")
    latent = trace.agent_tokens(agent, "latent")
    return [
        AgentRecord(
            role=agent,
            n_prompt_tokens=prompt[b],
            n_latent_steps=latent[b],
            n_generated_tokens=len(out.token_ids[b]) if out else 0,
            wall_s=wall,
            text=out.texts[b] if out else None,
        )
        for b in range(trace.batch_size)
    ]


# ----------------------------------------------------------------------------- methods


@register_method("single")
class Single(Method):
    """The final agent alone, with the same prompt and decoding as in the multi-agent methods."""


@register_method("text_mas")
class TextMAS(Method):
    """Every agent decodes text; the next agents read it in their prompts.

    Sequential: each agent reads all earlier messages. Hierarchical: specialists read none, the
    final agent reads all.
    """

    def upstream_is_deterministic(self) -> bool:
        return self.config.upstream_decode().greedy  # upstream agents decode text

    def build_upstream(self, asks, seeds=None):
        seeds = seeds if seeds is not None else [self.config.decode.seed] * len(asks)
        upstream_cfg = self.config.upstream_decode()
        messages: list[list[tuple[str, str]]] = [[] for _ in asks]
        agents, traces = [], []
        for i, role in enumerate(self.topology.upstream):
            contexts = [self._readable(msgs, i) for msgs in messages]
            trace = self.new_trace(len(asks))
            # Distinct sampling streams per agent, still determined by the question's seed.
            agent_seeds = [s * 1009 + i + 1 for s in seeds]
            records, out = self._decode_agent(
                trace, role, self.prompts(role, asks, "", contexts), upstream_cfg, agent_seeds
            )
            trace.release()  # only its text is read on; keeping its keys and values would hold every agent's
            agents.append(records)
            traces.append(trace)
            for msgs, text in zip(messages, out.texts):
                msgs.append((role.name, text))
        final_trace = self.new_trace(len(asks))
        final = len(self.topology.roles) - 1
        return Upstream(
            agents=agents,
            trace=final_trace,
            contexts=[self._readable(m, final) for m in messages],
            traces=[*traces, final_trace],
        )

    def _readable(self, messages: list[tuple[str, str]], index: int) -> str:
        """The earlier messages agent `index` reads: none under reads=none, else those its
        topology lets it see (the message *is* the text channel, so reads=latent keeps it)."""
        if self.config.reads == "none":
            return ""
        hidden = set(self.topology.hidden_from(index))
        return text_context([m for m in messages if m[0] not in hidden])


@register_method("latent_mas")
class LatentMAS(Method):
    """Upstream agents write prompts + m latent steps to one shared trace; only the final agent
    decodes, attending to the whole trace. With m=0 the upstream prompts stay in the trace."""

    def build_upstream(self, asks, seeds=None):
        trace = self.new_trace(len(asks))
        budget = self.config.trace_budget
        draws = row_seeds(budget, [ask.key() for ask in asks])  # random eviction: per row, batch-independent
        agents = []
        for i, role in enumerate(self.topology.upstream):
            clock = Stopwatch(self.backbone.device).start()
            hidden_agents = self.topology.hidden_from(i)
            with self.adapter_for(role):
                with probe_for(budget, self.backbone) as probe:
                    hidden = prefill(trace, role.name, self.prompts(role, asks, ""), hidden_agents)
                    latent_steps(trace, role.name, hidden, self.config.latent_steps, hidden_agents)
                records = _records(trace, role.name, 0.0)  # tokens it processed, before any are evicted
                apply_budget(trace, role.name, budget, probe, draws, hidden_agents)
            for record in records:
                record.wall_s = clock.elapsed()  # fitting the budget is part of the agent's time
            agents.append(records)
        return Upstream(agents=agents, trace=trace, contexts=[""] * len(asks), traces=[trace])


@register_method("diffmas")
class DiffMAS(LatentMAS):
    """latent_mas under trained LoRA adapters (shared or one per role)."""

    def __init__(self, backbone, topology=None, config=None, adapters=None):
        super().__init__(backbone, topology, config, adapters)
        if not hasattr(backbone.model, "peft_config"):
            raise MethodError(
                "method 'diffmas' needs a trained adapter: pass --adapter PATH "
                "(train one with `diffmas train`); use latent_mas for the untrained channel"
            )
