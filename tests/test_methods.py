"""Methods: parity with plain generation, batching, sampling, accounting, adapters."""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import text_context
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, MethodError, get_method, list_methods
from diffmas.roles import Role, Topology, default_topology, render_prompt

QUESTIONS = ["What is 2+2?", "Name a colour that is a long colour name please", "Why?"]


def config(m=2, new=6, upstream=4, **decode):
    return MethodConfig(
        latent_steps=m, decode=DecodeConfig(max_new_tokens=new, **decode), upstream_max_new_tokens=upstream
    )


@torch.no_grad()
def test_single_agent_equals_plain_greedy_generate(backbone):
    method = get_method("single", backbone, config=config(new=10))
    result = method.run_batch([QUESTIONS[0]], format="Answer briefly.")[0]
    prompt = render_prompt(backbone.tokenizer, method.topology.final, QUESTIONS[0], "", "Answer briefly.")
    ids = backbone.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(backbone.device)
    ref = backbone.model.generate(
        ids, max_new_tokens=10, do_sample=False, eos_token_id=backbone.eos_token_ids, pad_token_id=0
    )
    ref_ids = ref[0, ids.shape[1] :].tolist()
    assert result.agents[0].n_generated_tokens == len(ref_ids)
    assert result.text == backbone.tokenizer.decode(ref_ids, skip_special_tokens=True)


@torch.no_grad()
def test_latent_mas_without_upstream_equals_single(backbone):
    only_final = default_topology().with_final_only()
    single = get_method("single", backbone, config=config()).run_batch(QUESTIONS, "f")
    latent = get_method("latent_mas", backbone, only_final, config()).run_batch(QUESTIONS, "f")
    assert [r.text for r in single] == [r.text for r in latent]
    for s, lat in zip(single, latent):
        assert s.token_logprobs == pytest.approx(lat.token_logprobs, abs=1e-5)
    assert len({r.text for r in single}) > 1  # the fixture model does not answer a constant


@torch.no_grad()
@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas"])
@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_batched_results_equal_one_by_one(tied_backbone, untied_backbone, name, sampling):
    for bb in (tied_backbone, untied_backbone):
        cfg = config(temperature=0.8, top_p=0.9) if sampling else config()
        method = get_method(name, bb, config=cfg)
        seeds = [11, 22, 33]
        batched = method.run_batch(QUESTIONS, "fmt", seeds)
        alone = [method.run_batch([q], "fmt", [s])[0] for q, s in zip(QUESTIONS, seeds)]
        for b, a in zip(batched, alone):
            assert b.text == a.text
            assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)
            assert [(x.n_prompt_tokens, x.n_latent_steps, x.n_generated_tokens) for x in b.agents] == [
                (x.n_prompt_tokens, x.n_latent_steps, x.n_generated_tokens) for x in a.agents
            ]
            assert b.trace_len == a.trace_len and b.trace_bytes == a.trace_bytes


@torch.no_grad()
def test_sampling_depends_on_seed(untied_backbone):
    method = get_method("single", untied_backbone, config=config(new=12, temperature=1.0))
    texts = {method.run_batch([QUESTIONS[0]], "", [s])[0].text for s in range(5)}
    assert len(texts) > 1
    again = method.run_batch([QUESTIONS[0]], "", [3])[0].text
    assert again == method.run_batch([QUESTIONS[0]], "", [3])[0].text


@torch.no_grad()
def test_latent_mas_token_accounting(backbone):
    topo = default_topology()
    result = get_method("latent_mas", backbone, topo, config(m=3, new=5)).run_batch([QUESTIONS[1]], "F")[0]
    tok = backbone.tokenizer
    for role, rec in zip(topo.roles, result.agents):
        is_final = role is topo.final
        prompt = render_prompt(tok, role, QUESTIONS[1], "", "F" if is_final else "")
        assert rec.role == role.name
        assert rec.n_prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert rec.n_latent_steps == (0 if is_final else 3)
    final = result.agents[-1]
    assert 1 <= final.n_generated_tokens <= 5 and final.n_generated_tokens == len(result.token_logprobs)
    # the trace holds every prompt, every latent step and all but the last generated token
    n_prompt = sum(a.n_prompt_tokens for a in result.agents)
    assert result.trace_len == n_prompt + 3 * 3 + final.n_generated_tokens - 1
    assert result.trace_bytes == result.trace_len * backbone.n_layers * 2 * backbone.n_kv_heads * backbone.head_dim * 4


@torch.no_grad()
def test_latent_mas_with_zero_steps_still_reads_upstream_prompts(untied_backbone):
    """The reference implementation drops the trace at m=0; here the prompts stay in it."""
    cfg = config(m=0, new=6)
    latent = get_method("latent_mas", untied_backbone, config=cfg).run_batch(QUESTIONS[:1], "")[0]
    single = get_method("single", untied_backbone, config=cfg).run_batch(QUESTIONS[:1], "")[0]
    assert latent.trace_len > single.trace_len
    assert latent.token_logprobs != pytest.approx(single.token_logprobs, abs=1e-4)


@torch.no_grad()
def test_text_mas_hands_text_to_the_next_agent(backbone):
    result = get_method("text_mas", backbone, config=config(new=4, upstream=3)).run_batch([QUESTIONS[0]], "F")[0]
    assert [a.role for a in result.agents] == ["planner", "critic", "refiner", "solver"]
    assert all(a.n_latent_steps == 0 and a.n_generated_tokens >= 1 for a in result.agents)
    tok = backbone.tokenizer
    topo = default_topology()
    messages = [(a.role, a.text) for a in result.agents[:2]]
    critic_prompt = render_prompt(tok, topo.roles[2], QUESTIONS[0], text_context(messages), "")
    assert result.agents[2].n_prompt_tokens == len(tok(critic_prompt, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def test_hierarchical_text_mas_specialists_do_not_read_each_other(backbone):
    topo = default_topology("hierarchical")
    result = get_method("text_mas", backbone, topo, config(new=3, upstream=3)).run_batch([QUESTIONS[2]], "")[0]
    specialists = result.agents[:-1]
    tok = backbone.tokenizer
    for role, rec in zip(topo.upstream, specialists):
        prompt = render_prompt(tok, role, QUESTIONS[2], "", "")
        assert rec.n_prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert result.agents[-1].n_prompt_tokens > len(
        tok(render_prompt(tok, topo.final, QUESTIONS[2]), add_special_tokens=False)["input_ids"]
    )


@torch.no_grad()
def test_n_agents_is_free(backbone):
    for n in (1, 2, 6):
        topo = default_topology("sequential", n_agents=n)
        result = get_method("latent_mas", backbone, topo, config(m=1, new=2)).run_batch(QUESTIONS[:1], "")[0]
        assert len(result.agents) == n


def test_unknown_method_suggests():
    with pytest.raises(MethodError, match="did you mean 'latent_mas'"):
        get_method("latent_ma", backbone=None)
    assert {"single", "text_mas", "latent_mas", "diffmas"} <= set(list_methods())


@torch.no_grad()
def test_per_role_adapters_are_active_while_each_agent_writes(tied_backbone):
    """The seam the trainer needs: agent k's trace entries are computed under adapter k."""
    from peft import LoraConfig, get_peft_model

    bb = tied_backbone
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(bb.model, lora, adapter_name="planner")
    for name in ("critic", "refiner", "solver"):
        peft_model.add_adapter(name, lora)
    bb.model = peft_model
    seen = []
    layer = bb.decoder().layers[0].self_attn.q_proj
    hook = layer.register_forward_pre_hook(lambda mod, args: seen.append(mod.active_adapters[0]))
    try:
        topo = default_topology()
        adapters = {r.name: r.name for r in topo.roles}
        get_method("latent_mas", bb, topo, config(m=2, new=3), adapters).run_batch(QUESTIONS[:1], "")
    finally:
        hook.remove()
    # planner: prompt + 2 latent steps, ..., solver: prompt + up to 2 decode forwards
    assert seen[:9] == ["planner"] * 3 + ["critic"] * 3 + ["refiner"] * 3
    assert set(seen[9:]) == {"solver"}
    with pytest.raises(Exception, match="unknown adapter 'nope'"):
        with bb.use_adapter("nope"):
            pass


def test_roles_validate_templates():
    from diffmas.roles import RoleError

    with pytest.raises(RoleError, match="unknown or broken field"):
        Role("x", "s", "Question: {question} {nonsense}")
    with pytest.raises(RoleError, match="must contain"):
        Role("x", "s", "no question here")
    with pytest.raises(RoleError, match="unique"):
        Topology("sequential", (Role("a", "", "{question}"), Role("a", "", "{question}")))


@torch.no_grad()
def test_option_likelihood_equals_manual_forward(backbone):
    """Single agent: log p(option | 'Question: q\\nAnswer:') equals a plain full forward."""
    from diffmas.methods import OptionQuery

    query = OptionQuery("Which is a fruit?", (" apple", " a red brick", " x"))
    result = get_method("single", backbone, config=config(new=2)).run_batch(["Q"], "", options=[query])[0]
    tok = backbone.tokenizer
    ctx = tok("Question: Which is a fruit?\nAnswer:", add_special_tokens=False)["input_ids"]
    for option, got in zip(query.options, result.option_logprobs):
        cont = tok(option, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont], device=backbone.device)
        logp = backbone.model(ids).logits[0].float().log_softmax(-1)
        expected = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert got == pytest.approx(expected, abs=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("name", ["single", "text_mas", "latent_mas"])
def test_option_likelihood_batched_and_leaves_answers_alone(untied_backbone, name):
    from diffmas.methods import OptionQuery

    queries = [
        OptionQuery("q one?", (" a", " bb", " ccc", " dd")),
        OptionQuery("second question", (" yes", " no")),
        OptionQuery("3", (" x y z", " w", " v")),
    ]
    method = get_method(name, untied_backbone, config=config(m=2, new=4, upstream=3))
    plain = method.run_batch(QUESTIONS, "f")
    scored = method.run_batch(QUESTIONS, "f", options=queries)
    alone = [method.run_batch([q], "f", options=[o])[0] for q, o in zip(QUESTIONS, queries)]
    for p, s, a, q in zip(plain, scored, alone, queries):
        assert p.text == s.text and p.trace_len == s.trace_len  # scoring works on a copy
        assert len(s.option_logprobs) == len(q.options)
        assert s.option_logprobs == pytest.approx(a.option_logprobs, abs=1e-3)
        assert all(v < 0 for v in s.option_logprobs)


@torch.no_grad()
def test_option_likelihood_reads_the_latent_trace(untied_backbone):
    from diffmas.methods import OptionQuery

    query = [OptionQuery("q one?", (" a", " bb"))]
    single = get_method("single", untied_backbone, config=config(new=1)).run_batch(["q"], "", options=query)[0]
    latent = get_method("latent_mas", untied_backbone, config=config(m=2, new=1)).run_batch(["q"], "", options=query)[0]
    assert single.option_logprobs != pytest.approx(latent.option_logprobs, abs=1e-3)


@torch.no_grad()
def test_min_new_tokens_suppresses_eos(backbone):
    method = get_method("single", backbone, config=config(new=9))
    method.config.decode.min_new_tokens = 9
    result = method.run_batch([QUESTIONS[0]], "")[0]
    assert result.agents[0].n_generated_tokens == 9


@torch.no_grad()
def test_ignore_eos_gives_fixed_lengths_for_every_agent(backbone):
    """Benchmark mode: every decoding agent (text_mas upstream too) writes exactly its budget."""
    # half the byte vocabulary ends a message, so without ignore_eos messages end early
    backbone.model.generation_config.eos_token_id = list(range(2, 131))
    method = get_method("text_mas", backbone, config=config(new=7, upstream=5))
    free = [[a.n_generated_tokens for a in r.agents] for r in method.run_batch(QUESTIONS, "")]
    method.config.decode.ignore_eos = True
    fixed = [[a.n_generated_tokens for a in r.agents] for r in method.run_batch(QUESTIONS, "")]
    assert fixed == [[5, 5, 5, 7]] * len(QUESTIONS)
    assert free != fixed


@torch.no_grad()
@pytest.mark.parametrize("name", ["latent_mas", "text_mas"])
def test_samples_of_one_question_share_the_upstream(untied_backbone, name):
    """k samples in one batch == each sample alone (the upstream is built once where allowed)."""
    from diffmas.methods import OptionQuery

    method = get_method(name, untied_backbone, config=config(m=2, new=6, upstream=3, temperature=0.9))
    qs = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0], QUESTIONS[0]]
    seeds = [1, 2, 3, 4]
    opts = [OptionQuery(q, (" yes", " no")) for q in qs]
    calls = []
    build = method.build_upstream
    method.build_upstream = lambda questions, s=None: calls.append(len(questions)) or build(questions, s)
    together = method.run_batch(qs, "f", seeds, opts)
    assert calls == ([2] if name == "latent_mas" else [4])  # text_mas samples its upstream per seed
    method.build_upstream = build
    for q, s, o, t in zip(qs, seeds, opts, together):
        alone = method.run_batch([q], "f", [s], [o])[0]
        assert t.text == alone.text and t.trace_len == alone.trace_len
        assert t.option_logprobs == pytest.approx(alone.option_logprobs, abs=1e-4)
        assert [a.n_prompt_tokens for a in t.agents] == [a.n_prompt_tokens for a in alone.agents]
    assert len({t.text for t in together[2:]} | {together[0].text}) > 1  # the samples do differ


@torch.no_grad()
def test_select_rows_of_a_trace(backbone):
    from diffmas.channel import prefill
    from diffmas.trace import LatentTrace

    trace = LatentTrace(backbone, 2)
    prefill(trace, "a", ["one", "a longer second prompt"])
    picked = trace.select([1, 1, 0])
    assert picked.n_real() == [trace.n_real()[1], trace.n_real()[1], trace.n_real()[0]]
    h_big = prefill(picked, "b", ["x", "x", "x"])
    h_small = prefill(trace, "b", ["x", "x"])
    assert torch.allclose(h_big[0], h_small[1], atol=1e-5) and torch.allclose(h_big[2], h_small[0], atol=1e-5)


@torch.no_grad()
def test_greedy_upstream_text_is_shared_by_samples(untied_backbone):
    """upstream_temperature=0: text_mas samples share the upstream text, differ in the answer."""
    cfg = config(m=2, new=6, upstream=3, temperature=0.9)
    cfg.upstream_temperature = 0.0
    method = get_method("text_mas", untied_backbone, config=cfg)
    calls = []
    build = method.build_upstream
    method.build_upstream = lambda questions, s=None: calls.append(len(questions)) or build(questions, s)
    results = method.run_batch([QUESTIONS[0]] * 4, "f", [1, 2, 3, 4])
    assert calls == [1]
    assert len({tuple(a.text for a in r.agents[:-1]) for r in results}) == 1  # same upstream messages
    assert len({r.text for r in results}) > 1


@torch.no_grad()
def test_chat_kwargs_reach_the_template(tied_backbone):
    """MethodConfig.chat_kwargs (e.g. Qwen3's enable_thinking) is passed to every agent's chat template."""
    tok = tied_backbone.tokenizer
    tok.chat_template += "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    plain = get_method("latent_mas", tied_backbone, config=config(m=1, new=2)).run_batch([QUESTIONS[0]], "")[0]
    cfg = config(m=1, new=2)
    cfg.chat_kwargs = {"enable_thinking": False}
    off = get_method("latent_mas", tied_backbone, config=cfg).run_batch([QUESTIONS[0]], "")[0]
    extra = len(tok("<think></think>", add_special_tokens=False)["input_ids"])
    assert [b.n_prompt_tokens - a.n_prompt_tokens for a, b in zip(plain.agents, off.agents)] == [extra] * 4
