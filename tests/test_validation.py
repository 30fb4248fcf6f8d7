"""Validation: ablating neurons together agrees with NEAT, random baselines are reproducible, and
the neutral-text loss is the model's own cross-entropy."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from attribution.neat import clean_pass, clean_passes, concept_vector, neat_effects
from attribution.validation import ConceptProbe, ablation_change, neutral_loss, validate_ranking


def _probe(model, name, examples, words):
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in words)
    return ConceptProbe(name, clean_pass(model, concept_vector(model, examples), targets), targets)


@pytest.fixture(scope="module")
def probes(tiny_models):
    model = tiny_models["llama"]
    return (_probe(model, "royalty", ["The king wore a crown.", "The queen sat on the throne."], ("king", "queen")),
            _probe(model, "weather", ["Heavy rain fell all night.", "Snow covered the hills."], ("rain", "snow")))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_clean_passes_equal_one_forward_per_concept(tiny_models, family):
    """validate's clean passes of its whole panel in one forward: the same log p(T), activations and
    residuals as one forward per concept (rows attend only to themselves)."""
    model = tiny_models[family]
    vectors = [concept_vector(model, [text]) for text in ("The king wore a crown.", "Rain fell.", "A dog barked.")]
    targets = [(5, 7), (11,), (3, 4, 9)]
    batched = clean_passes(model, vectors, targets, trajectory=False)
    for vector, ids, got in zip(vectors, targets, batched):
        one = clean_pass(model, vector, ids)
        assert got.log_p == pytest.approx(one.log_p, abs=1e-5)
        torch.testing.assert_close(got.acts, one.acts, atol=1e-5, rtol=1e-5)
        for a, b in zip(got.resid, one.resid):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert got.blocks == () and len(one.blocks) == model.n_layers


def test_single_neuron_ablation_change_is_its_neat_effect(tiny_models, probes):
    model, probe = tiny_models["llama"], probes[0]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    effects = neat_effects(model, probe.clean, probe.target_ids, 2, range(10), zeros[2])
    for neuron in range(10):
        assert ablation_change(model, probe, [(2, neuron)], zeros) == pytest.approx(float(effects[neuron]), abs=1e-5)


def test_validate_ranking_reports_top_random_and_other_concepts(tiny_models, probes):
    model, (royalty, weather) = tiny_models["llama"], probes
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    effects = torch.cat([neat_effects(model, royalty.clean, royalty.target_ids, layer, range(model.d_mlp), zeros[layer])
                         for layer in range(model.n_layers)])
    order = effects.abs().argsort(descending=True).tolist()
    top = [(i // model.d_mlp, i % model.d_mlp) for i in order[:5]]
    kwargs = dict(others=[weather], ablate_to=zeros, layers=list(range(model.n_layers)), draws=8, seed=3)
    first = validate_ranking(model, royalty, top, [1, 5], **kwargs)
    again = validate_ranking(model, royalty, top, [1, 5], **kwargs)
    assert first == again  # seeded random draws
    one, five = first
    assert one.top_change == pytest.approx(float(effects[order[0]]), abs=1e-5)
    assert five.k == 5 and five.draws == 8 and 1 / 9 <= five.p_value <= 1
    assert abs(one.top_change) > abs(one.random_mean)  # the strongest neuron beats random single neurons
    assert five.other_changes["weather"] == pytest.approx(ablation_change(model, weather, top, zeros), abs=1e-6)


def test_neutral_loss_is_the_models_cross_entropy(tiny_models):
    model = tiny_models["gpt2"]
    text = "Water boils at one hundred degrees at sea level."
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    expected = float(model.hf(input_ids=ids, labels=ids).loss)
    assert neutral_loss(model, [text]) == pytest.approx(expected, rel=1e-5)


def test_prompt_change_is_the_change_of_mean_log_p_gold_on_the_prompts(tiny_models):
    from attribution.prompts import Prompt
    from attribution.validation import ConceptProbe, prompts_log_p

    model = tiny_models["gpt2"]
    prompts = (Prompt("The king wore a golden", (model.tokenizer.encode(" crown")[0],)),
               Prompt("She sat on the", (model.tokenizer.encode(" throne")[0], model.tokenizer.encode(" chair")[0])))

    def plain(neurons) -> float:  # one unpadded forward per prompt, the neurons zeroed in the weights
        saved = model.w_out(1).detach().clone()
        try:
            with torch.no_grad():
                for layer, neuron in neurons:
                    model.blocks[layer].mlp.c_proj.weight[neuron, :] = 0.0  # GPT-2 Conv1D: row = neuron
                values = []
                for p in prompts:
                    ids = model.tokenizer(p.text, return_tensors="pt")["input_ids"]
                    log_p = torch.log_softmax(model.hf(input_ids=ids).logits[0, -1].float(), dim=-1)
                    values.append(float(log_p[list(p.target_ids)].mean()))
        finally:
            with torch.no_grad():
                model.blocks[1].mlp.c_proj.weight.copy_(saved.T)
        return sum(values) / len(values)

    neurons = [(1, 3), (1, 40)]
    assert prompts_log_p(model, prompts) == pytest.approx(plain([]), abs=1e-5)
    probe = ConceptProbe("royalty", clean_pass(model, concept_vector(model, ["The king."]), prompts[0].target_ids),
                         prompts[0].target_ids, prompts)
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    result, = validate_ranking(model, probe, neurons, [2], others=[], ablate_to=zeros, layers=[1], draws=2)
    assert result.prompt_change == pytest.approx(plain(neurons) - plain([]), abs=1e-5)


@pytest.mark.parametrize("family,intervention", [("llama", "zero"), ("gpt2", "range")])
def test_batched_validate_ranking_equals_the_naive_loop(tiny_models, family, intervention, tmp_path, monkeypatch):
    """Every set of one k as a row of one forward gives the naive loop's draws and numbers, with the
    clean states computed (an empty cache) and read back (the same cache, full)."""
    monkeypatch.setenv("NEURON_ATLAS_CACHE", str(tmp_path))
    from attribution.prompts import Prompt, concept_prompts
    from attribution.concepts import Concept
    from attribution.validation import validate_ranking_naive

    model = tiny_models[family]
    gen = torch.Generator().manual_seed(11)
    concept = Concept("royalty", examples=("The king wore a crown at court.", "The queen sat on the throne.",
                                           "A prince rode to the castle.", "The old king slept."),
                      targets=("king", "queen", "prince", "throne"))
    targets = tuple(model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in concept.targets)
    prompts = tuple(concept_prompts(model.tokenizer, concept, targets, min_prompts=2))
    assert len(prompts) >= 2 and all(isinstance(p, Prompt) for p in prompts)
    probe = ConceptProbe("royalty", clean_pass(model, concept_vector(model, concept.examples), targets), targets, prompts)
    weather = _probe(model, "weather", ["Heavy rain fell all night.", "Snow covered the hills."], ("rain", "snow"))
    weather_prompts = (Prompt("It was cold and the", weather.target_ids[1:]), Prompt("Grey clouds brought", weather.target_ids[:1]))
    # A panel concept with prompts (specificity on real text) and one without.
    others = [replace(weather, prompts=weather_prompts),
              _probe(model, "food", ["She baked fresh bread.", "The soup was hot."], ("bread", "soup"))]
    ablate_to = (torch.zeros(model.n_layers, model.d_mlp) if intervention == "zero"  # range: set to a "mean"
                 else torch.randn(model.n_layers, model.d_mlp, generator=gen) * 0.1)
    ranges = None
    if intervention == "range":  # a window around zero: some positions inside, some outside
        ranges = (torch.full((model.n_layers, model.d_mlp), -0.1), torch.full((model.n_layers, model.d_mlp), 1.0))
    layers = list(range(model.n_layers))
    top = [(int(layer), int(neuron)) for layer, neuron in zip(torch.randint(0, model.n_layers, (12,), generator=gen),
                                                               torch.randperm(model.d_mlp, generator=gen)[:12])]
    kwargs = dict(others=others, ablate_to=ablate_to, ranges=ranges, layers=layers, draws=4, seed=4,
                  neutral_texts=["The train left the station at noon today.", "Rain fell.",
                                 "She wrote a long letter to her brother about the farm and the harvest."])
    naive = validate_ranking_naive(model, probe, top, [1, 12], **kwargs)
    messages = []
    batched = validate_ranking(model, probe, top, [1, 12], progress=messages.append, **kwargs)
    assert messages  # progress is reported
    assert len(batched) == len(naive) == 2
    for fast, slow in zip(batched, naive):
        assert (fast.concept, fast.k, fast.draws, fast.p_value) == (slow.concept, slow.k, slow.draws, slow.p_value)
        for name in ("top_change", "random_mean", "random_std", "neutral_loss_change", "prompt_change",
                     "prompt_random_mean"):
            assert getattr(fast, name) == pytest.approx(getattr(slow, name), abs=2e-5), name
        assert fast.z_score == pytest.approx(slow.z_score, rel=1e-3, abs=1e-3)
        assert fast.other_changes.keys() == slow.other_changes.keys()
        for name, change in slow.other_changes.items():
            assert fast.other_changes[name] == pytest.approx(change, abs=2e-5)
        assert fast.prompt_other_changes.keys() == slow.prompt_other_changes.keys() == {"weather"}
        assert fast.prompt_other_changes["weather"] == pytest.approx(slow.prompt_other_changes["weather"], abs=2e-5)
    assert any(abs(r.top_change) > 1e-3 for r in naive) and any(abs(r.prompt_change) > 1e-3 for r in naive)
    assert any(abs(r.neutral_loss_change) > 1e-3 for r in naive)  # texts of 3 lengths share length-sorted batches
    assert any(abs(r.prompt_other_changes["weather"]) > 1e-3 for r in naive)
    # The clean states the first call stored give the same numbers, to the bit.
    assert list((tmp_path / "clean-states").glob("*.npy"))
    warm = validate_ranking(model, probe, top, [1, 12], **kwargs)
    assert [vars(r) for r in warm] == [vars(r) for r in batched]
    # The random draws' prompt changes computed apart (what the baseline cache holds) give the same results.
    from attribution.validation import draws_by_k, random_prompt_changes

    apart = random_prompt_changes(model, probe.prompts, draws_by_k(layers, model.d_mlp, [1, 12], 4, 4), ablate_to, ranges)
    known = validate_ranking(model, probe, top, [1, 12], random_prompts=apart, **kwargs)
    for fast, slow in zip(known, naive):
        for name in ("prompt_change", "prompt_random_mean", "top_change", "random_mean"):
            assert getattr(fast, name) == pytest.approx(getattr(slow, name), abs=2e-5), name


def test_concept_vectors_of_many_concepts_equal_one_at_a_time(tiny_models):
    """validate's panel: every concept's examples in shared, length-sorted batches give each concept's
    own vector (batches mix concepts and lengths: 3 concepts, texts of 2 to 13 words, batches of 4)."""
    from attribution.neat import concept_vectors

    model = tiny_models["llama"]
    examples = {"royalty": ("The king wore a crown.", "Queens.", "The old queen sat on the throne in the palace hall."),
                "weather": ("Heavy rain fell all night.", "Snow covered the hills and the roads until late morning."),
                "food": ("Bread.", "She baked bread.", "The soup was hot.", "They ate rice with beans and fried fish.")}
    together = concept_vectors(model, examples, batch_size=4)
    for name, texts in examples.items():
        alone = concept_vector(model, texts)
        assert torch.allclose(together[name], alone, atol=1e-5), name
    assert not torch.allclose(together["royalty"], together["food"], atol=1e-2)


def test_the_random_baseline_cache_returns_what_was_computed_and_follows_its_key(tiny_models, tmp_path, monkeypatch):
    """validate's random draws on the prompts: computed and stored on a miss, read back on a hit; a
    changed prompt, layer set, intervention or seed is another key; a corrupt file is recomputed."""
    from attribution.baseline_cache import baseline_key, cached_random_prompt_changes
    from attribution.prompts import Prompt
    from attribution.validation import draws_by_k, random_prompt_changes

    monkeypatch.setenv("NEURON_ATLAS_CACHE", str(tmp_path))
    model = tiny_models["llama"]
    ids = tuple(model.tokenizer.encode(" king", add_special_tokens=False)[:1])
    prompts = [Prompt("The old", ids), Prompt("She bowed to the", ids)]
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    args = dict(layers=[0, 1], ks=[1, 3], draws=3, seed=0)
    if baseline_key(model, prompts, zeros, None, **args) is None:
        pytest.skip("the tiny model has no weights revision to key a cache on")
    first, hit = cached_random_prompt_changes(model, prompts, zeros, None, **args)
    assert not hit and len(list((tmp_path / "validate-baselines").glob("*.json"))) == 1
    again, hit = cached_random_prompt_changes(model, prompts, zeros, None, **args)
    assert hit and again == first
    direct = random_prompt_changes(model, prompts, draws_by_k([0, 1], model.d_mlp, [1, 3], 3, 0), zeros)
    assert all(a == pytest.approx(b, abs=1e-6) for k in (1, 3) for a, b in zip(first[k], direct[k]))
    assert any(abs(v) > 1e-4 for values in first.values() for v in values)
    key = baseline_key(model, prompts, zeros, None, **args)
    for changed in (dict(args, layers=[1]), dict(args, seed=1)):
        assert baseline_key(model, prompts, zeros, None, **changed) != key
    assert baseline_key(model, prompts[:1], zeros, None, **args) != key
    assert baseline_key(model, prompts, zeros + 0.5, None, **args) != key
    (tmp_path / "validate-baselines" / f"{key}.json").write_text("{not json")
    repaired, hit = cached_random_prompt_changes(model, prompts, zeros, None, **args)
    assert not hit and all(a == pytest.approx(b, abs=1e-6) for k in (1, 3) for a, b in zip(repaired[k], first[k]))


def test_cached_clean_states_are_the_computed_ones_and_a_hit_runs_no_forward(tiny_models, tmp_path):
    """Each text's clean block inputs: computed at every block and stored on a miss (equal to
    clean_starts), read back on a hit without a forward; another text is another file, a corrupt file
    is recomputed, and a model without a weights revision is never cached."""
    from attribution.clean_cache import cached_clean_starts, states_key
    from attribution.suffix_start import clean_starts

    model = tiny_models["llama"]
    texts = ["The king wore a crown.", "Rain fell.", "The king wore a crown."]
    layers = {0, 1, model.n_layers}
    forwards = []
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        direct = clean_starts(model, texts, layers)
        forwards.clear()
        first = cached_clean_starts(model, texts, layers, directory=tmp_path)
        assert forwards and len(list(tmp_path.glob("*.npy"))) == 2  # one file per distinct text
        forwards.clear()
        again = cached_clean_starts(model, texts, {1}, directory=tmp_path)
        assert not forwards  # every text was held: no forward at all
    finally:
        handle.remove()
    for layer in layers:
        for text in texts:
            assert torch.equal(first.by_layer[layer][text], direct.by_layer[layer][text])
    assert all(torch.equal(again.by_layer[1][t], first.by_layer[1][t]) for t in texts)
    assert not torch.equal(first.by_layer[1][texts[0]], first.by_layer[0][texts[0]])
    cached_clean_starts(model, ["Snow covered the hills."], layers, directory=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 3
    key = states_key(model, model.tokenizer(texts[1])["input_ids"])
    (tmp_path / f"{key}.npy").write_bytes(b"not an array")
    repaired = cached_clean_starts(model, texts, layers, directory=tmp_path)
    # recomputed alone, not in a batch with the other text: equal up to batched rounding
    assert torch.allclose(repaired.by_layer[1][texts[1]], first.by_layer[1][texts[1]], atol=1e-5)
    assert (tmp_path / f"{key}.npy").stat().st_size > 100
    planned = replace(model, source=replace(model.source, revision="planned-only"))
    elsewhere = tmp_path / "planned"
    cached_clean_starts(planned, texts, layers, directory=elsewhere)
    assert not elsewhere.exists()


def test_cached_concept_vectors_are_the_computed_ones_and_follow_the_examples(tiny_models, tmp_path):
    """The cache returns exactly what it stored, recomputes when an example changes, and a corrupt file
    is recomputed rather than trusted."""
    from attribution.vector_cache import cached_concept_vectors, vector_key

    model = tiny_models["llama"]
    examples = {"royalty": ("The king wore a crown.", "The queen sat on the throne."),
                "weather": ("Heavy rain fell all night.", "Snow covered the hills.")}
    first = cached_concept_vectors(model, examples, directory=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    again = cached_concept_vectors(model, examples, directory=tmp_path)
    assert all(torch.equal(first[n], again[n]) for n in examples)
    assert torch.allclose(first["royalty"], concept_vector(model, examples["royalty"]), atol=1e-5)
    edited = {"royalty": ("The king wore a crown.", "A prince rode to the castle.")}
    changed = cached_concept_vectors(model, edited, directory=tmp_path)
    assert torch.allclose(changed["royalty"], concept_vector(model, edited["royalty"]), atol=1e-5)
    assert not torch.allclose(changed["royalty"], first["royalty"], atol=1e-3)
    (tmp_path / f"{vector_key(model, examples['weather'])}.pt").write_bytes(b"not a tensor")
    repaired = cached_concept_vectors(model, {"weather": examples["weather"]}, directory=tmp_path)
    assert torch.allclose(repaired["weather"], first["weather"], atol=1e-6)
