"""Every engine path against the independent NEAT of tests/naive_neat.py (no package code in it).

Each architecture (Llama, Mistral, Qwen2, GPT-2), its first, middle and last layers, zero and mean
ablation: the package computes the concept vector, targets, reference means and effects its own way;
naive_neat recomputes each from the texts (one unpadded text at a time, its own hooks). The tiny
models' tokenizer starts every text with a special BOS token, so a mean or concept vector that
averages special tokens or padding in is caught, and so is a layer off by one.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import naive_neat
from attribution.ablation import read_reference_texts, reference_means
from attribution.concepts import load_concept_file, resolve_targets
from attribution.models import load_model
from attribution.neat import clean_pass, concept_vector, neat_effects, neat_effects_bf16, neat_effects_naive
from tiny_models import save_tiny_model, save_tiny_encoder

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
UNSEEN = Path(__file__).parent / "data" / "unseen_concepts.yaml"
NEUTRAL = Path(__file__).resolve().parent.parent / "configs" / "reference" / "neutral.txt"
ATOL, RTOL = 1e-5, 1e-4  # float32 engines vs the float64-softmax naive loop on float32 weights


def neutral_texts(n: int) -> list[str]:
    """The first n reference texts, read here (not with the package's reader): non-empty, non-comment lines."""
    lines = [line.strip() for line in NEUTRAL.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")][:n]


class _Pairs(dict):
    """family -> (package SiteModel, naive HF model, naive tokenizer) of the same weights on disk,
    built on first use (so `-k llama` builds one model)."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def __missing__(self, family: str):
        source = save_tiny_model(family, self.root / family, seed=10 + FAMILIES.index(family), bos=True)
        self[family] = (load_model(source, device="cpu"), *naive_neat.load(source.path))
        return self[family]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return _Pairs(tmp_path_factory.mktemp("exactness"))


def assert_close(got: torch.Tensor, expected: list[float] | torch.Tensor, what: str) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    got = got.double()
    assert got.shape == expected.shape, what
    bad = (got - expected).abs() > ATOL + RTOL * expected.abs()
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {len(bad)} neurons differ; "
                                 f"max |diff| {float((got - expected).abs().max()):.3g}")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_tokenizer_adds_a_special_token_so_the_means_can_tell(pairs, family):
    model, hf, tokenizer = pairs[family]
    enc = tokenizer("The river flows south.", return_special_tokens_mask=True)
    assert enc["special_tokens_mask"][0] == 1 and sum(enc["special_tokens_mask"]) == 1
    # Averaging the BOS position in moves the means far beyond the tolerance of the test below.
    texts = neutral_texts(12)
    sums, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        seen = []
        handles = [naive_neat.site(hf, layer).register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
                   for layer in range(model.n_layers)]
        try:
            with torch.no_grad():
                hf(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
        sums = sums + torch.stack([acts.sum(0) for acts in seen])
        count += ids.shape[1]
    wrong = sums / count
    assert float((wrong - naive_neat.reference_means(hf, tokenizer, texts)).abs().max()) > 100 * ATOL


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_means_equal_an_independent_read_of_the_sites(pairs, family):
    model, hf, tokenizer = pairs[family]
    texts = neutral_texts(12)  # different lengths: one padded batch in the package, one text at a time here
    expected = naive_neat.reference_means(hf, tokenizer, texts)  # [n_layers, d_mlp]
    got = reference_means(model, texts)
    assert got.shape == expected.shape
    assert torch.allclose(got.double(), expected, atol=1e-5, rtol=1e-5), float((got.double() - expected).abs().max())


def test_reference_texts_are_the_files_lines():
    assert read_reference_texts() == neutral_texts(10_000)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_reference_means_leave_cls_sep_and_padding_out(tmp_path, family):
    from transformers import AutoModel, AutoTokenizer

    source = save_tiny_encoder(family, tmp_path / family, seed=5)
    model = load_model(source, device="cpu")
    hf, tokenizer = AutoModel.from_pretrained(source.path).eval(), AutoTokenizer.from_pretrained(source.path)
    texts = neutral_texts(6)
    total, count = 0.0, 0
    for text in texts:  # one text at a time: [CLS] ... [SEP], no padding
        enc = tokenizer(text, return_tensors="pt", return_special_tokens_mask=True)
        real = enc.pop("special_tokens_mask")[0] == 0
        assert not bool(real.all())  # [CLS] and [SEP] are there to be left out
        seen = []
        handles = [layer.output.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].double()))
                   for layer in hf.encoder.layer]
        try:
            with torch.no_grad():
                hf(**enc)
        finally:
            for handle in handles:
                handle.remove()
        total = total + torch.stack([acts[real].sum(0) for acts in seen])
        count += int(real.sum())
    expected = total / count
    got = reference_means(model, texts).double()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), float((got - expected).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_concept_vector_and_targets_equal_the_independent_ones(pairs, family):
    model, hf, tokenizer = pairs[family]
    for concept in load_concept_file(UNSEEN):
        assert list(resolve_targets(model.tokenizer, concept).ids) == naive_neat.target_ids(tokenizer, concept.targets)
        expected = naive_neat.concept_vector(hf, tokenizer, concept.examples)
        assert torch.allclose(concept_vector(model, concept.examples), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engines_equal_the_independent_naive_neat(pairs, family, ablation):
    """Fast float32 engine and the package's own naive loop, every neuron of the first, a middle and
    the last layer, against naive_neat computed from the texts alone."""
    model, hf, tokenizer = pairs[family]
    concept = load_concept_file(UNSEEN)[0]
    texts = neutral_texts(12)
    # package side: its concept vector, targets and means
    targets = resolve_targets(model.tokenizer, concept).ids
    clean = clean_pass(model, concept_vector(model, concept.examples), targets)
    means = reference_means(model, texts) if ablation == "mean" else None
    # independent side: the same quantities recomputed by naive_neat
    vector = naive_neat.concept_vector(hf, tokenizer, concept.examples)
    naive_targets = naive_neat.target_ids(tokenizer, concept.targets)
    naive_means = naive_neat.reference_means(hf, tokenizer, texts) if ablation == "mean" else None
    neurons = range(1, model.d_mlp, 3)  # 32 of 96: the naive loops cost one full forward each
    for layer in (0, model.n_layers // 2, model.n_layers - 1):
        ablate_to = torch.zeros(model.d_mlp) if means is None else means[layer]
        expected = naive_neat.vector_effects(hf, vector, naive_targets, layer, neurons,
                                             None if naive_means is None else naive_means[layer])
        assert max(abs(e) for e in expected) > 1e-3, "the tiny model must move log p measurably"
        # the fast engine scores the whole layer in batches of 16 (a partial last one) ...
        fast = neat_effects(model, clean, targets, layer, range(model.d_mlp), ablate_to, batch_rows=17)
        assert_close(fast[list(neurons)], expected, f"{family} {ablation} layer {layer} fast engine")
        # ... the package's own loop and the bf16 engine score the sample
        loop = neat_effects_naive(model, clean, targets, layer, neurons[:8], ablate_to)
        assert_close(loop, expected[:8], f"{family} {ablation} layer {layer} package naive loop")
        # bf16 difference propagation is near-exact: measured on SmolLM2 against float64 in test_float64_truth.py
        bf16 = neat_effects_bf16(model, clean, targets, layer, tuple(neurons), ablate_to, batch_rows=40)
        expected_t = torch.tensor(expected)
        assert float((bf16 - expected_t).abs().max()) <= 0.02 * float(expected_t.abs().max()) + 1e-6, (family, layer)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_explicit_neuron_picks_equal_the_same_neurons_of_a_range(pairs, family):
    """A screened shard names its neurons explicitly (a tuple): each gets its own effect, not a neighbour's."""
    model, hf, tokenizer = pairs[family]
    concept = load_concept_file(UNSEEN)[1]
    vector = naive_neat.concept_vector(hf, tokenizer, concept.examples)
    picks = (90, 3, 41, 42, 7)
    expected = naive_neat.vector_effects(hf, vector, naive_neat.target_ids(tokenizer, concept.targets), 1, picks)
    targets = resolve_targets(model.tokenizer, concept).ids
    clean = clean_pass(model, concept_vector(model, concept.examples), targets)
    got = neat_effects(model, clean, targets, 1, picks, torch.zeros(model.d_mlp), batch_rows=3)
    assert_close(got, expected, f"{family} explicit picks")
