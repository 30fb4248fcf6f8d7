"""What every all-neuron scoring method returns, so that the actor can turn any of them into atlas rows.

A method that scores every neuron of the model at once (AtP, NeurGrad, integrated gradients,
NeuronLens, selectivity probing) returns one `NeuronScores` for all layers; the actor slices out the
layers of its shard. The exact ablation engine (NEAT) keeps its own per-shard interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

# Method-specific statistics that have their own nullable float32 column in the atlas
# (storage/schema.py keeps the same names); a method leaves the ones it does not compute null.
EXTRA_COLUMNS: tuple[str, ...] = (
    "act_mean",      # NeuronLens / selectivity: mean activation over the concept's examples
    "act_std",       # NeuronLens / selectivity: its standard deviation
    "range_low",     # NeuronLens: the concept's activation range, mu - tau * sigma
    "range_high",    #             and mu + tau * sigma
    "selectivity",   # selectivity probing: (mean_pos - mean_neg) / pooled std
    "consistency",   # selectivity probing: share of positives above the neuron's threshold
)


@dataclass(frozen=True)
class NeuronScores:
    """One method's values for every neuron: each tensor is [n_layers, d_mlp] float32 on the CPU.

    `effect` is the signed value the method estimates (an ablation effect in nats, a gradient
    attribution, a selectivity); `score` is what ranks neurons (|effect| unless the method says
    otherwise); `activation` is the neuron's activation on the method's own input, documented per
    method; `extra` maps names from EXTRA_COLUMNS to more statistics.
    """

    effect: Tensor
    activation: Tensor
    score: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(self.effect.shape)
        tensors = {"activation": self.activation, **self.extra}
        if self.score is not None:
            tensors["score"] = self.score
        for name, tensor in tensors.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"NeuronScores.{name} has shape {tuple(tensor.shape)}, expected {shape}")
        unknown = sorted(set(self.extra) - set(EXTRA_COLUMNS))
        if unknown:
            raise ValueError(f"NeuronScores.extra has unknown columns {unknown}: expected some of {EXTRA_COLUMNS}")

    @property
    def ranking_score(self) -> Tensor:  # [n_layers, d_mlp]
        return self.effect.abs() if self.score is None else self.score
