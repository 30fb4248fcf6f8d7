"""BERT-family encoders: the packaged MiniLM-L6 model, its neuron sites, and the probing methods on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from attribution.concepts import load_concept_file
from attribution.models import load_model, resolve_model_source
from attribution.selectivity import selectivity_scores
from jobs.cli import main
from storage.read import open_neurons
from conftest import local_ray_session

BUILTIN = Path(__file__).parent.parent / "configs" / "concepts" / "builtin.yaml"
DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def minilm():
    return load_model(resolve_model_source("minilm-l6"), device="cpu")


def _intermediate_outputs(model, text: str) -> np.ndarray:
    """[n_layers, pos, d_mlp]: each layer's BertIntermediate output (dense + GELU), read off that module."""
    outs = []
    handles = [layer.intermediate.register_forward_hook(lambda m, a, o: outs.append(o[0].detach().double().numpy()))
               for layer in model.hf.encoder.layer]
    try:
        with torch.no_grad():
            model.hf(**model.tokenizer(text, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return np.stack(outs)


def test_minilm_alias_is_a_six_layer_encoder_whose_neurons_are_the_gelu_outputs(minilm):
    assert minilm.arch.encoder and minilm.n_layers == 6 and minilm.d_mlp == 1536 and minilm.d_model == 384
    assert resolve_model_source("minilm-l6").revision.startswith("sha256:")
    seen = {}
    handles = [minilm.site(layer).register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0]))
               for layer in range(6)]
    try:
        with torch.no_grad():
            minilm.hf(**minilm.tokenizer("The king wore a crown.", return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    expected = _intermediate_outputs(minilm, "The king wore a crown.")
    for layer in range(6):
        assert np.allclose(seen[layer][0].double().numpy(), expected[layer], atol=1e-6)


def test_selectivity_on_minilm_equals_a_plain_computation(minilm):
    royalty = next(c for c in load_concept_file(BUILTIN) if c.name == "royalty")
    scores = selectivity_scores(minilm, royalty)

    def pooled(text):  # mean over the real tokens, [CLS] and [SEP] left out
        return _intermediate_outputs(minilm, text)[:, 1:-1].mean(axis=1)

    pos = np.stack([pooled(t) for t in royalty.examples])
    neg = np.stack([pooled(t) for t in royalty.negatives])
    expected = (pos.mean(0) - neg.mean(0)) / (np.sqrt((pos.var(0) + neg.var(0)) / 2) + 1e-6)
    assert np.allclose(scores.extra["selectivity"].numpy(), expected, atol=1e-4, rtol=1e-4)
    assert float(scores.ranking_score.max()) > 2.0  # some MiniLM neurons separate royalty from its negatives


def test_an_encoder_runs_the_probing_methods_and_refuses_the_others(tmp_path, capsys):
    atlas = tmp_path / "atlas"
    common = ["run", str(DEMO), "--model", "minilm-l6", "--layers", "0,5", "--atlas", str(atlas), "--actors", "1"]
    assert main(common + ["--method", "neat"]) == 2
    assert "is an encoder" in capsys.readouterr().err and not atlas.exists()
    with local_ray_session():
        assert main(common + ["--method", "selectivity", "--method", "neuronlens", "--run-id", "enc"]) == 0
    rows = open_neurons(str(atlas)).to_pyarrow_table()
    assert rows.num_rows == 6 * 2 * 2 * 1536  # concepts x methods x layers x neurons
    assert set(rows["model"].to_pylist()) == {"minilm-l6"}
    selective = rows.filter(pc.equal(rows["method"], "selectivity"))
    assert selective["selectivity"].null_count == 0 and selective["range_low"].null_count == selective.num_rows
