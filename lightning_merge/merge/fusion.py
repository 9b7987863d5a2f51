"""Fusion methods: merged models better than the straight line between two aligned models (registered methods).

- ``ot[groups=...,reg=...]`` (Imfeld et al., Transformer Fusion with Optimal Transport): per group an entropic
  optimal transport plan (Sinkhorn) between A's and B's features on the correlation cost, attention head-aware
  (heads paired as Head-Perm pairs them, a plan within each pair), one plan for the residual stream. A soft alignment
  (`Transport`), not function-preserving: the merged model is the midpoint between A and B's transported model.
- ``repair[on=...,exact=false]`` (Jordan et al., REPAIR), or ``<alignment>+repair``: keeps another method's
  permutations and corrects the path (`RepairPath`): every FF pre-activation and attention value output of the
  interpolated model gets the interpolation of the endpoints' mean and standard deviation, its own statistics
  predicted from the endpoints' correlations or (``exact=true``) measured on a few batches. Endpoints exact.
- ``regmean[on=...,alpha=...]`` (Jin et al., RegMean), or ``<alignment>+regmean``: keeps another method's alignment
  and merges every linear layer that reads an aligned group by least squares on both models' inputs
  (`RegMeanPath`), from Gram matrices the statistics pass records. Endpoints exact.

The path methods (repair, regmean) fit the alignment they compose with through `FitInputs.alignments_of`, so a
merge that also evaluates that alignment fits it once.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment, Permutation, Transport, needs_folded_norms
from lightning_merge.merge.matching import RESIDUAL_POINTS, head_pairing, match_head_perm
from lightning_merge.merge.method import ACTIVATIONS, STATISTICS, FitInputs, MergeMethod
from lightning_merge.merge.paths import FeatureMoments, InterpolationPath, LayerGrams, RegMeanPath, RepairPath
from lightning_merge.merge.spec import Axis, PermGroup, PermutationSpec
from lightning_merge.merge.stats import MergeStatistics

OT_FUSION = ("Imfeld et al., Transformer Fusion with Optimal Transport, ICLR 2024, https://arxiv.org/abs/2310.05719; "
             "Singh & Jaggi, Model Fusion via Optimal Transport, NeurIPS 2020")
REPAIR = ("Jordan et al., REPAIR: REnormalizing Permuted Activations for Interpolation Repair, ICLR 2023, "
          "https://arxiv.org/abs/2211.08403 (adapted to LayerNorm transformers: FF pre-activations and value outputs)")
REGMEAN = ("Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023, "
           "https://arxiv.org/abs/2212.09849")


def sinkhorn(cost: torch.Tensor, reg: float, max_iterations: int = 1000, tolerance: float = 1e-9) -> torch.Tensor:
    """The entropic optimal transport plan between uniform marginals for ``cost`` (n, n), in the log domain.

    Returns the plan scaled to rows summing to 1 (row i: how A's feature i is made of B's features).
    """
    size = cost.shape[0]
    log_kernel = -cost.double() / reg
    log_marginal = torch.full((size,), -math.log(size), dtype=torch.float64, device=cost.device)
    log_v = torch.zeros_like(log_marginal)
    for _ in range(max_iterations):
        log_u = log_marginal - torch.logsumexp(log_kernel + log_v[None, :], dim=1)
        log_v = log_marginal - torch.logsumexp(log_kernel + log_u[:, None], dim=0)
        rows = torch.logsumexp(log_kernel + log_u[:, None] + log_v[None, :], dim=1)
        if (rows.exp() * size - 1).abs().max() < tolerance:
            break
    plan = (log_kernel + log_u[:, None] + log_v[None, :]).exp()
    return plan / plan.sum(dim=1, keepdim=True)


def head_transport(corr: torch.Tensor, num_heads: int, reg: float, max_iterations: int) -> torch.Tensor:
    """Heads paired as Head-Perm pairs them, then one Sinkhorn plan within each pair: (d, d), zero across heads."""
    head_of_a = head_pairing(match_head_perm(corr, num_heads), num_heads)
    head_dim = corr.shape[0] // num_heads
    plan = torch.zeros(corr.shape, dtype=torch.float64)
    for h, h_b in enumerate(head_of_a.tolist()):
        rows, cols = slice(h * head_dim, (h + 1) * head_dim), slice(h_b * head_dim, (h_b + 1) * head_dim)
        plan[rows, cols] = sinkhorn(1 - corr[rows, cols], reg, max_iterations)
    return plan


class OptimalTransport(MergeMethod):
    """Soft alignment of every group by entropic optimal transport on the activation correlations."""

    reference = OT_FUSION
    summary = "Sinkhorn transport plans on the correlation cost; merged model = midpoint to B's transported model"
    needs = frozenset({STATISTICS})
    function_preserving = False
    permutations_only = False

    @dataclass(frozen=True)
    class Options:
        groups: str = "ff+attn+res"
        reg: float = 0.05  # entropic regulariser, in units of the cost 1 − correlation (which lies in [0, 2])
        max_iterations: int = 1000

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        opts = self.options
        if not (math.isfinite(opts.reg) and opts.reg > 0):
            raise ConfigError(f"method {name!r}: reg={opts.reg} must be a positive number (the entropic "
                              "regulariser; towards 0 the plan becomes Hungarian's permutation), e.g. ot[reg=0.05]")
        if opts.max_iterations < 1:
            raise ConfigError(f"method {name!r}: max_iterations={opts.max_iterations} must be at least 1")
        self.variants = group_variants(name, opts.groups, "transport plan")

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return spec.groups_of_kind(self.variants)

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        statistics = inputs.statistics
        names = inputs.spec.groups_of_kind(self.variants)
        statistics.check_spec(inputs.spec, names)
        futures = {name: inputs.shared(("ot", name, self.variants[inputs.spec.groups[name].kind], self.options),
                                       lambda group=inputs.spec.groups[name]: self._plan(statistics, group))
                   for name in names}
        return {name: future.result() for name, future in futures.items()}

    def _plan(self, statistics: MergeStatistics, group: PermGroup) -> Transport:
        opts = self.options
        if group.kind == "res":
            corr = statistics.correlation(group.name, RESIDUAL_POINTS[self.variants["res"]])
        else:
            corr = statistics.correlation(group.name)
        if group.kind == "attn":
            return Transport(head_transport(corr, group.num_heads, opts.reg, opts.max_iterations))
        return Transport(sinkhorn(1 - corr, opts.reg, opts.max_iterations))


def group_variants(name: str, groups: str, what: str) -> dict[str, str]:
    """Group kind -> variant of a ``groups=`` option of a fusion method, which fits ``what`` for FF layers, attention
    head-aware, and the residual stream from any of its point selections."""
    from lightning_merge.merge.methods import get_method  # the registry imports this module

    variants = getattr(get_method(groups), "variants", None) or {}
    allowed = {"ff": {""}, "attn": {"head_perm"}, "res": set(RESIDUAL_POINTS)}
    bad = [f"{kind}[{variant}]" for kind, variant in variants.items() if variant not in allowed[kind]]
    if not variants or bad:
        raise ConfigError(f"method {name!r}: groups={groups!r} must name group kinds (ff, attn, res[all|first|last]), "
                          f"e.g. ff+attn+res" + (f"; {bad[0]} has no {what}" if bad else ""))
    return variants


class PathMethod(MergeMethod):
    """A method that keeps another method's alignment (``on``) and changes the path between the endpoints."""

    needs_permutations = False  # whether the path reads B's features one by one (then ``on`` must permute)
    changes_path = True

    @dataclass(frozen=True)
    class Options:
        on: str = "ff+attn+res"

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        from lightning_merge.merge.methods import get_method  # the registry imports this module

        self.inner = get_method(self.options.on)
        if self.inner.changes_path:
            raise ConfigError(f"method {name!r}: {self.inner.name!r} already changes the path and paths do not "
                              f"compose; use one of them")
        if getattr(self.inner, "moves_reference", False):
            raise ConfigError(f"method {name!r}: {self.path_kind} keeps model A as it is, which {self.inner.name!r} "
                              "transforms too; use it alone or compose with an alignment of B, e.g. "
                              "ff+attn+res+" + self.path_kind)
        if self.needs_permutations and not self.inner.permutations_only:
            raise ConfigError(f"method {name!r}: {self.path_kind} corrects each of B's features from its own "
                              f"statistics, which {self.inner.name!r} mixes (linear maps or transport); compose it "
                              "with permutations, e.g. ff+attn+res+" + self.path_kind)

    @property
    @abstractmethod
    def path_kind(self) -> str:
        """The name of the path (``repair``, ``regmean``)."""

    @property
    def needs(self) -> frozenset[str]:
        return self.inner.needs | {STATISTICS}

    @property
    def function_preserving(self) -> bool:
        return self.inner.function_preserving  # the path keeps both endpoints

    @property
    def permutations_only(self) -> bool:
        return self.inner.permutations_only

    @property
    def learnable_start(self) -> bool:
        return False  # a learned alignment starts from an alignment, not from a path

    def check_spec(self, spec: PermutationSpec) -> None:
        self.inner.check_spec(spec)

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return self.inner.statistics_features(spec)

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        return inputs.alignments_of(self.inner)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path_kind}


class Repair(PathMethod):
    """REPAIR on top of a permutation alignment: the path's FF pre-activations and value outputs renormalised."""

    reference = REPAIR
    summary = "the line with each FF pre-activation and value output renormalised to the endpoints' interpolation"
    path_kind = "repair"
    needs_permutations = True

    @dataclass(frozen=True)
    class Options:
        on: str = "ff+attn+res"
        exact: bool = False  # measure the merged model's features (on `batches` statistics batches) per λ
        batches: int = 8

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        if self.options.batches < 1:
            raise ConfigError(f"method {name!r}: batches={self.options.batches} must be at least 1")

    @property
    def needs(self) -> frozenset[str]:
        return super().needs | ({ACTIVATIONS} if self.options.exact else frozenset())

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return list(dict.fromkeys([*self.inner.statistics_features(spec), *_repaired(spec)]))

    def fit_path(self, inputs: FitInputs, alignments: Mapping[str, Alignment]) -> InterpolationPath:
        statistics, spec = inputs.statistics, inputs.spec
        statistics.check_spec(spec, list(_repaired(spec)))
        features = {name: _feature_moments(statistics, spec, name, alignments) for name in _repaired(spec)}
        if not self.options.exact:
            return RepairPath(spec, features)
        activations, batches = inputs.activations, self.options.batches
        return RepairPath(spec, features, lambda params, names: activations(params, names, batches))


def _repaired(spec: PermutationSpec) -> dict[str, str]:
    """Feature set -> its group, of every feature set REPAIR corrects: FF pre-activations, attention values."""
    out = {}
    for name, group in spec.groups.items():
        if group.kind == "ff":
            out[f"{name}/pre"] = name
        elif group.kind == "attn":
            out[f"{name}/value"] = name
    return out


def _feature_moments(statistics: MergeStatistics, spec: PermutationSpec, features: str,
                     alignments: Mapping[str, Alignment]) -> FeatureMoments:
    group = spec.groups[features.split("/")[0]]
    alignment = alignments.get(group.name, Permutation(torch.arange(group.size)))
    if not isinstance(alignment, Permutation):
        raise ConfigError(f"repair needs group {group.name!r} permuted, got a {alignment.kind} alignment")
    perm = alignment.perm.cpu()
    (point,) = statistics.group_points(features)
    covariance, var_a, var_b, _, _ = point.moments()
    mean_a, mean_b = point.sum_a / point.count, point.sum_b / point.count
    std_a, std_b = var_a.clamp(min=0).sqrt(), var_b.clamp(min=0).sqrt()
    writers = tuple((name, index) for name, index in spec.group_axes[group.name]
                    if _writes(spec.axes[name][index], name, spec))
    return FeatureMoments(writers, mean_a.cpu(), mean_b[perm].cpu(), std_a.cpu(), std_b[perm].cpu(),
                          covariance.cpu()[torch.arange(group.size), perm])


def _writes(axis: Axis, name: str, spec: PermutationSpec) -> bool:
    """Whether a weight's axis writes the corrected features: FF rows, value rows (not queries, keys, aliases)."""
    return axis.role == "out" and axis.subspace in ("", "vo") and name not in spec.ties


class RegMean(PathMethod):
    """RegMean on top of any alignment that keeps LayerNorms unfolded: linear layers merged by least squares."""

    reference = REGMEAN
    summary = "every linear layer reading an aligned group merged by least squares on both models' input Grams"
    path_kind = "regmean"

    @dataclass(frozen=True)
    class Options:
        on: str = "ff+attn+res"
        alpha: float = 0.9  # off-diagonal Gram entries scaled by alpha (RegMean's regulariser; 1: plain least squares)

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        if not 0 <= self.options.alpha <= 1:
            raise ConfigError(f"method {name!r}: alpha={self.options.alpha} must lie in [0, 1] (0: diagonal Grams, "
                              "a weighted average; 1: plain least squares), e.g. regmean[alpha=0.9]")

    def own_features(self, spec: PermutationSpec) -> list[str]:
        return list(dict.fromkeys(features for _, features in spec.inputs.values()))

    def fit_path(self, inputs: FitInputs, alignments: Mapping[str, Alignment]) -> InterpolationPath:
        if needs_folded_norms(alignments):
            raise ConfigError(f"method {self.name!r}: regmean merges layers on the inputs recorded with the "
                              "LayerNorm gains in place, which res[orthogonal] folds away; use res or res[all]")
        statistics, spec = inputs.statistics, inputs.spec
        layers = {}
        for weight, (index, features) in spec.inputs.items():
            bias = _bias_of(spec, weight)
            grams = [_gram(statistics, features, side, bias is not None) for side in (0, 1)]
            axis = spec.axes[weight][index]
            moved = _into_a(grams[1], axis, alignments, spec.groups[axis.group].size)
            layers[weight] = LayerGrams(index, bias, *(_shrunk(g, self.options.alpha) for g in (grams[0], moved)))
        return RegMeanPath(spec, layers)


def _bias_of(spec: PermutationSpec, weight: str) -> str | None:
    name = weight.replace(".weight", ".bias", 1)
    return name if name != weight and name in spec.axes else None


def _gram(statistics: MergeStatistics, features: str, side: int, with_bias: bool) -> torch.Tensor:
    gram, total, count = (t.double().cpu() for t in statistics.own_moments(features, side))
    if not with_bias:
        return gram
    top = torch.cat([gram, total[:, None]], dim=1)
    return torch.cat([top, torch.cat([total, count.reshape(1)])[None, :]], dim=0)


def _into_a(gram: torch.Tensor, axis: Axis, alignments: Mapping[str, Alignment], size: int) -> torch.Tensor:
    """B's Gram of a group's ``size`` features, x ↦ M x of B's alignment applied on both sides (a bias row and
    column after them stay as they are: the constant input is not aligned)."""
    alignment = alignments.get(axis.group)
    if alignment is None:
        return gram
    features = Axis(axis.group, "out", axis.subspace)
    moved = gram.clone()
    moved[:size, :] = alignment.apply(gram[:size, :], 0, features)
    moved[:, :size] = alignment.apply(moved[:, :size], 1, features)
    return moved


def _shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's regularised Gram: off-diagonal entries scaled by ``alpha``."""
    diagonal = torch.diag(torch.diagonal(gram))
    return alpha * gram + (1 - alpha) * diagonal
