"""The communication tasks: generation, splits, parameters, roles, exact scoring, information."""

from __future__ import annotations

import math

import pytest

from diffmas.evaluate.information import mutual_information_bits
from diffmas.scoring import extract_exact, score_exact
from diffmas.tasks import TaskError, get_task
from diffmas.tasks.relay import SPLIT_SIZES, vocabulary


def test_vocabulary_is_shipped_and_distinct():
    words = vocabulary()
    assert len(words) == 1024 == len(set(words)) and all(w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize(
    "spec", ["relay_word", "relay_word?k=2", "relay_code?digits=6", "relay_chain?hops=3", "relay_sum?agents=4"]
)
def test_generation_is_deterministic_and_splits_are_disjoint(spec):
    task = get_task(spec)
    test = task.load("test")
    assert [e.id for e in test] == [e.id for e in get_task(spec).load("test")]
    assert [e.private for e in test[:20]] == [e.private for e in get_task(spec).load("test")[:20]]
    assert len(test) == SPLIT_SIZES["test"] and len(task.load("train")) == SPLIT_SIZES["train"]
    train_keys = {e.meta["split_key"] for e in task.load("train")}
    assert train_keys.isdisjoint(e.meta["split_key"] for e in test)  # test names never seen in training
    # a larger limit contains the smaller one (growing runs keep their records)
    assert [e.id for e in task.load("test", limit=5)] == [e.id for e in task.load("test", limit=9)[:5]]
    for ex in test[:5]:
        assert task.score(ex, task.target_text(ex)).correct
        roles = {r.name for r in task.topology().roles}
        assert set(ex.private) <= roles
        assert any("{private}" in r.user for r in task.topology().roles if r.name in ex.private)


def test_secrets_come_from_the_first_k_words():
    secrets = {e.answer for e in get_task("relay_word?k=4").load("train")}
    assert secrets == set(vocabulary()[:4])
    assert get_task("relay_word?k=4").chance() == 0.25


def test_topologies_of_the_tasks():
    chain = get_task("relay_chain?hops=3").topology()
    assert chain.kind == "chain" and [r.name for r in chain.roles] == ["sender", "relay_1", "relay_2", "reader"]
    assert chain.hidden_from(3) == ("sender", "relay_1")
    total = get_task("relay_sum").topology()
    assert total.kind == "hierarchical" and total.final.name == "aggregator" and len(total.upstream) == 3
    assert math.isclose(get_task("relay_sum?agents=2").chance(), 0.1)  # sum 9: 10 of 100 pairs
    with pytest.raises(TaskError, match="has 2 agents, not 4"):
        get_task("relay_word").topology(4)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("relay_word?k=1", "k=1 is out of range; choose 2..1024"),
        ("relay_word?k=x", "k='x' is not an integer"),
        ("relay_word?size=3", "unknown parameter 'size'"),
        ("relay_word?k", "expected key=value"),
        ("gsm8k?k=2", "takes no parameters"),
    ],
)
def test_bad_parameters_get_one_clear_error(spec, message):
    with pytest.raises(TaskError, match=message.replace("?", r"\?").replace("(", r"\(")):
        get_task(spec)


def test_exact_extraction_is_strict():
    assert extract_exact("  Tiger. It is a tiger", "word") == "tiger"
    assert extract_exact("The word is tiger", "word") == "the"  # the first word only
    assert extract_exact("code: 0042 and 7", "digits") == "0042"
    assert extract_exact("-07 apples", "integer") == "-7"
    assert extract_exact("none here", "digits") is None
    assert score_exact("no digits", "12", "integer").reason == "no answer"
    assert not score_exact("lion", "tiger", "word").correct


def test_mutual_information_bits():
    secrets = ["a", "b", "c", "d"] * 50
    assert mutual_information_bits(secrets, secrets, correct_bias=False) == pytest.approx(2.0)
    assert mutual_information_bits(secrets, ["x"] * 200) == 0.0
    # independent answers: the bias-corrected estimate is near zero, the plug-in one is not
    import random

    rng = random.Random(0)
    noise = [rng.choice("abcd") for _ in secrets]
    assert mutual_information_bits(secrets, noise) < 0.03 < mutual_information_bits(secrets, noise, correct_bias=False)


def test_above_chance_p():
    from diffmas.evaluate.information import above_chance_p

    assert above_chance_p(0, 10, 0.5) == 1.0
    assert above_chance_p(10, 10, 0.5) == pytest.approx(2**-10)
    assert above_chance_p(3, 8, 0.125) == pytest.approx(
        1 - sum(math.comb(8, k) * 0.125**k * 0.875 ** (8 - k) for k in range(3))
    )


def test_the_question_says_nothing_about_the_secret():
    """Held-out *names*, not pairs: within the test split the question is independent of the
    secret, so a reader that repeats the name carries no information."""
    from diffmas.evaluate.information import permutation_p

    for spec in ("relay_word", "relay_chain?hops=2", "relay_word?k=32"):
        test = get_task(spec).load("test")
        questions, secrets = [e.question for e in test], [e.answer for e in test]
        # no more dependence than shuffling shows (the estimate's small-sample bias included)
        assert permutation_p(secrets, questions, n_perm=100) > 0.05, spec
    assert mutual_information_bits(secrets, questions) < 0.3
    assert permutation_p(secrets, secrets, n_perm=100) < 0.02


def test_the_text_channel_reaches_the_reader_and_the_latent_prompts_stay_bare(tied_backbone):
    from diffmas.methods import MethodConfig, asks_of, get_method

    task = get_task("relay_chain?hops=2")
    example = task.load("test", limit=1)[0]
    topology = task.topology()
    method = get_method("text_mas", tied_backbone, topology, MethodConfig())
    asks = asks_of([example.question], [example.private])
    for role in topology.roles[1:]:  # every agent after the sender reads its predecessor's message
        prompt = method.prompts(role, asks, task.format_instruction, ["\nMessages from earlier agents:\n[x]\nhi\n"])[0]
        assert "Messages from earlier agents" in prompt, role.name
    reader = method.prompts(topology.final, asks, task.format_instruction)[0]
    assert f"user\n{example.question} {task.format_instruction}<|im_end|>" in reader  # latent channel: bare


def test_read_channel_from_records():
    from diffmas.evaluate.information import read_channel

    perfect = [{"gold": w, "extracted": w, "correct": True} for w in "abcd" * 8]
    reading = read_channel(perfect, chance=0.25, n_perm=50)
    assert reading.n_correct == 32 and reading.p_chance == pytest.approx(0.25**32)
    assert reading.bits == pytest.approx(2.0) and reading.bits_p < 0.05 and reading.top_share == 0.25
    codes = [{"gold": f"{i:04d}", "extracted": None, "correct": None} for i in range(32)]  # skipped
    blind = read_channel(codes, chance=1e-4)
    assert blind.n_correct == 0 and blind.bits is None and blind.bits_p is None  # too few repeats to estimate
