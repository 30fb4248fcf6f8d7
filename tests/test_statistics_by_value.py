"""Every statistic the service reports, checked by value against a plain computation on a case whose
answer is known: validation's random baseline (mean, std, z, p from the seeded draws), the neutral
loss change and other concepts' changes; the AtP screen's Spearman and missed-neuron estimate on
constructed rankings; the NEG-vs-NeurGrad agreement on constructed effects."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from attribution.neat import clean_pass, concept_vector
from attribution.validation import ConceptProbe, validate_ranking
from cluster.checks import neg_agreement
from cluster.config import load_job_config
from cluster.plan import resolve_job
from cluster.screen import screen_report, screen_sample

UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
NEUTRAL = ["Water boils at one hundred degrees Celsius at sea level.", "A week has seven days.",
           "The office printer is on the second floor."]


def no_tie_spearman(a: list[float], b: list[float]) -> float:
    """1 - 6 sum d^2 / (n (n^2 - 1)) on distinct values: the textbook formula, no shared code."""
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=lambda i: xs[i]))}  # noqa: E731
    ra, rb, n = rank(a), rank(b), len(a)
    return 1 - 6 * sum((ra[i] - rb[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


# ---------------------------------------------------------------- validation: plain weight edits


class ZeroedColumns:
    """GPT-2 only: zero the write rows of (layer, neuron) in the c_proj weights, restore on exit."""

    def __init__(self, model, neurons):
        self.model, self.neurons = model, list(neurons)

    def __enter__(self):
        self.saved = {layer: self.model.blocks[layer].mlp.c_proj.weight.detach().clone()
                      for layer in {layer for layer, _ in self.neurons}}
        with torch.no_grad():
            for layer, neuron in self.neurons:
                self.model.blocks[layer].mlp.c_proj.weight[neuron, :] = 0.0  # Conv1D [d_mlp, d_model]
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for layer, weight in self.saved.items():
                self.model.blocks[layer].mlp.c_proj.weight.copy_(weight)


@torch.no_grad()
def plain_log_p(model, vector, targets) -> float:
    logits = model.hf(inputs_embeds=vector.view(1, 1, -1)).logits[0, -1].double()
    return float(torch.log_softmax(logits, dim=-1)[list(targets)].mean())


def plain_change(model, probe, neurons) -> float:
    base = plain_log_p(model, probe.clean.vector, probe.target_ids)
    with ZeroedColumns(model, neurons):
        return plain_log_p(model, probe.clean.vector, probe.target_ids) - base


@torch.no_grad()
def plain_neutral_loss(model, texts, neurons=()) -> float:
    """Mean next-token loss over every predicted token of the texts, one unpadded text at a time."""
    total, count = 0.0, 0
    with ZeroedColumns(model, neurons):
        for text in texts:
            ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
            log_probs = torch.log_softmax(model.hf(input_ids=ids).logits[0, :-1].double(), dim=-1)
            total += -float(log_probs.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total / count


def _probe(model, name, examples, words):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return ConceptProbe(name, clean_pass(model, concept_vector(model, examples), targets), targets)


def test_validation_statistics_equal_the_plain_computation_on_the_seeded_draws(tiny_models):
    model = tiny_models["gpt2"]
    royalty = _probe(model, "royalty", ["The king wore a crown.", "The queen sat on the throne."], ("king", "queen"))
    weather = _probe(model, "weather", ["Heavy rain fell all night.", "Snow covered the hills."], ("rain", "snow"))
    layers, draws, seed = [1, 3], 10, 7
    # A middling "top" neuron, so the p-value is neither its smallest (1/11) nor 1.
    singles = sorted(((abs(plain_change(model, royalty, [(1, n)])), n) for n in range(0, 128, 8)))
    middling = (1, singles[len(singles) // 2][1])
    top = [middling, (3, 5), (1, 77)]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    results = validate_ranking(model, royalty, top, [1, 3], others=[weather], ablate_to=zeros, layers=layers,
                               draws=draws, seed=seed, neutral_texts=NEUTRAL)

    # The documented draws: one seeded generator, for each k in order, `draws` permutations of the
    # layers' neurons, the first k of each (layer = layers[p // d_mlp], neuron = p % d_mlp).
    generator = torch.Generator().manual_seed(seed)
    clean_loss = plain_neutral_loss(model, NEUTRAL)
    p_values = []
    for result, k in zip(results, [1, 3]):
        changes = []
        for _ in range(draws):
            picks = torch.randperm(len(layers) * model.d_mlp, generator=generator)[:k].tolist()
            changes.append(plain_change(model, royalty, [(layers[p // model.d_mlp], p % model.d_mlp) for p in picks]))
        top_change = plain_change(model, royalty, top[:k])
        mean, std = statistics.mean(changes), statistics.stdev(changes)  # sample std (n - 1)
        as_far = sum(abs(c) >= abs(top_change) for c in changes)
        assert result.k == k and result.draws == draws
        assert result.top_change == pytest.approx(top_change, abs=1e-5)
        assert result.random_mean == pytest.approx(mean, abs=1e-5)
        assert result.random_std == pytest.approx(std, abs=1e-5, rel=1e-4)
        assert result.z_score == pytest.approx((top_change - mean) / std, rel=1e-3, abs=1e-4)
        assert result.p_value == pytest.approx((as_far + 1) / (draws + 1), abs=1e-12)
        assert result.other_changes == {"weather": pytest.approx(plain_change(model, weather, top[:k]), abs=1e-5)}
        assert result.neutral_loss_change == pytest.approx(
            plain_neutral_loss(model, NEUTRAL, top[:k]) - clean_loss, abs=1e-5)
        assert abs(result.neutral_loss_change) > 1e-5  # zeroing a real neuron moves the loss
        p_values.append(result.p_value)
    assert 1 / (draws + 1) < p_values[0] < 1, p_values  # the case exercises the count, not a bound


# ---------------------------------------------------------------- AtP screen report


def _screen_plan(tmp_path, tiny_sources):
    path = tmp_path / "screen.yaml"
    path.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(UNSEEN), "layers": [0, 1, 2, 3],
        "atlas": str(tmp_path / "atlas"), "methods": ["neat"], "run_id": "screen",
        "method_options": {"screen_top": 20, "screen_sample": 150}, "cluster": {"actors": 1},
    }))
    return resolve_job(load_job_config(path))


def _screen_rows(plan, atp_top_exact: str) -> tuple[pa.Table, list, list]:
    """AtP's top 20 lie outside the sample; on the sample, AtP ranks as exact NEAT does but with every
    adjacent pair swapped; the top 20's exact scores are all above ("highest") or below ("lowest") the sample's."""
    sample = screen_sample(plan)
    everything = [(layer, n) for layer in plan.layers for n in range(plan.d_mlp)]
    outside = [key for key in everything if key not in set(sample)]
    atp_top = outside[:20]
    order = torch.randperm(len(sample), generator=torch.Generator().manual_seed(0)).tolist()
    exact = {sample[i]: 1000.0 - rank for rank, i in enumerate(order)}  # exact rank of sample[i] = its position
    atp = {}
    for rank, i in enumerate(order):
        swapped = rank + 1 if rank % 2 == 0 else rank - 1  # 150 neurons: 75 adjacent swaps, |d| = 1 each
        atp[sample[i]] = 1000.0 - swapped
    for j, key in enumerate(atp_top):
        atp[key] = 5000.0 - j
        exact[key] = (3000.0 - j) if atp_top_exact == "highest" else (10.0 - j * 0.1)
    for j, key in enumerate(outside[20:]):
        atp[key] = 100.0 - j * 0.01  # below the sample in AtP, never scored exactly
    rows = [{"method": "atp", "concept": "weather", "ablation": "zero", "layer": l, "neuron": n, "score": s}
            for (l, n), s in atp.items()]
    rows += [{"method": "neat", "concept": "weather", "ablation": "zero", "layer": l, "neuron": n, "score": s}
             for (l, n), s in exact.items()]
    return pa.Table.from_pylist(rows), sample, atp_top


@pytest.mark.parametrize("atp_top_exact, missed", [("lowest", 100), ("highest", 80)])
def test_screen_report_on_a_constructed_ranking(tmp_path, tiny_sources, atp_top_exact, missed):
    plan = _screen_plan(tmp_path, tiny_sources)
    rows, sample, atp_top = _screen_rows(plan, atp_top_exact)
    assert len(sample) == 150 and not set(sample) & set(atp_top)
    report, = screen_report(plan, rows)
    # Known by construction: 150 ranks each off by one => rho = 1 - 6 * 150 / (150 * (150^2 - 1)).
    rho = 1 - 6 * 150 / (150 * (150 ** 2 - 1))
    assert rho == pytest.approx(no_tie_spearman([1000.0 - r for r in range(150)],
                                                [1000.0 - (r + 1 if r % 2 == 0 else r - 1) for r in range(150)]))
    assert report["sample_spearman"] == round(rho, 4) == 0.9997
    # The exact top 100 of the 170 scored neurons: the sample's best 100 when AtP's top 20 score lowest
    # (all missed by the screen), or AtP's 20 plus the sample's best 80 when they score highest.
    assert report["scored_exactly"] == 170 and report["sample"] == 150 and report["screen_top"] == 20
    assert report["sample_missed_top100"] == missed
    # Scaled to the 4 x 96 - 20 neurons the screen did not pick, from the 150 sampled among them.
    assert report["estimated_missed_top100"] == round(missed * (4 * 96 - 20) / 150, 1)


# ---------------------------------------------------------------- NEG vs NeurGrad agreement


def test_neg_vs_neurgrad_agreement_on_constructed_effects():
    neg = [-5.0, -1.0, 2.0, 3.0, 4.0]
    grad = [-4.0, -2.0, 1.0, 5.0, 3.0]  # signed ranks: one adjacent swap (rho 0.9); |.| ranks: rho 0.6
    rows = [{"concept": "music", "method": "neg", "layer": 0, "neuron": n, "effect": e} for n, e in enumerate(neg)]
    rows += [{"concept": "music", "method": "neurgrad", "layer": 0, "neuron": n, "effect": e} for n, e in enumerate(grad)]
    rows.append({"concept": "music", "method": "neurgrad", "layer": 1, "neuron": 9, "effect": 99.0})  # not in NEG's sample
    rows += [{"concept": "art", "method": m, "layer": 0, "neuron": n, "effect": float(n)}  # 2 shared: skipped
             for m in ("neg", "neurgrad") for n in range(2)]
    out = neg_agreement(pa.Table.from_pylist(rows))
    assert out == [{"concept": "music", "neurons": 5, "spearman_signed": 0.9, "spearman_abs": 0.6}]
    assert no_tie_spearman(neg, grad) == pytest.approx(0.9)
    assert no_tie_spearman([abs(x) for x in neg], [abs(x) for x in grad]) == pytest.approx(0.6)
    assert math.isclose(0.6, 1 - 6 * 8 / (5 * 24))
