"""AtP screen: exact NEAT only on the neurons AtP ranks highest, plus a random sample that measures
what the screen misses.

After the AtP shards are staged, `screen_shards` picks per concept and ablation the top
`screen_top` neurons by AtP score, adds a seeded sample of `screen_sample` neurons of the run's
layers, and cuts their union into NEAT shards of explicit neurons. `screen_report` then compares
AtP with exact NEAT on the scored neurons: Spearman on the random sample (an unbiased estimate
over all neurons) and how many of the exact top-100 the screen would have missed.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from attribution.specificity import prompt_candidates
from attribution.stats import spearman
from cluster.plan import JobPlan, Shard
from storage.specificity import dense_effects, reference_at

REPORT_TOP = 100  # the exact top-k whose misses the report estimates


def screen_sample(plan: JobPlan) -> list[tuple[int, int]]:
    """The seeded random (layer, neuron) sample; the same for every concept, machine and run."""
    everything = [(layer, neuron) for layer in plan.layers for neuron in range(plan.d_mlp)]
    count = min(plan.config.method_options.screen_sample, len(everything))
    return sorted(random.Random(f"screen:{plan.model.revision}").sample(everything, count))


def screened_neurons(plan: JobPlan, atp_rows: pa.Table) -> dict[int, set[int]]:
    """layer -> neurons to score exactly: AtP's top-K per concept and ablation, plus the sample."""
    top = plan.config.method_options.screen_top
    picks: dict[int, set[int]] = {layer: set() for layer in plan.layers}
    for layer, neuron in screen_sample(plan):
        picks[layer].add(neuron)
    for group in _groups(atp_rows):
        order = np.argsort(-group["score"], kind="stable")[:top]
        for i in order:
            picks[int(group["layer"][i])].add(int(group["neuron"][i]))
    return picks


def screen_shards(plan: JobPlan, atp_rows: pa.Table) -> tuple[Shard, ...]:
    """NEAT shards over the screened neurons, each about as costly as a planned shard."""
    budget = plan.config.shard_neurons * max(plan.layer_cost)
    shards = []
    for layer, neurons in sorted(screened_neurons(plan, atp_rows).items()):
        ordered = sorted(neurons)
        size = max(1, math.floor(budget / plan.layer_cost[layer]))
        for start in range(0, len(ordered), size):
            chunk = tuple(ordered[start:start + size])
            shards.append(Shard("neat", layer, chunk[0], chunk[-1] + 1, chunk))
    return tuple(shards)


def prompt_screen_shards(plan: JobPlan, prompt_atp_rows: pa.Table,
                         reference: dict[str, np.ndarray] | None = None) -> tuple[Shard, ...]:
    """Per concept: exact prompt shards over the candidates of each ablation (attribution/specificity.py:
    prompt_candidates: prompt AtP's top `prompt_screen` by |estimate| and, with the reference concepts'
    prompt AtP `reference` {mode: [r, n_layers, d_mlp]}, the first `prompt_screen` of the carry-specific
    selection against them and the run's other concepts)."""
    top = plan.config.method_options.prompt_screen
    picks: dict[str, dict[int, set[int]]] = {}
    for ablation in sorted(set(prompt_atp_rows.column("ablation").to_pylist())):
        concepts, layer_col, neuron_col, estimates = dense_effects(  # estimates [concepts, n]
            prompt_atp_rows.filter(pc.equal(prompt_atp_rows["ablation"], ablation)),
            what=f"the prompt-atp rows of ablation {ablation}")
        ref = None
        if reference is not None and ablation in reference:
            ref = reference_at(reference[ablation], layer_col, neuron_col)  # [r, n]
        for i, concept in enumerate(concepts):
            others = torch.cat([estimates[:i], estimates[i + 1:]])
            off = others if ref is None else torch.cat([ref, others])
            if off.shape[0] == 0:  # one concept, no reference: the largest estimates only
                chosen_at = estimates[i].abs().topk(min(top, estimates.shape[1])).indices
            else:
                chosen_at = prompt_candidates(estimates[i], off, top=top)
            chosen = picks.setdefault(concept, {})
            for j in chosen_at.tolist():
                chosen.setdefault(int(layer_col[j]), set()).add(int(neuron_col[j]))
    # About as costly as a planned NEAT shard: a neuron costs a forward of each of the concept's prompts.
    size = max(1, plan.config.shard_neurons // 64)
    shards = []
    for concept, layers in sorted(picks.items()):
        for layer, neurons in sorted(layers.items()):
            ordered = sorted(neurons)
            for start in range(0, len(ordered), size):
                chunk = tuple(ordered[start:start + size])
                shards.append(Shard("prompt", layer, chunk[0], chunk[-1] + 1, chunk, concept=concept))
    return tuple(shards)


def prompt_screen_report(rows: pa.Table) -> list[dict]:
    """Per concept and ablation: prompt AtP against the exact prompt effects of the screened neurons."""
    report = []
    atp_groups = {(g["concept"], g["ablation"]): g for g in _groups(_method(rows, "prompt-atp"), "effect")}
    for exact in _groups(_method(rows, "prompt"), "effect"):
        atp = atp_groups[(exact["concept"], exact["ablation"])]
        estimate = dict(zip(zip(atp["layer"].tolist(), atp["neuron"].tolist()), atp["effect"].tolist()))
        keys = list(zip(exact["layer"].tolist(), exact["neuron"].tolist()))
        est = torch.tensor([estimate[k] for k in keys])
        got = torch.from_numpy(exact["effect"].astype(np.float32))
        report.append({
            "concept": exact["concept"], "ablation": exact["ablation"], "scored_exactly": len(keys),
            "spearman": round(spearman(est, got), 4) if len(keys) > 1 else None,
            "same_sign": round(float((est.sign() == got.sign()).float().mean()), 4),
        })
    return report


def screen_report(plan: JobPlan, rows: pa.Table) -> list[dict]:
    """Per concept and ablation: AtP vs exact NEAT on the screened neurons (for the run's metadata)."""
    top = plan.config.method_options.screen_top
    sample = set(screen_sample(plan))
    total = len(plan.layers) * plan.d_mlp
    report = []
    atp_groups = {(g["concept"], g["ablation"]): g for g in _groups(_method(rows, "atp"))}
    for exact in _groups(_method(rows, "neat")):
        atp = atp_groups[(exact["concept"], exact["ablation"])]
        atp_score = dict(zip(zip(atp["layer"].tolist(), atp["neuron"].tolist()), atp["score"].tolist()))
        atp_top = {key for key, _ in sorted(atp_score.items(), key=lambda kv: -kv[1])[:top]}
        keys = list(zip(exact["layer"].tolist(), exact["neuron"].tolist()))
        exact_score = dict(zip(keys, exact["score"].tolist()))
        in_sample = [k for k in keys if k in sample]
        bar = sorted(exact_score.values(), reverse=True)[min(REPORT_TOP, len(exact_score)) - 1]
        outside = [k for k in in_sample if k not in atp_top]
        missed = [k for k in outside if exact_score[k] >= bar]
        estimate = len(missed) * (total - len(atp_top)) / len(outside) if outside else 0.0
        report.append({
            "concept": exact["concept"], "ablation": exact["ablation"], "screen_top": top,
            "scored_exactly": len(keys), "sample": len(in_sample),
            "sample_spearman": round(spearman(torch.tensor([atp_score[k] for k in in_sample]),
                                              torch.tensor([exact_score[k] for k in in_sample])), 4),
            f"sample_missed_top{REPORT_TOP}": len(missed),
            f"estimated_missed_top{REPORT_TOP}": round(estimate, 1),
        })
    return report


def _method(rows: pa.Table, method: str) -> pa.Table:
    return rows.filter(pc.equal(rows.column("method"), method))


def _groups(rows: pa.Table, value: str = "score") -> list[dict]:
    """One dict of numpy columns (layer, neuron and `value`) per (concept, ablation) of `rows`."""
    out = []
    table = rows.select(["concept", "ablation", "layer", "neuron", value])
    keys = sorted(set(zip(table.column("concept").to_pylist(), table.column("ablation").to_pylist())))
    for concept, ablation in keys:
        mask = pc.and_(pc.equal(table.column("concept"), concept), pc.equal(table.column("ablation"), ablation))
        part = table.filter(mask)
        out.append({"concept": concept, "ablation": ablation,
                    **{name: part.column(name).to_numpy() for name in ("layer", "neuron", value)}})
    return out
