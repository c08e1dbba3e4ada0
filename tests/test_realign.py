"""Realignment of hidden states into input-embedding space."""

from __future__ import annotations

import torch

from diffmas.backbone import Realigner


def test_tied_is_identity_plus_rescale(tied_backbone):
    realign = tied_backbone.realigner
    assert realign.matrix is None
    w_in = tied_backbone.input_embeddings().weight
    assert abs(realign.target_norm - float(w_in.norm(dim=1).mean())) < 1e-4
    h = torch.randn(5, w_in.shape[1]) * 37.0
    out = realign(h)
    # same direction, input-embedding norm
    cos = torch.nn.functional.cosine_similarity(out, h, dim=-1)
    assert torch.allclose(cos, torch.ones(5), atol=1e-5)
    assert torch.allclose(out.norm(dim=-1), torch.full((5,), realign.target_norm), rtol=1e-5)


def test_untied_ridge_map_recovers_a_known_linear_relation():
    """If W_in = W_out A (+ noise), the ridge map is A and maps W_out's rows onto W_in's rows."""
    torch.manual_seed(0)
    V, d = 500, 32
    w_out = torch.randn(V, d)
    a = torch.randn(d, d) / d**0.5
    w_in = w_out @ a + 1e-3 * torch.randn(V, d)
    realign = Realigner.fit(w_in, w_out, tied=False)
    assert torch.allclose(realign.matrix, a, atol=1e-3)
    mapped = w_out @ realign.matrix
    rel = (mapped - w_in).norm(dim=1) / w_in.norm(dim=1)
    assert rel.max() < 0.01


def test_untied_ridge_map_is_the_least_squares_solution(untied_backbone):
    realign = untied_backbone.realigner
    w_in = untied_backbone.input_embeddings().weight.float()
    w_out = untied_backbone.output_embeddings().weight.float()
    lstsq = torch.linalg.lstsq(w_out, w_in).solution
    assert torch.allclose(realign.matrix, lstsq, atol=1e-3)
    # it beats the identity map at sending output rows to input rows
    fit = (w_out @ realign.matrix - w_in).norm()
    identity = (w_out * (w_in.norm() / w_out.norm()) - w_in).norm()
    assert fit < identity


def test_untied_outputs_have_mean_input_norm(untied_backbone):
    realign = untied_backbone.realigner
    h = torch.randn(7, untied_backbone.config.hidden_size) * 50
    out = realign(h)
    target = float(untied_backbone.input_embeddings().weight.norm(dim=1).mean())
    assert torch.allclose(out.norm(dim=-1), torch.full((7,), target), rtol=1e-4)


def test_realigner_is_computed_once(untied_backbone):
    assert untied_backbone.realigner is untied_backbone.realigner


def test_realign_is_differentiable(untied_backbone):
    h = torch.randn(2, untied_backbone.config.hidden_size, requires_grad=True)
    untied_backbone.realigner(h).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
