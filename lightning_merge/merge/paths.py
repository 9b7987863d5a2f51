"""Paths between two aligned models other than the straight line: θ(λ) built from θ_A and π(θ_B) (pure functions).

The straight line θ(λ) = (1−λ)θ_A + λπ(θ_B) is `lightning_merge.merge.interpolate.interpolate_state_dicts`. An
`InterpolationPath` changes the merged model along it while keeping both endpoints exactly (λ = 0 is A, λ = 1 is π(B)):

- `RepairPath` (Jordan et al., REPAIR): the line, with each corrected feature (FF pre-activations, attention value
  outputs) rescaled and shifted so that its mean and standard deviation are the interpolation of the endpoints'
  (the statistics of the interpolated model are predicted from the endpoints' correlations).
- `RegMeanPath` (Jin et al., Dataless Knowledge Fusion): every linear layer that reads an aligned group gets the
  weights that best reproduce both models' outputs on their own inputs, weighted (1−λ) and λ:
  W(λ) = ((1−λ) W_A G_A + λ W_B G_B)((1−λ) G_A + λ G_B)⁻¹ with G the (bias-augmented) Gram matrix of the layer's
  inputs, both in A's basis; everything else follows the line.

Parameters are dicts by the model's parameter names (tied aliases included, fused weights whole); a path splits them
through the spec where it works on parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lightning_merge.merge.interpolate import interpolate_state_dicts
from lightning_merge.merge.spec import PermutationSpec

StateDict = Mapping[str, torch.Tensor]
# below this predicted variance (relative to the target's) a feature is left as the line has it: dead features
_DEAD_VARIANCE = 1e-12
_RIDGE = 1e-10  # RegMean's solve: ridge relative to the Gram's mean diagonal


class InterpolationPath(ABC):
    """θ(λ) between A's parameters and B's aligned ones; exact at both endpoints."""

    def at(self, params_a: StateDict, params_b: StateDict, lam: float) -> dict[str, torch.Tensor]:
        """The merged parameters at ``lam`` (A's key order; tied aliases share their source's tensor)."""
        line = interpolate_state_dicts(params_a, params_b, lam)
        if lam in (0, 1):
            return line
        return self._correct(line, params_a, params_b, lam)

    @abstractmethod
    def _correct(self, line: dict[str, torch.Tensor], params_a: StateDict, params_b: StateDict,
                 lam: float) -> dict[str, torch.Tensor]:
        """The line's parameters at an inner ``lam``, corrected."""


@dataclass(frozen=True)
class FeatureMoments:
    """The endpoints' statistics of one set of corrected features, in A's basis.

    Attributes:
        writers: (name in the split state dict, index of its feature axis) of every tensor that writes the
            features: a layer's weight (rows scaled) and bias (scaled and shifted).
        mean_a, mean_b, std_a, std_b: (d,) per feature.
        covariance: (d,) covariance of A's feature i with B's aligned feature i.
    """

    writers: tuple[tuple[str, int], ...]
    mean_a: torch.Tensor
    mean_b: torch.Tensor
    std_a: torch.Tensor
    std_b: torch.Tensor
    covariance: torch.Tensor

    def affine(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) taking the line's feature at ``lam`` to the interpolated mean and standard deviation.

        The line's feature is predicted as (1−λ) x_A + λ x_B of the aligned endpoints' features: its mean is the
        interpolated mean, its variance (1−λ)² σ_A² + λ² σ_B² + 2λ(1−λ) cov(x_A, x_B)."""
        mean, _ = self.target(lam)
        variance = ((1 - lam) * self.std_a) ** 2 + (lam * self.std_b) ** 2 + 2 * lam * (1 - lam) * self.covariance
        return self.affine_to(lam, mean, variance)

    def target(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, standard deviation) the features should have at ``lam``: the endpoints' interpolated."""
        return (1 - lam) * self.mean_a + lam * self.mean_b, (1 - lam) * self.std_a + lam * self.std_b

    def affine_to(self, lam: float, mean: torch.Tensor, variance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) taking features of ``mean`` and ``variance`` to the `target` at ``lam``."""
        target_mean, target_std = self.target(lam)
        variance = variance.to(target_std)
        live = variance > _DEAD_VARIANCE * target_std.square().clamp(min=1e-30)
        scale = torch.where(live, target_std / variance.clamp(min=1e-300).sqrt(), torch.ones_like(target_std))
        return scale, target_mean - scale * mean.to(target_mean)


# (parameters, feature sets) -> feature set -> (mean, variance) of the model with those parameters, in forward order
Measure = Callable[[Mapping[str, torch.Tensor], list[str]], dict[str, tuple[torch.Tensor, torch.Tensor]]]


class RepairPath(InterpolationPath):
    """REPAIR's correction of the line, from the endpoints' feature statistics (`FeatureMoments` per feature set).

    Without ``measure`` the line's feature statistics are predicted from the endpoints' (`FeatureMoments.affine`).
    With it (REPAIR's "exact" variant) they are measured on the merged model itself, one feature set at a time in
    forward order, each measured with the earlier ones already corrected (as REPAIR's reset of BatchNorm statistics
    sees them); the corrections are kept per λ.
    """

    def __init__(self, spec: PermutationSpec, features: Mapping[str, FeatureMoments],
                 measure: Measure | None = None) -> None:
        self.spec = spec
        self.features = dict(features)
        self.measure = measure
        self._measured: dict[float, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def _correct(self, line: dict[str, torch.Tensor], params_a: StateDict, params_b: StateDict,
                 lam: float) -> dict[str, torch.Tensor]:
        if self.measure is None:
            return self._apply(line, {name: moments.affine(lam) for name, moments in self.features.items()})
        if lam not in self._measured:
            self._measured[lam] = self._measure_corrections(line, lam)
        return self._apply(line, self._measured[lam])

    def _measure_corrections(self, line: dict[str, torch.Tensor], lam: float
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        params = line
        while len(corrections) < len(self.features):
            remaining = [name for name in self.features if name not in corrections]
            name, (mean, variance) = next(iter(self.measure(params, remaining).items()))  # the earliest
            corrections[name] = self.features[name].affine_to(lam, mean.cpu(), variance.cpu())
            params = self._apply(line, corrections)
        return corrections

    def _apply(self, line: dict[str, torch.Tensor], corrections: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
        """The line with each corrected feature set's writers rescaled (weights, biases) and shifted (biases)."""
        split = self.spec.split(line)
        for name, (scale, shift) in corrections.items():
            for weight, index in self.features[name].writers:
                tensor = split[weight]
                shape = [1] * tensor.ndim
                shape[index] = -1
                corrected = tensor.double() * scale.to(tensor.device).reshape(shape)
                if tensor.ndim == 1:
                    corrected = corrected + shift.to(tensor.device)
                split[weight] = corrected.to(tensor.dtype)
        return _joined(self.spec, split, line)


@dataclass(frozen=True)
class LayerGrams:
    """A linear layer's input Gram matrices at both endpoints, in A's basis, augmented with the bias's constant
    input (last row and column: Σ x and the token count), off-diagonals already shrunk.

    Attributes:
        index: the weight's input axis (1 for (out, in) weights, 0 for GPT-2's (in, out) Conv1D).
        bias: the layer's bias name in the split state dict, or None.
    """

    index: int
    bias: str | None
    gram_a: torch.Tensor
    gram_b: torch.Tensor


class RegMeanPath(InterpolationPath):
    """RegMean's merge of every linear layer that reads an aligned group (`LayerGrams` per weight name).

    The endpoints are the same at every call of a merge, so each λ's merged layers are solved once and kept (one
    copy of the linear layers per λ of the grid, in their own dtype, on their device)."""

    def __init__(self, spec: PermutationSpec, layers: Mapping[str, LayerGrams]) -> None:
        self.spec = spec
        self.layers = dict(layers)
        self._solved: dict[tuple[float, torch.device], dict[str, torch.Tensor]] = {}

    def _correct(self, line: dict[str, torch.Tensor], params_a: StateDict, params_b: StateDict,
                 lam: float) -> dict[str, torch.Tensor]:
        split = self.spec.split(line)
        key = (lam, next(iter(line.values())).device)
        if key not in self._solved:
            self._solved[key] = self._solve(split, self.spec.split(params_a), self.spec.split(params_b), lam)
        split.update(self._solved[key])
        return _joined(self.spec, split, line)

    def _solve(self, split: Mapping[str, torch.Tensor], split_a: StateDict, split_b: StateDict,
               lam: float) -> dict[str, torch.Tensor]:
        """Every merged layer's weight (and bias) at ``lam``, by name in the split state dict."""
        out = {}
        for name, grams in self.layers.items():
            weight_a, weight_b = (_augmented(side, name, grams) for side in (split_a, split_b))
            merged = (1 - lam) * weight_a + lam * weight_b + self._departure(weight_a, weight_b, grams, lam)
            dtype = split[name].dtype
            if grams.bias is not None:
                out[grams.bias] = merged[:, -1].to(dtype)
                merged = merged[:, :-1]
            out[name] = (merged.T if grams.index == 0 else merged).to(dtype).contiguous()
        return out

    @staticmethod
    def _departure(weight_a: torch.Tensor, weight_b: torch.Tensor, grams: LayerGrams, lam: float) -> torch.Tensor:
        """RegMean's weight minus the line's: the normal equations W G(λ) = (1−λ) W_A G_A + λ W_B G_B rewritten
        for ΔW = W − ((1−λ) W_A + λ W_B), whose right side λ(1−λ)(W_A − W_B)(G_A − G_B) vanishes for equal
        models. A LayerNorm's output satisfies one linear relation per token, so a Gram can be singular; the
        tiny ridge then leaves the line's weights along the directions no input takes."""
        gram = ((1 - lam) * grams.gram_a + lam * grams.gram_b).to(weight_a.device)
        ridge = _RIDGE * gram.diagonal().mean().clamp(min=1e-300)
        regular = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        right = lam * (1 - lam) * (weight_a - weight_b) @ (grams.gram_a - grams.gram_b).to(weight_a.device)
        return torch.linalg.solve(regular, right.mT).mT  # the Gram is symmetric


def _augmented(params: StateDict, name: str, grams: LayerGrams) -> torch.Tensor:
    """The layer's (out, in) weight in float64, with its bias as a last column where it has one."""
    weight = params[name].double()
    weight = weight.T if grams.index == 0 else weight
    if grams.bias is None:
        return weight
    return torch.cat([weight, params[grams.bias].double()[:, None]], dim=1)


def _joined(spec: PermutationSpec, split: dict[str, torch.Tensor], line: Mapping[str, torch.Tensor]) -> dict:
    """The split parameters joined back, in the line's key order, tied aliases pointing at their source again."""
    joined = spec.join(split)
    for alias, source in spec.ties.items():
        if alias in joined and source in joined:
            joined[alias] = joined[source]
    return {name: joined[name] for name in line}
