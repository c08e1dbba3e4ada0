"""A method's cost is its own: option scoring is measured apart, and text_mas frees the upstream
agents' caches once their text is out."""

from __future__ import annotations

import time

import pytest
import torch

from diffmas.generate import DecodeConfig
from diffmas.methods import Method, MethodConfig, OptionQuery, asks_of, get_method
from diffmas.roles import default_topology

from conftest import make_backbone

QUERY = OptionQuery("Which is a fruit?", (" apple", " a red brick"))


def _config():
    return MethodConfig(latent_steps=2, upstream_max_new_tokens=3, decode=DecodeConfig(max_new_tokens=3))


@pytest.mark.parametrize("name", ["single", "latent_mas"])
def test_option_scoring_time_is_kept_out_of_the_methods_wall_time(monkeypatch, name):
    original = Method._score_options

    def slow(self, up, queries):
        time.sleep(0.5)
        return original(self, up, queries)

    monkeypatch.setattr(Method, "_score_options", slow)
    method = get_method(name, make_backbone(False), default_topology("sequential", 2), _config())
    result = method.run_batch(["Q?"], options=[QUERY])[0]
    assert result.option_wall_s >= 0.5
    assert result.wall_s < 0.5  # it held the sleep before
    plain = method.run_batch(["Q?"])[0]
    assert plain.option_wall_s is None and plain.option_peak_memory_bytes is None
    assert plain.text == result.text


def test_option_scoring_memory_is_kept_out_of_the_methods_peak(monkeypatch):
    from diffmas.accounting import MemoryMeter

    with MemoryMeter(torch.device("cpu")) as probe:
        pass
    if probe.kind == "rss_peak":
        try:
            open("/proc/self/clear_refs", "w").close()
        except OSError:
            pytest.skip("the RSS peak cannot be reset here, so phases cannot be told apart")
    original = Method._score_options
    big = 400 * 2**20

    def hungry(self, up, queries):
        scratch = torch.ones(big // 4, dtype=torch.float32, device=self.backbone.device)  # touched: resident
        del scratch
        return original(self, up, queries)

    monkeypatch.setattr(Method, "_score_options", hungry)
    method = get_method("single", make_backbone(False), default_topology("sequential", 1), _config())
    result = method.run_batch(["Q?"], options=[QUERY])[0]
    assert result.option_peak_memory_bytes - result.peak_memory_bytes > big // 2


def test_text_mas_frees_each_upstream_agents_cache_and_still_reports_lengths():
    bb = make_backbone(False)
    method = get_method("text_mas", bb, default_topology("sequential", 3), _config())
    up = method.build_upstream(asks_of(["Q one?", "Question two?"]))
    upstream_traces = up.traces[:-1]
    assert len(upstream_traces) == 2
    assert all(t.n_bytes() == 0 for t in upstream_traces)  # every agent's KV cache was alive to the end
    assert all(min(t.n_real()) > 0 for t in upstream_traces)  # lengths are still known
    result = method.run_batch(["Q one?"])[0]
    longest_upstream = max(a.n_prompt_tokens + a.n_generated_tokens for a in result.agents[:-1])
    assert result.trace_len >= longest_upstream
    # k samples of a question share a released upstream (rows selected from it)
    shared = up.select([0, 0, 1])
    assert [t.n_real() for t in shared.traces[:-1]] == [[t.n_real()[r] for r in (0, 0, 1)] for t in upstream_traces]


def test_a_released_trace_refuses_appends():
    from diffmas.errors import DiffmasError
    from diffmas.trace import LatentTrace

    bb = make_backbone(False)
    trace = LatentTrace(bb, 1)
    trace.release()
    with pytest.raises(DiffmasError, match="released"):
        trace.append(bb.embed(torch.tensor([[5, 6]])), torch.ones(1, 2), "a", "prompt")


def test_summary_reports_option_scoring_time_apart():
    from test_metrics import rec

    from diffmas.evaluate.metrics import summarize

    option = {
        "labels": ["A", "B"],
        "logprobs": [-1.0, -2.0],
        "n_chars": [1, 1],
        "pred": "A",
        "pred_norm": "A",
        "correct": True,
        "correct_norm": True,
        "wall_s": 3.0,
        "peak_memory_bytes": 5,
    }
    s = summarize(
        [
            rec("a", wall_s=1.0, batch_size=2, option_likelihood=option),
            rec("b", wall_s=1.0, batch_size=2, option_likelihood=option),
        ]
    )
    assert s["seconds_per_question"] == pytest.approx(0.5)
    assert s["option_seconds_per_question"] == pytest.approx(1.5)
    assert summarize([rec("a")])["option_seconds_per_question"] is None
