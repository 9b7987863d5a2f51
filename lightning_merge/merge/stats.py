"""Streaming statistics for matching: float64 sums over tokens, memory O(d²) per feature point.

For every feature point of every recorded group, `PairStatistics` keeps the token count and the float64 sums of x_a,
x_b, x_a², x_b² and x_a x_bᵀ (A's features against B's). The sums combine exactly (`merge`, or an all-reduce of
`state_tensors`), and the Pearson correlation is computed from them at the end; features that are dead or constant
get correlation 0 with everything, never NaN.

`PairStatistics` forms the products of each block of tokens in float64 by default (the statistics pass defaults to
`STATISTICS_DTYPE`); ``products="float32"`` forms them in float32 from features shifted by the block's mean and
scaled to unit range, and adds them, with the shift's and scale's terms, into float64 sums, so rounding neither grows
with the number of tokens nor is amplified by features whose mean dwarfs their spread, and tiny features do not
underflow. They follow
torch's float32 matmul precision (TF32 where the user enables it). ``benchmarks/statistics_precision.py`` measures
the correlation error and whether matching changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from lightning_merge.errors import ConfigError, DataError
from lightning_merge.merge.spec import PermutationSpec, check_same_fields

STAT_FIELDS = ("count", "sum_a", "sum_b", "sq_a", "sq_b", "cross")
# A feature whose variance is below this fraction of its mean square is constant up to rounding: treat it as dead.
DEAD_RELATIVE_VARIANCE = 1e-10
# Bytes of one float64 copy of a block of tokens' features in `update`, by device type: the temporaries (each side's
# copy, its squares) stay this small whatever the batch size. On CPU a 4 MiB block (256 tokens of a 2048-wide FF
# layer) updates as fast as a 4x larger one, and its copies add to the pass's peak, reached while model A's features
# wait for B; on an accelerator every block costs kernel launches, so blocks are large.
UPDATE_BLOCK_BYTES = {"cpu": 4 * 2**20}
UPDATE_BLOCK_BYTES_ACCELERATOR = 256 * 2**20
# float32 products on CPU take blocks of 4x as many tokens (8 MiB per float32 copy of a 2048-wide block): each block
# also does (d_a, d_b) float64 work (casting and adding its products, the shift's terms), which 256 tokens do not
# amortise (2048-wide features: 32 ms per 256 tokens, 14 of them that work; 65 ms per 1024 tokens, 17 of them).
FLOAT32_BLOCK_FACTOR = 4
PRODUCT_DTYPES = {"float64": torch.float64, "float32": torch.float32}
# The statistics pass's default: on the three quickstart pairs float32 products give the same permutations as
# float64 (largest correlation difference 1.4e-7) with updates 1.2-1.8x faster (benchmarks/statistics_precision.py).
STATISTICS_DTYPE = "float32"


def product_dtype(name: str) -> torch.dtype:
    """The dtype of a `PRODUCT_DTYPES` name; one clear error for any other."""
    if name not in PRODUCT_DTYPES:
        raise ConfigError(f"unknown statistics dtype {name!r}; known: {', '.join(PRODUCT_DTYPES)}")
    return PRODUCT_DTYPES[name]


class PairStatistics:
    """Sums over tokens of one feature point, A's features (d_a) against B's (d_b), in float64.

    Args:
        dim_a: feature width of model A at this point.
        dim_b: feature width of model B (default ``dim_a``).
        device: where the sums live (e.g. the features' GPU); float64 everywhere.
        products: dtype name (`PRODUCT_DTYPES`) in which each block's products are formed before they are summed.
    """

    def __init__(
        self, dim_a: int, dim_b: int | None = None, device: torch.device | str | None = None, products: str = "float64"
    ) -> None:
        self.product_dtype = product_dtype(products)
        dim_b = dim_a if dim_b is None else dim_b
        options = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((), **options)
        self.sum_a, self.sq_a = torch.zeros(dim_a, **options), torch.zeros(dim_a, **options)
        self.sum_b, self.sq_b = torch.zeros(dim_b, **options), torch.zeros(dim_b, **options)
        self.cross = torch.zeros(dim_a, dim_b, **options)

    @property
    def device(self) -> torch.device:
        return self.cross.device

    def update(self, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        """Add N tokens: ``x_a`` (N, d_a) and ``x_b`` (N, d_b), row n of both from the same token."""
        if x_a.ndim != 2 or x_b.ndim != 2 or x_a.shape[0] != x_b.shape[0]:
            raise DataError(f"features must be (N, d) with the same N, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
        if (x_a.shape[1], x_b.shape[1]) != tuple(self.cross.shape):
            raise DataError(f"features of width {x_a.shape[1]}/{x_b.shape[1]}, statistics of {tuple(self.cross.shape)}")
        # the hooks that feed this run inside the forward's autocast, which would turn float32 products into bf16
        with torch.autocast(self.device.type, enabled=False):
            rows = self._block_rows()
            for start in range(0, x_a.shape[0], rows):
                self._update_block(x_a[start : start + rows], x_b[start : start + rows])

    def _block_rows(self) -> int:
        block_bytes = UPDATE_BLOCK_BYTES.get(self.device.type, UPDATE_BLOCK_BYTES_ACCELERATOR)
        cpu_float32 = self.product_dtype == torch.float32 and self.device.type == "cpu"
        factor = FLOAT32_BLOCK_FACTOR if cpu_float32 else 1  # measured on CPU only
        return max(1, factor * block_bytes // (8 * max(self.cross.shape)))

    def _update_block(self, x_a: torch.Tensor, x_b: torch.Tensor) -> None:
        a = x_a.to(self.device, self.product_dtype)
        b = x_b.to(self.device, self.product_dtype)
        self.count += a.shape[0]
        if self.product_dtype == torch.float64:
            self.sum_a += a.sum(0)
            self.sum_b += b.sum(0)
            self.sq_a += a.square().sum(0)
            self.sq_b += b.square().sum(0)
            self.cross.addmm_(a.T, b)  # in place: no (d_a, d_b) temporary
        else:
            self._update_block_shifted(a, b)

    def _update_block_shifted(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Low-precision products of the block shifted by its own mean and scaled per feature, both undone in float64.

        For any shift k, sum(x y) = sum((x-k)(y-k')) + k sum(y-k') + sum(x-k) k' + n k k'. Unshifted float32 products
        of features whose mean dwarfs their spread (LayerNorm outliers) would lose the covariance to rounding; and
        features near zero (a LayerNorm gain near 0 leaves values ~1e-32 in real models) would underflow when
        squared, so each feature is divided by its largest shifted magnitude first and the sums multiplied back.
        """
        n = a.shape[0]
        (a, shift_a, scale_a), (b, shift_b, scale_b) = _centred_unit(a), _centred_unit(b)
        # the block's own sums in the products' dtype, like its cross products (a float64 sum would convert the
        # whole block first); the scaled, centred values keep them well inside float32's range
        total_a, total_b = a.sum(0).double() * scale_a, b.sum(0).double() * scale_b
        squares_a = a.square().sum(0).double() * scale_a.square()
        squares_b = b.square().sum(0).double() * scale_b.square()
        self.sum_a += total_a + n * shift_a
        self.sum_b += total_b + n * shift_b
        self.sq_a += squares_a + 2 * shift_a * total_a + n * shift_a.square()
        self.sq_b += squares_b + 2 * shift_b * total_b + n * shift_b.square()
        self.cross += (a.T @ b).double().mul_(scale_a[:, None]).mul_(scale_b[None, :])
        self.cross.addr_(shift_a, total_b).addr_(total_a, shift_b).addr_(shift_a, shift_b, alpha=n)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The sums, by field name; reducing each with SUM across ranks gives the statistics of all tokens."""
        return {name: getattr(self, name) for name in STAT_FIELDS}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace the sums (e.g. with all-reduced ones); shapes must match."""
        for name in STAT_FIELDS:
            current = getattr(self, name)
            if tensors[name].shape != current.shape:
                shape, expected = tuple(tensors[name].shape), tuple(current.shape)
                raise DataError(f"statistic {name} has shape {shape}, expected {expected}")
            setattr(self, name, tensors[name].to(current.device, torch.float64).clone())

    def merge(self, other: PairStatistics) -> None:
        """Add another partial statistic of the same point in place (exact: the sums add)."""
        for name in STAT_FIELDS:
            getattr(self, name).add_(getattr(other, name).to(self.device))

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cross-covariance (d_a, d_b), var_a, var_b, mean square a, mean square b), population form."""
        if self.count.item() == 0:
            raise DataError("no tokens were recorded for these statistics; feed at least one non-padding token")
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        covariance = torch.addr(self.cross, mean_a, mean_b, beta=1 / n.item(), alpha=-1)  # one (d_a, d_b) result
        meansq_a, meansq_b = self.sq_a / n, self.sq_b / n
        return covariance, meansq_a - mean_a.square(), meansq_b - mean_b.square(), meansq_a, meansq_b

    def correlation(self) -> torch.Tensor:
        """Pearson correlation (d_a, d_b); dead or constant features give 0."""
        return correlation_from_moments([self.moments()])

    def cross_moment(self) -> torch.Tensor:
        """E[x_a x_bᵀ] (d_a, d_b), uncentred: what a least-squares map of B's features onto A's needs."""
        if self.count.item() == 0:
            raise DataError("no tokens were recorded for these statistics; feed at least one non-padding token")
        return self.cross / self.count


def _centred_unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x − mean) / scale`` per feature (column), the scale its largest centred magnitude (1 where constant), and
    the mean and scale in float64. The subtraction comes first: it is exact for values near the mean."""
    shift = x.mean(0)
    centred = x - shift
    scale = centred.abs().amax(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return centred.div_(scale), shift.double(), scale.double()  # 1/scale overflows below ~6e-39: divide


def average_moments(moments: Iterable[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The moments (as `PairStatistics.moments` returns them) averaged over points, consumed in place: the first
    point's tensors hold the running sums, so several points cost the memory of one (d_a, d_b) matrix."""
    count, totals = 0, None
    for parts in moments:
        count += 1
        totals = list(parts) if totals is None else [t.add_(p) for t, p in zip(totals, parts)]
    if totals is None:
        raise DataError("no feature points to correlate")
    return tuple(t.div_(count) for t in totals)


def correlation_from_moments(moments: Iterable[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Correlation of the point-averaged covariance: mean(cov) / sqrt(mean(var_a) ⊗ mean(var_b)).

    With one point this is its Pearson correlation; with several it is the paper's residual "all" (covariances
    averaged over points, then normalised). The moments are consumed (`average_moments`).
    """
    return normalise_covariance(*average_moments(moments))


def normalise_covariance(
    covariance: torch.Tensor, var_a: torch.Tensor, var_b: torch.Tensor, meansq_a: torch.Tensor, meansq_b: torch.Tensor
) -> torch.Tensor:
    """The correlation from one set of moments, computed in ``covariance`` (in place); dead features give 0."""
    inverse_std_a = inverse_live_std(var_a, meansq_a)
    inverse_std_b = inverse_live_std(var_b, meansq_b)
    covariance[inverse_std_a == 0] = 0.0  # a non-finite feature's covariances are NaN, and NaN x 0 stays NaN
    covariance[:, inverse_std_b == 0] = 0.0
    return covariance.mul_(inverse_std_a[:, None]).mul_(inverse_std_b[None, :]).clamp_(-1.0, 1.0)


def inverse_live_std(variance: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """1/std per feature, 0 for dead, constant or non-finite ones (so their correlations are 0, not NaN)."""
    dead = (variance <= DEAD_RELATIVE_VARIANCE * mean_square) | ~torch.isfinite(variance)
    return torch.where(dead, 0.0, variance.clamp_min(1e-300).rsqrt())


class MergeStatistics:
    """Statistics for every feature point of the recorded groups of a spec.

    Args:
        spec: the `PermutationSpec` both models share.
        groups: feature sets to keep statistics for, named as in ``spec.points``: a group's name, or one of an
            attention group's projections such as ``attn.0/query`` (default: every group's matching features).
        device: where the float64 sums live.
        products: dtype of each block's products (see `PairStatistics`).
    """

    def __init__(
        self,
        spec: PermutationSpec,
        groups: Iterable[str] | None = None,
        device: torch.device | str | None = None,
        products: str = "float64",
    ) -> None:
        self.spec = spec
        self.groups = list(spec.groups if groups is None else groups)
        unknown = [g for g in self.groups if g not in spec.points]
        if unknown:
            known = ", ".join(spec.points)
            raise ConfigError(f"no feature set {unknown[0]!r} in the {spec.architecture} spec; known: {known}")
        self.points: dict[str, PairStatistics] = {}
        # each model's statistics against itself, where a method reads them (`JointStatistics`' ``own_groups``)
        self.own: tuple[MergeStatistics, MergeStatistics] | None = None
        for group in self.groups:
            for point in spec.points[group]:
                size = spec.feature_size(group)
                self.points.setdefault(point.key, PairStatistics(size, device=device, products=products))

    def update_from_features(self, feats_a: Mapping[str, Mapping[str, torch.Tensor]], feats_b: Mapping) -> None:
        """Add one batch of features, as returned by `FeatureRecorder.pop` for model A and model B."""
        done: set[str] = set()
        for group in self.groups:
            for point in self.spec.points[group]:
                if point.key in done:
                    continue  # a point shared by two groups is counted once
                self.points[point.key].update(feats_a[group][point.key], feats_b[group][point.key])
                done.add(point.key)

    def check_spec(self, spec: PermutationSpec, groups: Iterable[str] = ()) -> None:
        """Raise `ArchitectureMismatch` unless these statistics come from ``spec`` and hold ``groups``."""
        check_same_fields(self.spec.fields, spec.fields, "statistics and models")
        missing = [g for g in groups if g not in self.groups]
        if missing:
            raise ConfigError(
                f"statistics hold no feature set {missing[0]!r}; record it (held: {', '.join(self.groups)})"
            )

    def merge(self, other: MergeStatistics) -> None:
        """Add another partial `MergeStatistics` of the same spec and groups in place."""
        self.check_spec(other.spec, self.groups)
        other.check_spec(self.spec, self.groups)
        for key, stats in self.points.items():
            stats.merge(other.points[key])
        if self.own is not None and other.own is not None:
            for own, others in zip(self.own, other.own):
                own.merge(others)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every sum as ``"{point key}/{field}"`` -> tensor, in a fixed order (the same on every rank).

        These are the live tensors, not copies: an in-place ``all_reduce(SUM)`` of each one combines the ranks'
        statistics directly (`load_state_tensors` is for reduced copies).
        """
        return {f"{key}/{name}": t for key, stats in self.points.items() for name, t in stats.state_tensors().items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace every sum with the tensor of the same key (from `state_tensors`, e.g. after an all-reduce)."""
        for key, stats in self.points.items():
            stats.load_state_tensors({name: tensors[f"{key}/{name}"] for name in STAT_FIELDS})

    def group_points(self, group: str) -> list[PairStatistics]:
        """The statistics of ``group``'s feature points, in spec order."""
        if group not in self.groups:
            raise ConfigError(f"statistics hold no feature set {group!r}; held: {', '.join(self.groups)}")
        return [self.points[point.key] for point in self.spec.points[group]]

    def correlation(self, group: str, points: slice | None = None) -> torch.Tensor:
        """Correlation of ``group`` over the chosen points (default all; e.g. ``slice(0, 1)`` for the first)."""
        chosen = self.group_points(group)[points or slice(None)]
        return correlation_from_moments(stats.moments() for stats in chosen)

    def moments(self, group: str, points: slice | None = None) -> tuple[torch.Tensor, ...]:
        """(covariance, var_a, var_b, mean square a, mean square b) of ``group`` averaged over the chosen points."""
        chosen = self.group_points(group)[points or slice(None)]
        return average_moments(stats.moments() for stats in chosen)

    def cross_moment(self, features: str) -> torch.Tensor:
        """E[x_a x_bᵀ] of a feature set, averaged over its points."""
        chosen = self.group_points(features)
        return sum(stats.cross_moment() for stats in chosen) / len(chosen)

    def own_moments(self, features: str, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ x xᵀ, Σ x, token count) of model A's (``side`` 0) or B's (1) own features of a one-point feature set.

        Raises:
            ConfigError: the pass did not record the models' own statistics of ``features``.
        """
        if self.own is None or features not in self.own[side].groups:
            raise ConfigError(f"statistics hold no own statistics of {features!r}; a method reading them must list "
                              "it in its own_features")
        (point,) = self.own[side].group_points(features)
        return point.cross, point.sum_a, point.count

    @property
    def token_count(self) -> int:
        """Tokens seen (the count of the first point; every point sees every token)."""
        return int(next(iter(self.points.values())).count.item()) if self.points else 0

    def nbytes(self) -> int:
        """Bytes held by the sums (independent of the number of tokens)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())


class JointStatistics:
    """Statistics of N ≥ 2 models at every feature point: one `MergeStatistics` per pair i < j, A = model i.

    Memory is O(N² d²) per point and independent of the number of tokens. Because the sums of permuted features are
    the permuted sums, a joint method re-indexes these pairwise sums for every alignment it tries: no second pass.

    Args:
        spec: the spec every model shares.
        num_models: N.
        groups, device, products: as for `MergeStatistics`.
        own_groups: feature sets of which each model's statistics against itself are kept too (Σ x xᵀ: RegMean's
            Gram matrices); each pair's `MergeStatistics.own` then holds its two models'.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        num_models: int,
        groups: Iterable[str] | None = None,
        device: torch.device | str | None = None,
        products: str = "float64",
        own_groups: Iterable[str] = (),
    ) -> None:
        if num_models < 2:
            raise ConfigError(f"statistics of several models need at least two, got {num_models}")
        self.spec = spec
        self.num_models = num_models
        self.pairs = {(i, j): MergeStatistics(spec, groups, device, products)
                      for i in range(num_models) for j in range(i + 1, num_models)}
        self.groups = self.pairs[(0, 1)].groups
        own_groups = list(own_groups)
        self.own = [MergeStatistics(spec, own_groups, device, products) for _ in range(num_models)] if own_groups \
            else []
        for (i, j), stats in self.pairs.items():
            stats.own = (self.own[i], self.own[j]) if self.own else None

    @classmethod
    def from_pairs(cls, pairs: Mapping[tuple[int, int], MergeStatistics], num_models: int) -> JointStatistics:
        """Joint statistics made of existing pairwise ones (not copies), e.g. a pair merge's one pair (0, 1)."""
        expected = {(i, j) for i in range(num_models) for j in range(i + 1, num_models)}
        if set(pairs) != expected:
            raise ConfigError(f"statistics of {num_models} models need the pairs {sorted(expected)}, "
                              f"got {sorted(pairs)}")
        joint = cls.__new__(cls)
        first = pairs[(0, 1)]
        joint.spec, joint.num_models, joint.groups, joint.pairs = first.spec, num_models, first.groups, dict(pairs)
        owns = [pairs[(0, k)].own for k in range(1, num_models)]
        joint.own = [owns[0][0], *(own[1] for own in owns)] if all(owns) else []
        return joint

    @property
    def point_keys(self) -> list[str]:
        return list(self.pairs[(0, 1)].points)

    def pair(self, i: int, j: int) -> MergeStatistics:
        """The statistics of model i (as A) against model j (as B), i < j."""
        if (i, j) not in self.pairs:
            raise ConfigError(f"no statistics of models ({i}, {j}); pairs are i < j < {self.num_models}")
        return self.pairs[(i, j)]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every sum as ``"{i}-{j}/{point key}/{field}"`` (live tensors, in a fixed order: see `MergeStatistics`)."""
        pairs = {f"{i}-{j}/{key}": t for (i, j), stats in self.pairs.items()
                 for key, t in stats.state_tensors().items()}
        own = {f"{k}-{k}/{key}": t for k, stats in enumerate(self.own) for key, t in stats.state_tensors().items()}
        return pairs | own

    @property
    def token_count(self) -> int:
        return self.pairs[(0, 1)].token_count

    def nbytes(self) -> int:
        return sum(stats.nbytes() for stats in [*self.pairs.values(), *self.own])
