"""The measured choice of a concept's top-k set (attribution/measured_selection.py): its measurements
equal a plain one-prompt-at-a-time loop written without the package, on the own prompts and on every
prompt of the contrast concepts (the panel validate measures on); the choice keeps the default set when the measurement
confirms it and otherwise takes the most specific one."""
from __future__ import annotations

import statistics

import torch

import naive_neat
from attribution.measured_selection import SetMeasure, candidate_sets, choose_set, measure_sets
from attribution.prompts import Prompt
from attribution.specificity import CARRY_PENALTY, carry_specific_order

OWN = [("The king wore a golden", ("crown",)), ("The queen sat on her", ("throne",))]
CONTRAST = {
    "weather": [("Snow covered the quiet", ("hills",)), ("Rain fell on the", ("town",)),
                ("The wind blew over the", ("sea",)), ("Clouds hid the", ("sun",)),
                ("Thunder shook the old", ("house",)), ("Fog rolled over the", ("hills",))],
    "food": [("She ate a slice of", ("bread",))],
    "nothing": [],  # a concept without prompts has no measure
}


def _prompts(tokenizer, pairs) -> list[Prompt]:
    return [Prompt(text, tuple(naive_neat.target_ids(tokenizer, words))) for text, words in pairs]


def test_measured_sets_equal_a_plain_loop_on_every_contrast_prompt(tiny_sources, tiny_models):
    model = tiny_models["llama"]
    hf, tokenizer = naive_neat.load(tiny_sources["llama"].path)
    own = _prompts(tokenizer, OWN)
    contrast = {name: _prompts(tokenizer, pairs) for name, pairs in CONTRAST.items()}
    sets = {1.0: ((0, 3), (2, 11)), 10.0: ((1, 7),), 20.0: ((1, 7),)}  # 10 and 20: one set, measured once
    zeros = torch.zeros(model.n_layers, model.d_mlp)
    measures = measure_sets(model, sets, own, contrast, zeros)

    def plain(prompts, neurons) -> float:
        return statistics.fmean(naive_neat.prompt_log_p(hf, tokenizer, p, list(neurons), zeros)
                                - naive_neat.prompt_log_p(hf, tokenizer, p, [], zeros) for p in prompts)

    assert [m.penalty for m in measures] == [1.0, 10.0, 20.0]
    for measure in measures:
        assert abs(measure.own_change - plain(own, measure.neurons)) < 2e-5
        assert set(measure.other_changes) == {"weather", "food"}
        for name in ("weather", "food"):
            assert abs(measure.other_changes[name] - plain(contrast[name], measure.neurons)) < 2e-5
    assert measures[1].own_change == measures[2].own_change
    assert max(abs(m.own_change) for m in measures) > 1e-3, "the changes compared must be far from zero"


def test_candidate_sets_are_the_carry_selection_at_each_penalty():
    generator = torch.Generator().manual_seed(0)
    effect, off = torch.randn(40, generator=generator), torch.randn(5, 40, generator=generator) * 0.3
    neurons = [(i // 8, 100 + i) for i in range(40)]
    sets = candidate_sets(effect, off, neurons, k=4, penalties=(1.0, 10.0))
    for penalty, chosen in sets.items():
        order = carry_specific_order(effect, off, k=4, penalty=penalty)
        assert chosen == tuple(neurons[int(i)] for i in order)
        assert all(effect[neurons.index(n)] < 0 for n in chosen)  # only neurons that carry the concept


def test_the_default_set_is_kept_when_confirmed_else_the_most_specific():
    def measure(penalty, own, worst):
        return SetMeasure(penalty, ((0, int(penalty)),), own, {"other": worst})

    confirmed = [measure(2.0, -0.9, 0.1), measure(10.0, -0.5, 0.09)]  # default: 5.6 (the other: 9)
    assert choose_set(confirmed).penalty == 10.0
    weak = [measure(2.0, -0.9, 0.1), measure(10.0, -0.3, 0.1), measure(20.0, 0.2, 0.01)]  # default 3
    assert choose_set(weak).penalty == 2.0
    assert measure(20.0, 0.2, 0.01).specificity == 0.0  # raising the concept's gold is not specificity
    tied = [measure(10.0, -0.3, 0.1), measure(5.0, -0.3, 0.1)]
    assert choose_set(tied).penalty == 10.0


def _naive_greedy(effect, off, *, k, penalty, start=()):
    """The selection written out: from the `start` set, add the neuron that maximises |own sum| -
    penalty * max |contrast sum| among neurons that carry the concept (effect < 0)."""
    chosen = list(start)
    while len(chosen) < k:
        best, best_gain = None, -float("inf")
        for i in range(len(effect)):
            if i in chosen or effect[i] >= 0:
                continue
            own = sum(min(float(effect[j]), 0.0) for j in chosen + [i])
            worst = max(abs(sum(float(off[c, j]) for j in chosen + [i])) for c in range(off.shape[0]))
            gain = abs(own) - penalty * worst
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        chosen.append(best)
    return chosen


def test_the_ranking_keeps_the_measured_set_then_continues_at_the_default_penalty():
    from attribution.specificity import measured_carry_order

    generator = torch.Generator().manual_seed(1)
    effect, off = torch.randn(60, generator=generator), torch.randn(6, 60, generator=generator) * 0.3
    for penalty in (1.0, 2.0, CARRY_PENALTY, 40.0):
        order = measured_carry_order(effect, off, k=20, penalty=penalty, measured=5).tolist()
        head = _naive_greedy(effect, off, k=5, penalty=penalty)
        assert order[:5] == head  # the set the choice measured, as measured
        # past it, the selection continues from that set at the default penalty or the chosen one if higher
        assert order == _naive_greedy(effect, off, k=20, penalty=max(penalty, CARRY_PENALTY), start=head)
    # at the default penalty it is the plain selection
    assert (measured_carry_order(effect, off, k=20, penalty=CARRY_PENALTY, measured=5).tolist()
            == carry_specific_order(effect, off, k=20, penalty=CARRY_PENALTY).tolist())
    low = measured_carry_order(effect, off, k=20, penalty=1.0, measured=5).tolist()
    assert low != carry_specific_order(effect, off, k=20, penalty=1.0).tolist(), "the continuation must differ"
