"""Communication tasks: a fact only one agent holds, a question only another agent answers.

Each example gives the first agent a private fact ("Alice's secret word is tiger.", through its
`{private}` template field) and asks the last agent a question about it ("What is Alice's secret
word?"). Under `reads=latent` the last agent cannot read the sender's prompt, so every correct
answer above chance is information that crossed the latent channel. The tasks are generated
deterministically (no data files): each split has its own seed, and the *names* are partitioned
by a stable hash, so every test example is about a person never seen in training. Partitioning
names rather than (name, secret) pairs matters: with held-out pairs, each test name co-occurs with
only a few secrets, the question then predicts the secret, and a reader that merely repeats the
name would look informative to the mutual-information estimate.

    relay_word?k=K          one secret among the first K words of `relay_words.txt` (2..1024, default
                            8): capacity log2 K bits; chance 1/K
    relay_code?digits=N     an N-digit code (1..12, default 4), exact match: capacity beyond a word
    relay_chain?k=K&hops=H  the secret must cross H hops, sender -> relay ... -> reader, each agent
                            reading only its predecessor (topology `chain`; 1..8, default 2)
    relay_sum?agents=N      N holders (2..6, default 3) each hold a digit 0-9; an aggregator that reads
                            all of them (hierarchical) answers their sum
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

from diffmas.roles import Role, Topology
from diffmas.scoring.exact import ExactKind, score_exact
from diffmas.tasks.base import AnswerType, Example, Score
from diffmas.tasks.data import PACKAGE_DATA_DIR, TaskError
from diffmas.tasks.registry import Task, check_limit, register_task, select_examples

SPLIT_SEEDS = {"train": 1, "test": 2}  # one generator seed per split
SPLIT_SIZES = {"train": 4096, "test": 512}  # examples per split (draw fewer with `limit`)
TEST_EVERY = 5  # one name (relay_sum: one digit tuple) in 5 is held out for test, by a stable hash
NAMES = (
    "Alice",
    "Bob",
    "Carol",
    "David",
    "Emma",
    "Frank",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Karen",
    "Leo",
    "Maria",
    "Nina",
    "Oscar",
    "Paul",
    "Quinn",
    "Rosa",
    "Sam",
    "Tina",
    "Uma",
    "Victor",
    "Wendy",
    "Xavier",
    "Yara",
    "Zoe",
    "Adam",
    "Bella",
    "Chris",
    "Diana",
    "Ethan",
    "Fiona",
    "George",
    "Hannah",
    "Ivan",
    "Julia",
    "Kevin",
    "Laura",
    "Mark",
    "Nora",
    "Omar",
    "Peter",
    "Rachel",
    "Simon",
    "Tara",
    "Umar",
    "Vera",
    "Will",
    "Amy",
    "Ben",
    "Clara",
    "Dan",
    "Eva",
    "Felix",
    "Gina",
    "Hugo",
    "Ida",
    "Jonas",
    "Kim",
    "Luke",
    "Mia",
    "Noah",
    "Olga",
    "Ray",
)

# Short prompts on purpose: training cost on a CPU is proportional to the tokens in the trace, and
# the task needs no more than the fact and the question (an empty system message also keeps
# chat templates from inserting their default one).
SYSTEM = ""
SENDER = Role("sender", SYSTEM, "{private} Your team is asked: {question}")
# {context} is empty on the latent channel (the prompts are then exactly the fact and the question)
# and holds the earlier agents' messages on the text channel.
READER = Role("reader", SYSTEM, "{context}{question} {format}")
AGGREGATOR = Role("aggregator", SYSTEM, "{context}{question} {format}")


def _relay(index: int) -> Role:
    return Role(f"relay_{index}", SYSTEM, "{context}Pass on what you were told. Your team is asked: {question}")


def _holder(index: int) -> Role:
    return Role(f"holder_{index}", SYSTEM, "{private} Your team is asked: {question}")


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The 1024 secret words, most frequent first (see diffmas/data/README.md)."""
    words = Path(PACKAGE_DATA_DIR, "relay_words.txt").read_text().split()
    return tuple(words)


def held_out(key: str) -> bool:
    """Whether a split key (a name) belongs to the test split: a stable hash, not the draw order."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") % TEST_EVERY == 0


class RelayTask(Task):
    """A generated communication task; subclasses define the secret, the question and the roles."""

    answer_type: AnswerType = "exact"
    exact_kind: ExactKind
    sources: ClassVar[dict] = {}  # generated, no files
    params: ClassVar[dict[str, tuple[int, int, int]]] = {}  # name -> (default, min, max)

    def __init__(self, **values: int):
        unknown = sorted(set(values) - set(self.params))
        if unknown:
            raise TaskError(
                f"{self.name}: unknown parameter {unknown[0]!r}; parameters: {', '.join(self.params) or 'none'}"
            )
        self.values = {k: int(values.get(k, default)) for k, (default, _, _) in self.params.items()}
        for key, (_, low, high) in self.params.items():
            if not low <= self.values[key] <= high:
                raise TaskError(f"{self.name}: {key}={self.values[key]} is out of range; choose {low}..{high}")

    def configured(self, query: dict[str, str]) -> "RelayTask":
        values = {}
        for key, text in query.items():
            try:
                values[key] = int(text)
            except ValueError:
                raise TaskError(f"{self.name}: {key}={text!r} is not an integer") from None
        return type(self)(**values)

    @property
    def spec(self) -> str:
        """The name that rebuilds this task with `get_task`, e.g. relay_word?k=32."""
        changed = {k: v for k, v in self.values.items() if v != self.params[k][0]}
        return self.name + ("?" + "&".join(f"{k}={v}" for k, v in changed.items()) if changed else "")

    # ------------------------------------------------------------------ data

    def load(
        self, split: str = "test", data_dir: str | Path | None = None, limit: int | None = None, seed: int | None = None
    ) -> list[Example]:
        """`SPLIT_SIZES[split]` generated examples; `limit` and `seed` select as for file tasks."""
        check_limit(limit)
        if split not in SPLIT_SEEDS:
            raise TaskError(f"{self.name}: unknown split {split!r}; valid splits: {', '.join(SPLIT_SEEDS)}")
        rng = random.Random(f"{self.spec}:{SPLIT_SEEDS[split]}")
        examples = []
        while len(examples) < SPLIT_SIZES[split]:
            example = self.draw(rng, f"{split}-{len(examples)}")
            if held_out(example.meta["split_key"]) == (split == "test"):
                examples.append(example)
        return select_examples(examples, limit, seed)

    def draw(self, rng: random.Random, example_id: str) -> Example:
        """One random example; `meta["split_key"]` is the key that decides its split."""
        raise NotImplementedError

    # ------------------------------------------------------------------ asking and scoring

    def prompt(self, example: Example) -> str:
        return example.question

    def score(self, example: Example, text: str) -> Score:
        return score_exact(text, example.answer or "", self.exact_kind)

    def target_text(self, example: Example) -> str:
        return example.answer or ""

    def topology(self, n_agents: int | None = None) -> Topology:
        topology = self.roles()
        if n_agents is not None and n_agents != len(topology.roles):
            raise TaskError(
                f"{self.spec} has {len(topology.roles)} agents, not {n_agents}; "
                "set the size through the task's parameters (see `diffmas.tasks.relay`)"
            )
        return topology

    def roles(self) -> Topology:
        return Topology("sequential", (SENDER, READER))

    def chance(self) -> float:
        """Accuracy of a reader that guesses without any message."""
        raise NotImplementedError


def _secret_example(example_id: str, name: str, kind: str, secret: str, **meta: Any) -> Example:
    return Example(
        id=example_id,
        question=f"What is {name}'s secret {kind}?",
        answer=secret,
        target=secret,
        private={"sender": f"{name}'s secret {kind} is {secret}."},
        meta={"secret": secret, "split_key": name, **meta},
    )


@register_task
class RelayWord(RelayTask):
    name = "relay_word"
    exact_kind: ExactKind = "word"
    format_instruction = "Answer with the word only."
    params = {"k": (8, 2, 1024)}

    def draw(self, rng, example_id):
        return _secret_example(example_id, rng.choice(NAMES), "word", rng.choice(vocabulary()[: self.values["k"]]))

    def chance(self) -> float:
        return 1 / self.values["k"]


@register_task
class RelayCode(RelayTask):
    name = "relay_code"
    exact_kind: ExactKind = "digits"
    format_instruction = "Answer with the digits only."
    params = {"digits": (4, 1, 12)}

    def draw(self, rng, example_id):
        code = "".join(rng.choice("0123456789") for _ in range(self.values["digits"]))
        return _secret_example(example_id, rng.choice(NAMES), "code", code)

    def chance(self) -> float:
        return 10.0 ** -self.values["digits"]


@register_task
class RelayChain(RelayWord):
    name = "relay_chain"
    params = {"k": (8, 2, 1024), "hops": (2, 1, 8)}

    def roles(self) -> Topology:
        relays = tuple(_relay(i) for i in range(1, self.values["hops"]))
        return Topology("chain", (SENDER, *relays, READER))


@register_task
class RelaySum(RelayTask):
    name = "relay_sum"
    exact_kind: ExactKind = "integer"
    format_instruction = "Answer with the number only."
    params = {"agents": (3, 2, 6)}

    def draw(self, rng, example_id):
        digits = [rng.randrange(10) for _ in range(self.values["agents"])]
        private = {f"holder_{i}": f"Your number is {d}." for i, d in enumerate(digits, 1)}
        total = str(sum(digits))
        return Example(
            id=example_id,
            question="What is the sum of the team's numbers?",
            answer=total,
            target=total,
            private=private,
            meta={"secret": total, "digits": digits, "split_key": ",".join(map(str, digits))},
        )

    def roles(self) -> Topology:
        holders = tuple(_holder(i) for i in range(1, self.values["agents"] + 1))
        return Topology("hierarchical", (*holders, AGGREGATOR))

    def chance(self) -> float:
        """The most likely sum's probability: what always guessing it scores."""
        counts = {0: 1}
        for _ in range(self.values["agents"]):
            nxt: dict[int, int] = {}
            for total, n in counts.items():
                for d in range(10):
                    nxt[total + d] = nxt.get(total + d, 0) + n
            counts = nxt
        return max(counts.values()) / 10 ** self.values["agents"]
