"""The bf16 engine's head (attribution/lm_head.py): the second-order expansion stays within its
remainder bound of a float64 sum over the whole vocabulary, and log_p_change tracks that sum."""
from __future__ import annotations

import pytest
import torch

from attribution.lm_head import TAYLOR_ABS, head_moments, log_p_change, second_order_change
from attribution.neat import clean_pass, concept_vector, run_suffix

EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]


def ablated_final_residuals(model, clean, layer: int, count: int) -> torch.Tensor:  # [count, d_model]
    """The final residual with each of neurons 0..count-1 of `layer` zeroed (float32 suffix)."""
    norm = model.arch.final_norm(model.hf)
    captured = {}
    handle = norm.register_forward_pre_hook(lambda m, args: captured.__setitem__("resid", args[0].detach()))
    try:
        resid = clean.resid[layer].expand(count, -1).clone()
        resid -= clean.acts[layer][:count, None] * model.w_out(layer)[:, :count].T
        run_suffix(model, resid, layer)
    finally:
        handle.remove()
    return captured["resid"]


def exact_change(model, clean, final: torch.Tensor, targets: tuple[int, ...]) -> torch.Tensor:  # [rows] float64
    """mean_t d_t - log sum_v p_v exp(d_v) in float64, from the same dn the head sees."""
    norm, weight = model.arch.final_norm(model.hf), model.hf.get_output_embeddings().weight.double()
    with torch.no_grad():
        normed = norm(clean.resid[-1].view(1, -1))
        dn = (norm(final) - normed).double()
        logits = (normed.double() @ weight.T)[0]
    d = dn @ weight.T  # [rows, vocab]
    return d[:, list(targets)].mean(dim=-1) - torch.logsumexp(d + torch.log_softmax(logits, dim=-1), dim=-1)


def _setup(model, words):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return targets, clean_pass(model, concept_vector(model, EXAMPLES), targets)


@pytest.mark.parametrize("layer", [0, 29])
def test_second_order_head_is_within_its_bound_on_smollm2(smollm2, layer):
    targets, clean = _setup(smollm2, ("king", "queen", "crown", "throne"))
    final = ablated_final_residuals(smollm2, clean, layer, 512)
    exact = exact_change(smollm2, clean, final, targets)
    moments = head_moments(smollm2, clean.resid[-1])
    norm = smollm2.arch.final_norm(smollm2.hf)
    with torch.no_grad():
        dn = norm(final) - norm(clean.resid[-1].view(1, -1))
    approx, bound = second_order_change(moments, dn, smollm2.hf.get_output_embeddings().weight[list(targets)])
    kept = torch.isfinite(bound)
    # float32 rounding of a, b and log1p comes on top of the (rigorous) remainder bound: 2e-8 + 1e-6 relative
    slack = 2e-8 + 1e-6 * exact.abs()
    assert bool(((approx.double() - exact).abs() <= bound.double() + slack)[kept].all())
    assert float((bound <= TAYLOR_ABS).float().mean()) > 0.3  # the expansion serves many rows ...
    assert float((bound > TAYLOR_ABS).float().mean()) > 0.1  # ... and the whole vocabulary the rest

    change = log_p_change(smollm2, moments, clean.resid[-1].view(1, -1), final - clean.resid[-1], torch.tensor(targets))
    assert float((change.double() - exact).abs().max()) <= 1e-5 + 2e-3 * float(exact.abs().max())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_log_p_change_on_tiny_models_and_when_logit_changes_overflow_exp(tiny_models, family):
    model = tiny_models[family]
    targets, clean = _setup(model, ("king", "queen", "crown"))
    final = ablated_final_residuals(model, clean, 0, model.d_mlp)
    for scale in (1.0, 400.0):  # 400x: logit changes beyond exp's float32 range (~88) take the shifted sum
        diff = (final - clean.resid[-1]) * scale
        exact = exact_change(model, clean, clean.resid[-1] + diff, targets)
        change = log_p_change(model, head_moments(model, clean.resid[-1]), clean.resid[-1].view(1, -1), diff,
                              torch.tensor(targets))
        assert bool(torch.isfinite(change).all())
        assert float((change.double() - exact).abs().max()) <= 1e-5 + 1e-2 * float(exact.abs().max()), scale
