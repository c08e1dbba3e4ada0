"""The compiled fast path (`MethodConfig.compile`, `diffmas.fast_path`, the static trace store)
against the eager path: the same greedy texts, per-step logits, KV entries and trace bytes for
single and latent_mas, batched (left padding, rows of different lengths) and unbatched, with
one-position steps that cross bucket boundaries; compiles bounded by the buckets; clear errors.

On a CPU the tests compile with torch.compile's "eager" backend (dynamo traces the step into one
graph and runs it without code generation: seconds, where inductor would take minutes on 2 cores).

Tolerances: the static store attends over the whole bucket with the unused columns masked, which
changes the order of SDPA's float32 reductions (~1e-6 relative per forward, as padding a batch
does). Per-step logits agree to LOGITS_TOL (measured <= 8e-6); KV entries (|x| up to ~5) and the
methods' token log-probs, after several agents' prompts and latent steps, to TOL (measured <= 4e-5),
the suite's tolerance for a padded batch against its rows alone (test_methods.py).
"""

from __future__ import annotations

import pytest
import torch

from diffmas.channel import latent_steps, prefill
from diffmas.errors import DiffmasError
from diffmas.fast_path import CompileError, StaticStep, static_step
from diffmas.generate import DecodeConfig, decode
from diffmas.methods import MethodConfig, MethodError, check_budget, get_method
from diffmas.trace import LatentTrace, bucket_capacity, n_buckets

from conftest import TEST_DEVICE

LOGITS_TOL = 1e-5  # see the module docstring
TOL = 1e-4
ROWS = ["What is 2+2?", "Name a colour that is a long colour name please", "Why?"]  # left padding


def test_buckets():
    assert [bucket_capacity(n) for n in (0, 1, 256, 257, 1000, 1024, 1025)] == [256, 256, 256, 512, 1024, 1024, 2048]
    assert n_buckets(2048) == 4 and n_buckets(40960) == 9


class Counting:
    """A torch.compile backend that counts compiles and runs the traced graph as it is."""

    def __init__(self):
        self.n = 0

    def __call__(self, gm, example_inputs):
        self.n += 1
        return gm.forward


class Uncompiled:
    """The same static-store forward, never compiled: isolates what compiling changes."""

    def __init__(self, step: StaticStep):
        self.eager = step.eager

    def __call__(self, *args):
        return self.eager(*args)


def padded(prompts: list[str], columns: int) -> list[str]:
    """The prompts with the longest made exactly `columns` tokens long (byte-level: one per
    character); the others stay shorter and are left-padded in the trace."""
    fill = "." * (columns - max(len(p) for p in prompts))
    return [fill + p for p in prompts]


def build(bb, rows, step, monkeypatch):
    """Agent a: a 254-column prompt and 4 latent steps (crossing the 256 bucket); agent c: a prompt
    to 500 columns and 16 decoded tokens (crossing 512). Few latent steps: on these random models
    each one, fed the last one's hidden state, amplifies a float32 rounding difference (after ~20
    steps to O(1)), as it would between any two correct kernels. Returns the trace, the decoded
    output, every decode step's logits and the bucket capacities around each agent's steps."""
    logits = []
    real = bb.logits
    monkeypatch.setattr(bb, "logits", lambda h: logits.append(real(h)) or logits[-1])
    trace = LatentTrace(bb, len(rows), step=step)
    capacity = []
    with torch.no_grad():
        h = prefill(trace, "a", padded([f"a reads {r}" for r in rows], 254))
        capacity.append(bucket_capacity(trace.length))
        latent_steps(trace, "a", h, 4)
        capacity.append(bucket_capacity(trace.length))
        h = prefill(trace, "c", padded(list(rows), 500 - trace.length))
        capacity.append(bucket_capacity(trace.length))
        out = decode(trace, "c", h, DecodeConfig(max_new_tokens=16, min_new_tokens=16), [0] * len(rows))
    capacity.append(bucket_capacity(trace.length))
    monkeypatch.undo()
    return trace, out, logits, capacity


def assert_same(ref, got, tol, logits_tol):
    (t0, out0, logits0, _), (t1, out1, logits1, _) = ref, got
    assert out1.token_ids == out0.token_ids
    assert len(logits1) == len(logits0) == 16
    for a, b in zip(logits0, logits1):
        torch.testing.assert_close(b, a, atol=logits_tol, rtol=0)
    # real columns only: what a padding column holds is never read (the mask hides it), and the
    # eager path computes the padded prompts of a CPU batch row by row, leaving zeros there
    real = t0.attention_mask[:, None, :, None].to(t0.kv()[0][0].dtype)
    for (k0, v0), (k1, v1) in zip(t0.kv(), t1.kv()):
        torch.testing.assert_close(k1 * real, k0 * real, atol=tol, rtol=0)
        torch.testing.assert_close(v1 * real, v0 * real, atol=tol, rtol=0)
    assert (t1.n_bytes(), t1.real_bytes(), t1.length) == (t0.n_bytes(), t0.real_bytes(), t0.length)
    assert torch.equal(t1.attention_mask, t0.attention_mask) and torch.equal(t1.positions, t0.positions)


@pytest.mark.parametrize("rows", [ROWS, ROWS[1:2]], ids=["batched", "unbatched"])
def test_steps_match_the_eager_path_across_buckets(backbone, rows, monkeypatch):
    counting = Counting()
    step = StaticStep(backbone.decoder(), counting)
    eager = build(backbone, rows, None, monkeypatch)
    fast = build(backbone, rows, step, monkeypatch)
    assert_same(eager, fast, TOL, LOGITS_TOL)
    before_latent, after_latent, before_decode, after_decode = fast[3]
    # both kinds of one-position step crossed a boundary, inside the compiled step's trace
    assert after_latent > before_latent and after_decode > before_decode
    assert fast[0].cache.layers[0].capacity() == after_decode
    assert fast[0].capacity_bytes() == fast[0].n_bytes() // fast[0].length * after_decode
    assert 1 <= counting.n <= len({before_latent, after_latent, before_decode, after_decode})


def test_compiled_step_equals_its_uncompiled_forward(untied_backbone, monkeypatch):
    step = StaticStep(untied_backbone.decoder(), "aot_eager")  # functionalises the in-place writes
    uncompiled = build(untied_backbone, ROWS, Uncompiled(step), monkeypatch)
    assert_same(uncompiled, build(untied_backbone, ROWS, step, monkeypatch), 1e-5, 1e-5)


@pytest.mark.skipif(TEST_DEVICE != "cuda", reason="CUDA graphs: DIFFMAS_TEST_DEVICE=cuda (bench/gpu.sh)")
def test_cuda_graphs_match_the_eager_path(untied_backbone, monkeypatch):
    """The "cudagraphs" backend: graphs recorded on the static buffers (no code generation), a new
    trace re-recording them; GPU kernels differ more between shapes, hence TOL for the logits."""
    step = static_step(untied_backbone, "cudagraphs")
    eager = build(untied_backbone, ROWS, None, monkeypatch)
    for _ in range(2):  # the second trace has new buffers: its graphs are recorded again
        assert_same(eager, build(untied_backbone, ROWS, step, monkeypatch), TOL, TOL)


def test_compiles_are_bounded_by_buckets_not_traces(tied_backbone):
    torch._dynamo.reset()  # compiled code is cached per function, across steps and tests
    counting = Counting()
    step = StaticStep(tied_backbone.decoder(), counting)

    def steps_to(n_columns, batch):
        trace = LatentTrace(tied_backbone, batch, step=step)
        with torch.no_grad():
            h = prefill(trace, "a", ["x" * 40] * batch)
            latent_steps(trace, "a", h, n_columns - trace.length)
        return trace

    steps_to(600, 2)  # buckets 256, 512, 1024
    assert counting.n == 3
    steps_to(600, 2)  # a new trace, new buffers: the same graphs
    assert counting.n == 3
    steps_to(300, 1)  # another batch size: its own shapes
    assert counting.n == 5


def test_methods_match_the_eager_path(backbone):
    cfg = dict(latent_steps=3, decode=DecodeConfig(max_new_tokens=20, min_new_tokens=20))
    for name in ("single", "latent_mas"):
        for questions in (ROWS, ROWS[2:]):
            eager, fast = (
                get_method(name, backbone, config=MethodConfig(**cfg, compile=mode)).run_batch(questions, "fmt")
                for mode in ("off", "eager")
            )
            for a, b in zip(eager, fast):
                assert b.text == a.text
                assert b.token_logprobs == pytest.approx(a.token_logprobs, abs=TOL)
                assert (b.trace_len, b.trace_bytes) == (a.trace_len, a.trace_bytes)
                assert [x.n_latent_steps for x in b.agents] == [x.n_latent_steps for x in a.agents]


def test_training_stays_eager(tied_backbone):
    method = get_method("latent_mas", tied_backbone, config=MethodConfig(latent_steps=1, compile="eager"))
    assert method.new_trace(1).store == "grow"  # autograd on: the copy-on-write store, no step
    with torch.no_grad():
        trace = method.new_trace(1)
    assert trace.store == "static" and trace.select([0, 0]).store == "static"
    with pytest.raises(DiffmasError, match="inference only"):
        prefill(trace, "a", ["hi"])  # an append with autograd on


def test_bad_settings_are_clear_errors(tied_backbone):
    from diffmas.budget import parse_budget

    with pytest.raises(CompileError, match="compile='fast': choose one of off, auto, inductor"):
        MethodConfig(compile="fast")
    budget = MethodConfig(compile="auto", trace_budget=parse_budget("window", "8", 0))
    with pytest.raises(MethodError, match="does not combine with a trace budget"):
        check_budget("latent_mas", budget)  # before any model loads
    if tied_backbone.device.type == "cpu":
        with pytest.raises(CompileError, match="needs CUDA graphs"):
            static_step(tied_backbone, "reduce-overhead")


def test_a_failing_compile_is_an_error_not_a_fallback(tied_backbone):
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    trace = LatentTrace(tied_backbone, 1, step=StaticStep(tied_backbone.decoder(), broken))
    with torch.no_grad():
        h = prefill(trace, "a", ["hi"])  # prompts run eagerly
        with pytest.raises(CompileError, match="failed on the one-position step: RuntimeError: no compiler here"):
            latent_steps(trace, "a", h, 1)


def test_recompile_limit_is_an_error(tied_backbone):
    torch._dynamo.reset()
    trace = LatentTrace(tied_backbone, 1, step=StaticStep(tied_backbone.decoder(), "eager", recompile_limit=1))
    with torch.no_grad():
        h = prefill(trace, "a", ["x" * 250])
        with pytest.raises(CompileError, match="run without --compile"):
            latent_steps(trace, "a", h, 10)  # the second bucket would be a second compile


def test_cli_run_with_compile(tmp_path):
    """`diffmas run --compile eager` against the same run in process with the eager path."""
    import json
    import os
    import subprocess
    import sys

    from diffmas.cli.common import build_config
    from diffmas.evaluate.runner import load_method
    from diffmas.roles import build_topology

    from conftest import make_model, make_tokenizer

    make_model(tied=False).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    question, flags = "What is 2+2?", ["--latent-steps", "2", "--max-new-tokens", "6", "--compile", "eager"]
    proc = subprocess.run(
        [sys.executable, "-m", "diffmas", "run", question, "--model", str(tmp_path), *flags, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    fast = json.loads(proc.stdout)
    assert fast["config"]["compile"] == "eager"
    config = build_config(2, 6, 256, 0.0, 1.0, 0)  # the run's settings, compile off
    method = load_method("latent_mas", build_topology("sequential", None, None), config, model=str(tmp_path))
    eager = method.run_batch([question])[0]
    assert (fast["text"], fast["trace_bytes"]) == (eager.text, eager.trace_bytes)
    assert fast["token_logprobs"] == pytest.approx(eager.token_logprobs, abs=TOL)


def test_cli_eval_records_compile(tmp_path):
    """`diffmas eval --compile eager` reaches the run's config (and so its resume check)."""
    import json

    from typer.testing import CliRunner

    from diffmas.cli import app

    from conftest import make_model, make_tokenizer

    make_model(tied=False).save_pretrained(tmp_path / "m")
    make_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "math.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    args = ["eval", "--task", f"jsonl:{data}?type=math", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, [*args, "--latent-steps", "1", "--max-new-tokens", "2", "--compile", "eager"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["eval"]["method_config"]["compile"] == "eager"
