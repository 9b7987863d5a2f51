"""ZipIt! (Stoica et al., ICLR 2024): N models' features merged greedily — across models and within one — into one
model of the same size (``zip[groups=...,alpha=...,beta=...]``).

Per group, the correlation of all N·d features (every model's against every model's, its own included) drives a
greedy agglomeration: the two most correlated clusters merge until d remain; a merged cluster's correlation with
another is the smaller of its parts' (complete linkage) times ``alpha``, so grown clusters merge less readily; merges
of two clusters of one model's features only are limited to a ``beta`` share of that model's merges (should these
rules leave no allowed merge before d clusters remain, as with three models or more they can, the rest are chosen by
mean correlation without them). Merged feature
= mean of its cluster (merge matrix); each original feature reads its cluster's value (unmerge matrix). Attention is
head-aware: heads are paired with model 0's as Head-Perm pairs them and each head is zipped on its own, so no
feature moves across heads. Every model gets a `Zip` alignment; their average is the merged model.

Partial zipping (``zip[layers=k]``): only the embeddings, the first k layers and the stream they leave are zipped
(the stream's correlation from the points before layer k only); the merged model is then two-headed — that trunk,
and every model's own layers k.. and heads reading the trunk's stream unmerged into their basis, their predictions
mixed (`lightning_merge.merge.two_headed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment, Zip
from lightning_merge.merge.fusion import group_variants
from lightning_merge.merge.joint_methods import JointInputs, JointMethod
from lightning_merge.merge.matching import RESIDUAL_POINTS, head_pairing, match_head_perm
from lightning_merge.merge.method import STATISTICS
from lightning_merge.merge.spec import PermGroup, PermutationSpec
from lightning_merge.merge.stats import JointStatistics, normalise_covariance

ZIPIT = ("Stoica et al., ZipIt! Merging Models from Different Tasks without Training, ICLR 2024, "
         "https://arxiv.org/abs/2305.03053")


def zip_features(corr: torch.Tensor, num_models: int, alpha: float, beta: float) -> torch.Tensor:
    """ZipIt!'s greedy merge of N·d features (N blocks of d, model by model) into d clusters.

    Args:
        corr: (N·d, N·d) correlation of every model's features with every model's.
        num_models: N.
        alpha: factor on a merged cluster's positive correlations (complete linkage); 0: unscaled, but a cluster
            never takes a second feature of a model it holds (N = 2: clusters stop at one feature of each model).
        beta: share of a model's (N−1)·d/N merges that may join two clusters of its own features only.

    Returns:
        (N·d, d) 0/1 membership: column c marks the features of merged feature c.
    """
    zipper = _Zipper(corr.double(), num_models, alpha, beta)
    for _ in range(corr.shape[0] - corr.shape[0] // num_models):
        zipper.merge(*zipper.best_pair())
    return zipper.members[:, zipper.active]


class _Zipper:
    """The state of one greedy zip: clusters (membership columns), their linkage, and each model's budget.

    Each row's best allowed partner is kept (``row_best``/``row_arg``) and only the rows a merge touches are searched
    again, so a step costs O(N·d) instead of a search of all (N·d)² pairs; the pair chosen is the same (the first
    of the largest in row-major order)."""

    def __init__(self, corr: torch.Tensor, num_models: int, alpha: float, beta: float) -> None:
        total = corr.shape[0]
        size = total // num_models
        self.corr, self.alpha = corr, alpha
        self.sims = corr.clone().fill_diagonal_(-torch.inf)
        self.members = torch.eye(total, dtype=torch.float64)
        self.active = torch.ones(total, dtype=torch.bool)
        self.holds = torch.arange(total)[:, None] // size == torch.arange(num_models)[None, :]  # cluster -> models
        self.origin = torch.arange(total) // size  # the one model a cluster's features come from; -1: several
        self.budget = torch.full((num_models,), int(beta * (total - size) / num_models + 1e-9))
        # pairs of one model's own clusters after its budget is spent: kept apart from the linkage, so a mixed
        # cluster's correlations never inherit the ban
        self.blocked = torch.zeros(total, total, dtype=torch.bool)
        for model in range(num_models):
            self._close_if_spent(model)
        self.row_best, self.row_arg = self._search(torch.arange(total))

    def _search(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each of ``rows``' largest allowed linkage and its first column."""
        allowed = self.sims[rows].masked_fill(self.blocked[rows], -torch.inf)
        columns = allowed.argmax(1)  # argmax, not max: it promises the first of equal maxima
        return allowed.gather(1, columns[:, None])[:, 0], columns

    def _search_again(self, rows: torch.Tensor) -> None:
        self.row_best[rows], self.row_arg[rows] = self._search(rows)

    def best_pair(self) -> tuple[int, int]:
        row = int(torch.argmax(self.row_best))
        if self.row_best[row] == -torch.inf:  # the budget and linkage leave no merge: go on without them
            self.sims = _average_linkage(self.corr, self.members, self.active)
            self.blocked.fill_(False)
            self.budget.fill_(self.corr.shape[0])
            self._search_again(torch.arange(self.corr.shape[0]))
            row = int(torch.argmax(self.row_best))
        first, second = sorted((row, int(self.row_arg[row])))
        return first, second

    def merge(self, first: int, second: int) -> None:
        self.members[:, first] += self.members[:, second]
        self.holds[first] |= self.holds[second]
        self.active[second] = False
        linked = torch.minimum(self.sims[first], self.sims[second])
        if self.alpha > 0:  # a grown cluster merges less readily; a negative correlation is not raised by it
            linked = torch.where(linked > 0, linked * self.alpha, linked)
        else:
            linked[(self.holds & self.holds[first]).any(1)] = -torch.inf
        self.sims[first, :], self.sims[:, first] = linked, linked
        self.sims[second, :], self.sims[:, second] = -torch.inf, -torch.inf
        self.sims[first, first] = -torch.inf
        closed = False
        if self.origin[first] >= 0 and self.origin[first] == self.origin[second]:
            self.budget[self.origin[first]] -= 1
            closed = self._close_if_spent(int(self.origin[first]))
        else:
            self.origin[first] = -1
            self.blocked[first, :], self.blocked[:, first] = False, False
        self._update_rows(first, second, everything=closed)

    def _update_rows(self, first: int, second: int, everything: bool) -> None:
        """Keep each row's best partner: search again the rows that lost it (it was ``first`` or ``second``) and
        the two merged ones; elsewhere only column ``first`` changed, and it wins where it is now larger (or as
        large and earlier)."""
        if everything:  # a budget was spent: many pairs were banned at once
            self._search_again(torch.arange(self.corr.shape[0]))
            return
        column = self.sims[:, first].masked_fill(self.blocked[:, first], -torch.inf)
        wins = (column > self.row_best) | ((column == self.row_best) & (self.row_arg > first))
        self.row_best[wins], self.row_arg[wins] = column[wins], first
        lost = (self.row_arg == first) & ~wins | (self.row_arg == second)
        lost[first] = lost[second] = True
        self._search_again(lost.nonzero().flatten())

    def _close_if_spent(self, model: int) -> bool:
        """A model out of budget merges no two clusters made of its own features only; True if it just closed."""
        if self.budget[model] <= 0:
            own = (self.origin == model) & self.active
            self.blocked |= own[:, None] & own[None, :]
            return True
        return False


def _average_linkage(corr: torch.Tensor, members: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Mean correlation between the members of every two active clusters (−inf for inactive ones and itself)."""
    sizes = members.sum(0)
    sims = (members.T @ corr @ members) / (sizes[:, None] * sizes[None, :]).clamp(min=1)
    sims[~active, :] = -torch.inf
    sims[:, ~active] = -torch.inf
    return sims.fill_diagonal_(-torch.inf)


def merge_and_unmerge(members: torch.Tensor, num_models: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per model, (N × its block of the merge matrix, its block of the unmerge matrix): what `Zip` holds."""
    merge = (members / members.sum(0, keepdim=True)).T  # (d, N·d): merged feature = mean of its cluster
    size = members.shape[1]
    return [(num_models * merge[:, k * size:(k + 1) * size], members[k * size:(k + 1) * size])
            for k in range(num_models)]


class ZipIt(JointMethod):
    """ZipIt! on every group it names; N ≥ 2 models, each zipped into the merged model's features."""

    reference = ZIPIT
    summary = "greedy merge of all models' features (within models too); merged model = average of zipped models"
    needs = frozenset({STATISTICS})
    function_preserving = False
    permutations_only = False
    moves_reference: ClassVar[bool] = True

    @dataclass(frozen=True)
    class Options:
        groups: str = "ff+attn+res"
        alpha: float = 0.3  # complete-linkage factor of a grown cluster (ZipIt!'s α)
        beta: float = 0.125  # share of a model's merges that may stay within it (ZipIt!'s β)
        layers: int = -1  # zip the first this many layers, each model keeps its own rest (-1: every layer)

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        opts = self.options
        if not 0 <= opts.beta <= 1:
            raise ConfigError(f"method {name!r}: beta={opts.beta} asks for more within-model merges than a model "
                              "has merges; it is the share of them, in [0, 1], e.g. zip[beta=0.125]")
        if not 0 <= opts.alpha <= 1:
            raise ConfigError(f"method {name!r}: alpha={opts.alpha} must lie in [0, 1], e.g. zip[alpha=0.3]")
        if opts.layers < -1:
            raise ConfigError(f"method {name!r}: layers={opts.layers} must be the number of layers to zip (0 or "
                              "more; the rest stay each model's own), or -1 for every layer")
        self.variants = group_variants(name, opts.groups, "zip")
        if opts.layers != -1 and "res" not in self.variants:
            raise ConfigError(f"method {name!r}: a partial zip hands its stream to each model's own layers through "
                              "the residual stream's unmerge; include res, e.g. zip[groups=ff+attn+res,layers=1]")

    def check_spec(self, spec: PermutationSpec) -> None:
        layers = self.options.layers
        if layers > spec.num_layers:
            raise ConfigError(f"method {self.name!r}: layers={layers} but the models have {spec.num_layers} layers; "
                              f"zip at most {spec.num_layers} (or -1 for all)")
        if self.split_layer(spec) is not None and spec.stream_points_before(layers) == 0:
            raise ConfigError(f"method {self.name!r}: layers={layers}: {spec.family.name} records no stream before "
                              "its first layer (no embeddings LayerNorm) to zip; zip at least one layer")

    def split_layer(self, spec: PermutationSpec) -> int | None:
        layers = self.options.layers
        return None if layers in (-1, spec.num_layers) else layers

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return self._zipped_groups(spec)

    def own_features(self, spec: PermutationSpec) -> list[str]:
        return self._zipped_groups(spec)

    def _zipped_groups(self, spec: PermutationSpec) -> list[str]:
        """The groups it zips: with ``layers`` set, those of the trunk (its layers' and the stream)."""
        split = self.split_layer(spec)
        return [name for name in spec.groups_of_kind(self.variants)
                if split is None or spec.groups[name].kind == "res" or int(name.split(".")[1]) < split]

    def fit_joint(self, inputs: JointInputs) -> list[dict[str, Alignment]]:
        statistics = inputs.statistics
        out: list[dict[str, Alignment]] = [{} for _ in range(inputs.num_models)]
        for name in self._zipped_groups(inputs.spec):
            group = inputs.spec.groups[name]
            corr = _joint_correlation(statistics, group, self._points(inputs.spec, group))
            members = (_zip_heads(corr, group, inputs.num_models, self.options) if group.kind == "attn"
                       else zip_features(corr, inputs.num_models, self.options.alpha, self.options.beta))
            for alignments, (merge, unmerge) in zip(out, merge_and_unmerge(members, inputs.num_models)):
                alignments[name] = Zip(merge, unmerge)
        return out

    def _points(self, spec: PermutationSpec, group: PermGroup) -> slice | None:
        """The stream's points its residual variant reads; a partial zip reads the trunk's only."""
        if group.kind != "res":
            return None
        split = self.split_layer(spec)
        if split is None:
            return RESIDUAL_POINTS[self.variants["res"]]
        chosen = range(spec.stream_points_before(split))[RESIDUAL_POINTS[self.variants["res"]]]
        return slice(chosen.start, chosen.stop)


def _joint_correlation(statistics: JointStatistics, group: PermGroup, points: slice | None) -> torch.Tensor:
    """(N·d, N·d) correlation of every model's features of ``group`` with every model's (own statistics on the
    diagonal blocks), covariances averaged over the group's points."""
    if len(statistics.own) != statistics.num_models:
        raise ConfigError(f"zip needs each model's own statistics of {group.name!r}; record them (own_features)")
    n, size = statistics.num_models, group.size
    covariance = torch.zeros(n * size, n * size, dtype=torch.float64)
    variance, mean_square = torch.zeros(n * size, dtype=torch.float64), torch.zeros(n * size, dtype=torch.float64)
    for k in range(n):
        cov, var, _, msq, _ = statistics.own[k].moments(group.name, points)
        block = slice(k * size, (k + 1) * size)
        covariance[block, block], variance[block], mean_square[block] = cov.cpu(), var.cpu(), msq.cpu()
        for j in range(k + 1, n):
            cross = statistics.pair(k, j).moments(group.name, points)[0].cpu()
            other = slice(j * size, (j + 1) * size)
            covariance[block, other], covariance[other, block] = cross, cross.T
    return normalise_covariance(covariance, variance, variance, mean_square, mean_square)


def _zip_heads(corr: torch.Tensor, group: PermGroup, num_models: int, options: Any) -> torch.Tensor:
    """Head-aware zip: every model's heads paired with model 0's (Head-Perm), each head zipped on its own."""
    size, heads, head_dim = group.size, group.num_heads, group.head_dim
    paired = [torch.arange(heads)] + [
        head_pairing(match_head_perm(corr[:size, k * size:(k + 1) * size], heads), heads)
        for k in range(1, num_models)]
    members = torch.zeros(num_models * size, size, dtype=torch.float64)
    for h in range(heads):
        rows = torch.cat([k * size + int(paired[k][h]) * head_dim + torch.arange(head_dim)
                          for k in range(num_models)])
        block = zip_features(corr[rows][:, rows], num_models, options.alpha, options.beta)
        members[rows, h * head_dim:(h + 1) * head_dim] = block
    return members
