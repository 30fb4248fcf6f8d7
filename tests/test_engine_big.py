"""The engine's big-model paths: the chunked head, bf16 weights held once, the pipelined split replica,
AtP through a split replica, and the one preparation a run shares."""
from __future__ import annotations

import pytest
import torch

import attribution.lm_head as lm_head
import attribution.neat as neat
from attribution.atp import log_p_gradients
from attribution.held_weights import held_bytes, hold_in_bf16
from attribution.lm_head import HeadMomentsCache, chunked_logsumexp, head_log_p, head_moments
from attribution.models import load_model
from attribution.neat import (clean_pass, concept_vector, log_p_targets, neat_effects, neat_effects_bf16,
                              neat_effects_naive)
from attribution.placement import Placement

EXAMPLES = ["The king wore a golden crown.", "The queen sat on her throne in the palace."]


def _setup(model, words=("king", "queen", "crown")):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return targets, clean_pass(model, concept_vector(model, EXAMPLES), targets)


def test_chunked_logsumexp_equals_torch_logsumexp(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 1000, generator=generator) * 30
    logits[1, 999] = 500.0  # beyond exp's range: the running max keeps it finite
    logits[2, :] = -1e4
    monkeypatch.setattr(lm_head, "HEAD_VOCAB_CHUNK", 7)  # many chunks, a short last one
    got = chunked_logsumexp(lambda part: logits[:, part], 1000)
    assert torch.allclose(got, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_head_log_p_equals_the_whole_vocabulary_log_softmax(tiny_models, family, monkeypatch):
    model = tiny_models[family]
    targets, clean = _setup(model)
    resid = torch.stack(clean.resid)  # [n_layers, d_model]: a few different rows
    whole = log_p_targets(model.head(resid), torch.tensor(targets))
    monkeypatch.setattr(lm_head, "HEAD_VOCAB_CHUNK", 1000)
    chunked = head_log_p(model, resid, torch.tensor(targets))
    assert torch.allclose(chunked, whole, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_engine_with_weights_held_once_tracks_float32(tiny_sources, family):
    model = load_model(tiny_sources[family], device="cpu")  # its own copy: holding changes it
    targets, clean = _setup(model)
    zeros = torch.zeros(model.d_mlp)
    exact = [neat_effects(model, clean, targets, layer, range(model.d_mlp), zeros) for layer in range(model.n_layers)]
    moments = head_moments(model, clean.resid[-1])
    hold_in_bf16(model)
    held, params = held_bytes(model)
    matrices = [p for p in model.hf.parameters() if p.dim() == 2]
    assert matrices and all(p.dtype == torch.bfloat16 for p in matrices)
    for layer in range(model.n_layers):
        fast = neat_effects_bf16(model, clean, targets, layer, range(model.d_mlp), zeros, batch_rows=40,
                                 moments=moments)
        assert float((fast - exact[layer]).abs().max()) <= 0.02 * float(exact[layer].abs().max()) + 1e-6
        assert set(exact[layer].abs().topk(5).indices.tolist()) == set(fast.abs().topk(5).indices.tolist())
    # The engine read the held tensors: its only own tensors are the folded GQA o_proj (a quarter of it here)
    held_after, _ = held_bytes(model)
    assert held_after == held or family == "llama"
    assert held_after / params <= 2.1, held_after / params
    # The float32 engine still runs on the held model, upcasting a layer at a time, and equals the naive loop.
    layer = 1
    held_clean = clean_pass(model, clean.vector, targets)  # the held (bf16-rounded) model's own baseline
    fast32 = neat_effects(model, held_clean, targets, layer, range(24), zeros, batch_rows=9)
    naive = neat_effects_naive(model, held_clean, targets, layer, range(24), zeros)
    assert torch.allclose(fast32, naive, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("engine", [neat_effects, neat_effects_bf16])
def test_pipelined_stages_equal_one_stage(tiny_models, engine, monkeypatch):
    """The CPU has one device, so the split is forced: 3 stages in wavefront order over 5 batches give
    exactly the plain loop's effects."""
    model = tiny_models["llama"]
    targets, clean = _setup(model)
    zeros = torch.zeros(model.d_mlp)
    plain = engine(model, clean, targets, 0, range(model.d_mlp), zeros, batch_rows=20)
    calls = []
    monkeypatch.setattr(neat, "block_stages", lambda m, after: [range(1, 2), range(2, 3), range(3, 4)])
    original = neat.wavefront

    def recording(batches, stages):
        calls.append((batches, len(stages)))
        order = []
        original(batches, [lambda m, s=s, f=f: (order.append((s, m)), f(m)) for s, f in enumerate(stages)])
        # every batch meets its stages in order, and stage s+1 ran batch m-1 before stage s ran batch m+1
        for s, m in order:
            assert (s == 0 or order.index((s - 1, m)) < order.index((s, m)))
        calls.append(order)
    monkeypatch.setattr(neat, "wavefront", recording)
    piped = engine(model, clean, targets, 0, range(model.d_mlp), zeros, batch_rows=20)
    assert calls[0][1] == 5 and calls[0][0] >= 5  # first, three block stages, head
    order = calls[1]
    assert order.index((0, 1)) < order.index((2, 0)) < order.index((4, 0))  # overlapped, not batch by batch
    assert torch.equal(piped, plain)


def test_atp_through_a_split_replica_equals_atp_on_a_whole_one(tiny_sources):
    whole = load_model(tiny_sources["llama"], device="cpu")
    split = load_model(tiny_sources["llama"], device="cpu",
                       placement=Placement.from_ranges([range(0, 2), range(2, 4)], 4))
    targets, clean = _setup(whole)
    expected = log_p_gradients(whole, clean, targets)
    assert float(expected.abs().max()) > 0
    assert torch.equal(log_p_gradients(split, clean, targets), expected)


def test_head_moments_cache_evicts_the_least_recently_used_concept():
    made = []
    cache = HeadMomentsCache(capacity=2)
    for name in ("a", "b", "a", "c", "b"):
        cache.get(name, lambda name=name: made.append(name) or name)
    assert made == ["a", "b", "c", "b"] and len(cache) == 2  # "b" was evicted by "c" ("a" used more recently)


def test_actors_share_one_preparation_and_a_bf16_actor_holds_its_weights_once(tiny_sources, tmp_path):
    from pathlib import Path

    import yaml

    from cluster.config import load_job_config
    from cluster.plan import resolve_job
    from cluster.scorer import ScorerSpec, ShardScorer

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "model": tiny_sources["llama"].path, "concepts": str(Path(__file__).parent / "data" / "unseen_concepts.yaml"),
        "atlas": str(tmp_path / "atlas"), "layers": [1, 3], "ablation": ["zero", "mean"], "dtype": "bf16",
        "batch_rows": 32, "shard_neurons": 48, "run_id": "r"}))
    plan = resolve_job(load_job_config(config))
    spec = ScorerSpec.from_plan(plan)
    first = ShardScorer(spec)  # prepares the run
    other = ShardScorer(spec, first.prepared())  # takes the first actor's preparation, computes none
    summaries = first.describe()[1]
    assert summaries == other.describe()[1] and all(s.baseline.startswith("sha256:") for s in summaries)
    assert len({s.baseline for s in summaries}) == len(summaries)  # one baseline per concept
    for scorer in (first, other):
        held, params = held_bytes(scorer.model)
        assert held / params <= 2.1, held / params
    for shard in plan.shards[:2]:
        assert first.score_table(shard).equals(other.score_table(shard))
    assert len(first.head_moments) == len(plan.concepts)
