"""The two modules of a merge: `PairModule` (statistics pass) and `InterpolationModule` (barrier curves).

`PairModule`'s validation loop runs models A and B on the same batches, so the `MergeCallback`'s hooks see both.
`InterpolationModule` adds a test loop that evaluates every batch at every (method, λ) with the parameters
θ(λ) = (1−λ)θ_A + λπ(θ_B) passed through ``torch.func.functional_call``: no model is rebuilt or copied per point.
π is each method's alignment of B (`lightning_merge.merge.alignment`), whatever its kind.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.func import functional_call
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)

from lightning_merge.errors import ArchitectureMismatch, ConfigError, DataError, UnknownNameError
from lightning_merge.merge.alignment import Alignment, apply_alignments, check_alignments, needs_folded_norms
from lightning_merge.merge.families import CAUSAL_LM, MASKED_LM, RESIDUAL, SEQUENCE_CLASSIFICATION, model_inputs
from lightning_merge.merge.fold import fold_layer_norms, untied_by_folding
from lightning_merge.merge.interpolate import (
    check_lambdas,
    combine_state_dicts,
    interpolate_state_dicts,
    loss_barrier,
    midpoint_figures,
)
from lightning_merge.merge.joint_curves import JointPlan, Pair, check_simplex_steps
from lightning_merge.merge.paths import InterpolationPath
from lightning_merge.merge.spec import PermutationSpec, spec_for_model, spec_for_pair
from lightning_merge.merge.two_headed import two_headed_outputs
from lightning_merge.models import load_pretrained
from lightning_merge.objectives import CausalLMObjective, MaskedLMObjective, SequenceClassificationObjective


@dataclass(frozen=True)
class Task:
    """What kind of model a merge loads (an Auto class: the checkpoint's family picks the class) and how its loss
    is evaluated."""

    model_class: type
    objective_class: type[nn.Module]


TASKS: dict[str, Task] = {
    MASKED_LM: Task(AutoModelForMaskedLM, MaskedLMObjective),
    CAUSAL_LM: Task(AutoModelForCausalLM, CausalLMObjective),
    SEQUENCE_CLASSIFICATION: Task(AutoModelForSequenceClassification, SequenceClassificationObjective),
}

DEFAULT_LAMBDAS = tuple(round(0.1 * i, 10) for i in range(11))


def _model_paths(model_a: str | None, model_b: str | None, models: Sequence[str] | None) -> list[str]:
    """The merge's model paths: ``models`` with ``model_a`` and ``model_b``, where given, as its first two (so a
    config's ``models`` and the two-model flags combine); one clear error for fewer than two or a repeated one."""
    paths = [str(path) for path in models or []]
    for k, path in enumerate((model_a, model_b)):
        if path is None:
            continue
        if k > len(paths):
            raise ConfigError("model_b is given without model_a; give model_a too, or models: [A, B, ...]")
        paths[k:k + 1] = [str(path)]
    if len(paths) < 2:
        raise ConfigError(f"a merge needs at least two models (models: [A, B, ...], or model_a and model_b), got "
                          f"{len(paths)}: {paths}")
    seen: dict[str, int] = {}
    for k, path in enumerate(paths):
        key = str(Path(path).resolve()) if Path(path).exists() else path
        if key in seen:
            raise ConfigError(f"models[{k}] repeats models[{seen[key]}] ({path}); give each model once")
        seen[key] = k
    return paths


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError(f"unknown merge task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


class PairModule(pl.LightningModule):
    """The models of a merge, all of one architecture: A and B, or N ≥ 2 given as ``models``; validation runs every
    model's base model on each batch (for feature hooks).

    Args:
        model_a: HF directory, our ``.ckpt`` or hub id of the reference model (keeps its neuron order).
        model_b: the model that gets aligned into A's basis.
        task: ``masked_lm``, ``causal_lm`` or ``sequence_classification``; the models' family (BERT, RoBERTa,
            DistilBERT, RoBERTa-PreLayerNorm, GPT-2) is read from their configs.
        allow_nonfinite: load models with NaN or infinite weights instead of refusing them (their curves will not
            be finite, and the merge stops at the first non-finite loss).
        models: N ≥ 2 models, the first the reference; ``model_a`` and ``model_b``, where given, replace its first
            two (``[A, B]`` is the same merge as ``model_a: A, model_b: B``).
    """

    def __init__(
        self,
        model_a: str | None = None,
        model_b: str | None = None,
        task: str = "masked_lm",
        allow_nonfinite: bool = False,
        models: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_paths = _model_paths(model_a, model_b, models)
        model_class = get_task(task).model_class
        loaded = [load_pretrained(path, model_class, allow_nonfinite).eval() for path in self.model_paths]
        self.model_a, self.model_b = loaded[:2]
        self.more_models = nn.ModuleList(loaded[2:])
        self.spec: PermutationSpec = self._shared_spec()
        self._check_vocab()
        self.statistics_run_heads = False

    @property
    def all_models(self) -> list[PreTrainedModel]:
        """Every model, the reference (A) first."""
        return [self.model_a, self.model_b, *self.more_models]

    @property
    def num_models(self) -> int:
        return len(self.model_paths)

    def _describe(self, k: int) -> str:
        if self.num_models == 2:
            return ("model_a", "model_b")[k]
        return f"models[{k}] ({self.model_paths[k]})"

    def _shared_spec(self) -> PermutationSpec:
        if self.num_models == 2:
            return spec_for_pair(self.model_a, self.model_b)
        spec = spec_for_model(self.model_a)
        for k, model in enumerate(self.all_models[1:], start=1):
            spec.check_compatible(spec_for_model(model), f"{self._describe(0)} and {self._describe(k)}")
        return spec

    def _check_vocab(self) -> None:
        vocab = self.model_a.config.vocab_size
        for k, model in enumerate(self.all_models[1:], start=1):
            if model.config.vocab_size != vocab:
                raise ArchitectureMismatch(f"{self._describe(0)} and {self._describe(k)} differ in vocab_size: "
                                           f"{vocab} vs {model.config.vocab_size}")

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise `ArchitectureMismatch` unless ``tokenizer`` (if any) has the models' vocabulary size."""
        if tokenizer is not None and len(tokenizer) != self.model_a.config.vocab_size:
            raise ArchitectureMismatch(
                f"the data's tokenizer has {len(tokenizer)} tokens but the models' vocab_size is "
                f"{self.model_a.config.vocab_size}; point the datamodule's tokenizer at model_a's directory"
            )

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        inputs = model_inputs(batch, self.spec.family)
        for model in self.all_models:
            # the heads make features only for methods that read a head's input (the MergeCallback says)
            (model if self.statistics_run_heads else model.base_model)(**inputs)

    def configure_optimizers(self) -> None:
        return None


class CurveSums(torchmetrics.Metric):
    """Summed loss and item count per (method, λ); sums reduce exactly across DDP ranks."""

    full_state_update = False

    def __init__(self, num_methods: int, num_lambdas: int) -> None:
        super().__init__()
        shape = (num_methods, num_lambdas)
        self.add_state("loss_sum", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, method: int, lam: int, loss_sum: Tensor, count: Tensor) -> None:
        self.loss_sum[method, lam] += loss_sum.detach().double()
        self.count[method, lam] += count.detach().double()

    def compute(self) -> Tensor:
        return self.loss_sum / self.count.clamp(min=1)  # (M, L) mean loss


class InterpolationModule(PairModule):
    """Evaluate the loss (and task metrics) of θ(λ) for every merge method along a λ grid, in the test loop.

    Args:
        model_a: reference model (see `PairModule`).
        model_b: model to align to A.
        task: see `PairModule`.
        lambdas: the interpolation grid; must contain 0 and 1 and stay within [0, 1].
        allow_nonfinite: see `PairModule`.
        models: N ≥ 2 models instead of model_a and model_b (see `PairModule`). With N > 2 every method is
            evaluated on every pair's line, at each model and the N-way average in its common basis, and for N = 3
            on a triangle grid (`lightning_merge.merge.joint_curves`).
        simplex_steps: divisions per edge of the N = 3 triangle grid (0: no grid).
    """

    def __init__(
        self,
        model_a: str | None = None,
        model_b: str | None = None,
        task: str = "masked_lm",
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        allow_nonfinite: bool = False,
        models: list[str] | None = None,
        simplex_steps: int = 6,
    ) -> None:
        super().__init__(model_a, model_b, task, allow_nonfinite, models)
        self.lambdas = [float(x) for x in lambdas]
        check_lambdas(self.lambdas)
        self.objective = get_task(task).objective_class(self.model_a)
        self.methods: dict[str, dict[str, Alignment]] = {}
        self.curve_sums: CurveSums | None = None
        self.task_metrics = nn.ModuleList()
        self.results: dict | None = None
        self._folded_states: tuple[torch.device, list[tuple]] | None = None
        self.simplex_steps = simplex_steps
        check_simplex_steps(simplex_steps)  # a bad grid fails at construction, not after the statistics pass
        self.joint_alignments: dict[str, list[dict[str, Alignment]]] = {}  # N > 2: every model into model 0's basis
        self.pair_alignments: dict[str, dict[Pair, dict[str, Alignment]]] = {}  # N > 2: pairwise methods' own fits
        self.plan: JointPlan | None = None
        self.paths: dict[str, InterpolationPath] = {}  # methods whose path is not the straight line
        self.references: dict[str, dict[str, Alignment]] = {}  # methods that transform model A too
        self.endpoint_sums: CurveSums | None = None  # models A and B as they are (pair merges)
        self.splits: dict[str, int] = {}  # methods whose merged model is a trunk with every model's own tail

    def set_methods(
        self,
        alignments: Mapping[str, Mapping[str, Alignment]],
        task_metrics: torchmetrics.MetricCollection | None = None,
        paths: Mapping[str, InterpolationPath] | None = None,
        references: Mapping[str, Mapping[str, Alignment]] | None = None,
        splits: Mapping[str, int] | None = None,
    ) -> None:
        """Methods to evaluate: name -> group -> alignment of model B (empty mapping: vanilla averaging); for the
        methods that change it, name -> path between A and aligned B (default: the straight line); for the methods
        that transform model A too (ZipIt!), name -> group -> alignment of model A; for the methods whose merged
        model is two-headed (ZipIt!'s partial zip), name -> the first layer A and B run on their own
        (`lightning_merge.merge.two_headed`; the mixture's weights are (1−λ, λ)).

        ``task_metrics`` (e.g. accuracy for a classifier) are cloned for every (method, λ) point, and for models A
        and B as they are (the endpoints a merged model is compared with).
        """
        if not alignments:
            raise ConfigError("no merge method to evaluate; pass at least one method")
        for groups in [*alignments.values(), *(references or {}).values()]:
            check_alignments(self.spec, groups)  # a bad alignment fails here, before any curve point
        self.methods = {name: dict(groups) for name, groups in alignments.items()}
        self.references = {name: dict(groups) for name, groups in (references or {}).items() if name in self.methods}
        self.paths = {name: path for name, path in (paths or {}).items() if name in self.methods}
        self.splits = {name: layer for name, layer in (splits or {}).items() if name in self.methods}
        self.plan = None
        self.curve_sums = CurveSums(len(self.methods), len(self.lambdas)).to(self.device)
        self.endpoint_sums = CurveSums(1, 2).to(self.device)
        points = self.curve_point_count + 2  # and the two endpoints
        self.task_metrics = nn.ModuleList([task_metrics.clone() for _ in range(points)] if task_metrics else [])
        self.task_metrics.to(self.device)

    def set_joint_methods(
        self,
        joint: Mapping[str, Sequence[Mapping[str, Alignment]]],
        pairwise: Mapping[str, Mapping[Pair, Mapping[str, Alignment]]],
        task_metrics: torchmetrics.MetricCollection | None = None,
        splits: Mapping[str, int] | None = None,
    ) -> None:
        """Methods of an N-model merge: name -> every model's alignment into model 0's basis (``joint``), and for
        the methods fitted pair by pair, name -> (i, j) -> alignment of model j into model i's (``pairwise``);
        ``splits`` as in `set_methods` (every model a tail, mixed with a point's weights)."""
        if not joint:
            raise ConfigError("no merge method to evaluate; pass at least one method")
        for groups in [g for per_model in joint.values() for g in per_model] + [
                g for per_pair in pairwise.values() for g in per_pair.values()]:
            check_alignments(self.spec, groups)
        self.joint_alignments = {name: [dict(g) for g in per_model] for name, per_model in joint.items()}
        self.pair_alignments = {name: {pair: dict(g) for pair, g in per_pair.items()}
                                for name, per_pair in pairwise.items()}
        self.methods = {}
        self.splits = {name: layer for name, layer in (splits or {}).items() if name in joint}
        self.plan = JointPlan(list(joint), self.num_models, self.lambdas, pairwise, self.simplex_steps)
        self.curve_sums = CurveSums(len(self.plan.points), 1).to(self.device)
        self.task_metrics = nn.ModuleList([task_metrics.clone() for _ in self.plan.points] if task_metrics else [])
        self.task_metrics.to(self.device)

    @property
    def method_names(self) -> list[str]:
        return list(self.methods) if self.plan is None else self.plan.methods

    @property
    def curve_point_count(self) -> int:
        """The points the curves evaluate on every batch (before the ones that are the same computation are run
        once): (method, λ) pairs, or an N-model merge's plan."""
        return len(self.methods) * len(self.lambdas) if self.plan is None else len(self.plan.points)

    def endpoints(self, method: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(θ_A, π(θ_B)) of ``method`` by parameter name, tied aliases included (sharing their source's tensor).

        A method whose alignment needs the LayerNorm gains folded into their readers (``res[orthogonal]``) gets
        both endpoints folded (`fold_layer_norms`: the same functions, with a tied reader untied)."""
        state_a, aligned_b = self.aligned_states(self._method_alignments(method), [0, 1])
        return state_a, aligned_b

    def aligned_states(
        self, alignments: Sequence[Mapping[str, Alignment]], members: Sequence[int]
    ) -> list[dict[str, Tensor]]:
        """Model ``members[k]`` aligned by ``alignments[k]``, by parameter name (tied aliases included); all folded
        if any alignment needs folded LayerNorms."""
        names = [name for name, _ in self.model_a.named_parameters(remove_duplicate=False)]
        if any(needs_folded_norms(groups) for groups in alignments):
            folded = self._folded()
            states, spec = [folded[k][0] for k in members], folded[0][1]
        else:
            states, spec = [self.all_models[k].state_dict() for k in members], self.spec
        out = []
        for state, groups in zip(states, alignments):
            aligned = apply_alignments(state, spec, groups) if groups else state
            out.append({name: aligned[name] for name in names})
        return out

    def _method_alignments(self, method: str) -> list[Mapping[str, Alignment]]:
        if self.plan is None:
            return [self.references.get(method, {}), self.methods[method]]
        return [*self.joint_alignments[method], *self.pair_alignments.get(method, {}).values()]

    def folds(self, method: str) -> bool:
        """Whether ``method``'s models are evaluated with their LayerNorm gains folded (`endpoints`)."""
        return any(needs_folded_norms(groups) for groups in self._method_alignments(method))

    def untied(self, method: str) -> list[str]:
        """The weights ``method``'s endpoints untie from their tie source (see `endpoints`)."""
        return untied_by_folding(self.spec) if self.folds(method) else []

    def _folded(self) -> list[tuple]:
        """Every model folded, cached per device (Lightning moves the module between the statistics pass, the CPU
        and the test loop)."""
        device = next(self.model_a.parameters()).device
        if self._folded_states is None or self._folded_states[0] != device:
            folded = [fold_layer_norms(model.state_dict(), self.spec) for model in self.all_models]
            self._folded_states = (device, folded)
        return self._folded_states[1]

    def interpolated(
        self, method: str, lam: float, endpoints: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """θ(λ) for one method as a parameter dict (every parameter name of model A, tied aliases included)."""
        state_a, aligned_b = self.endpoints(method) if endpoints is None else endpoints
        if method in self.paths:
            return self.paths[method].at(state_a, aligned_b, lam)
        return interpolate_state_dicts(state_a, aligned_b, lam)

    def merged_model(self, method: str, lam: float) -> PreTrainedModel:
        """A copy of model A holding θ(λ) of ``method``; weights the method's endpoints untie are untied in it."""
        return self._model_holding(self.interpolated(method, lam), self.untied(method))

    def merged_average(self, method: str) -> PreTrainedModel:
        """A copy of model A holding the uniform average of every model in ``method``'s common basis (N > 2)."""
        states = self.aligned_states(self.joint_alignments[method], range(self.num_models))
        return self._model_holding(combine_state_dicts(states, [1 / self.num_models] * self.num_models),
                                   self.untied(method))

    def _model_holding(self, params: Mapping[str, Tensor], untied: Sequence[str]) -> PreTrainedModel:
        merged = copy.deepcopy(self.model_a)  # keeps buffers and the decoder/embedding tie
        if untied:
            merged.config.tie_word_embeddings = False
        with torch.no_grad():
            for name, value in params.items():
                if name in untied:
                    module, _, attribute = name.rpartition(".")
                    setattr(merged.get_submodule(module), attribute, nn.Parameter(value.detach().clone()))
                else:
                    merged.get_parameter(name).copy_(value)
        return merged

    def mean_loss(self, params: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> Tensor:
        """The objective's mean loss on ``batch`` of model A's structure with ``params`` (differentiable).

        The buffers (position and token-type ids) are passed on the parameters' device: a learned method trains
        its module where Lightning puts it, which need not be where this module sits."""
        device = next(iter(params.values())).device
        state = {f"model.{k}": v for k, v in params.items()}
        state.update({f"model.{k}": v.to(device) for k, v in self.model_a.named_buffers()})
        output = functional_call(self.objective, state, (dict(batch),))
        return output[0] / output[1].clamp(min=1)

    @torch.no_grad()
    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.plan is not None:
            self._joint_test_step(batch)
            return
        reused = _PointOutputs(self.model_a, self.model_b)
        for m, method in enumerate(self.methods):
            endpoints = self.endpoints(method)  # once per batch and method; cheap beside a forward
            for i, lam in enumerate(self.lambdas):
                params, index = self.interpolated(method, lam, endpoints), m * len(self.lambdas) + i
                if method in self.splits:
                    self._evaluate_two_headed(m, i, method, params, (1 - lam, lam), batch, index)
                else:
                    self._evaluate_point(m, i, params, batch, index, reused=reused)
        first_endpoint = len(self.methods) * len(self.lambdas)
        for k, model in enumerate((self.model_a, self.model_b)):  # a fused model is compared with A and B themselves
            params = dict(model.named_parameters(remove_duplicate=False))
            self._evaluate_point(0, k, params, batch, first_endpoint + k, self.endpoint_sums, reused)

    def _joint_test_step(self, batch: dict[str, Tensor]) -> None:
        reused = _PointOutputs(*self.all_models)
        for method in self.plan.methods:
            bases: dict[Pair | None, list[dict[str, Tensor]]] = {}  # once per batch and method
            for index, point in self.plan.points_of(method):
                if point.basis not in bases:
                    bases[point.basis] = self._basis(method, point.basis)
                params = combine_state_dicts(bases[point.basis], point.weights)
                if method in self.splits:
                    self._evaluate_two_headed(index, 0, method, params, point.weights, batch, index)
                else:  # a vertex ends two lines and is a point of its own: the same weights, the same output
                    self._evaluate_point(index, 0, params, batch, index, reused=reused,
                                         point=(method, point.basis, point.weights))

    def _basis(self, method: str, basis: Pair | None) -> list[dict[str, Tensor]]:
        if basis is None:
            return self.aligned_states(self.joint_alignments[method], range(self.num_models))
        return self.aligned_states([{}, self.pair_alignments[method][basis]], basis)

    def _evaluate_point(self, row: int, column: int, params: dict[str, Tensor], batch: dict[str, Tensor],
                        metric_index: int, sums: CurveSums | None = None, reused: _PointOutputs | None = None,
                        point: Any = None) -> None:
        # its own frame: one point's parameters are freed before the next point's are built. Every parameter name
        # is passed, aliases too, so an endpoint pair that unties a weight (`endpoints`) is evaluated untied.
        key = reused.key(params, point) if reused is not None else None
        output = reused.get(key) if reused is not None else None
        if output is None:
            state = {f"model.{k}": v for k, v in params.items()}
            output = functional_call(self.objective, state, (batch,), tie_weights=False)
            if reused is not None:
                reused.put(key, output)
        self._record(row, column, output, batch, metric_index, sums)

    def _evaluate_two_headed(self, row: int, column: int, method: str, trunk: dict[str, Tensor],
                             weights: Sequence[float], batch: dict[str, Tensor], metric_index: int) -> None:
        """A point of a two-headed method: ``trunk`` up to its split layer, every model's own tail, mixed."""
        zipped = self._method_alignments(method)[:self.num_models]
        tails = [dict(model.named_parameters(remove_duplicate=False)) for model in self.all_models]
        output = two_headed_outputs(self.objective, self.spec.layer_module(self.splits[method]), trunk, tails,
                                    [groups[RESIDUAL].unmerge for groups in zipped], weights, batch)
        self._record(row, column, output, batch, metric_index)

    def _record(self, row: int, column: int, output: tuple[Tensor, ...], batch: dict[str, Tensor],
                metric_index: int, sums: CurveSums | None = None) -> None:
        (sums or self.curve_sums).update(row, column, output[0], output[1])
        if self.task_metrics:
            self._update_task_metric(metric_index, output[2], batch["labels"])

    def _update_task_metric(self, index: int, logits: Tensor, labels: Tensor) -> None:
        preds = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        self.task_metrics[index].update(preds, labels)

    def on_test_epoch_end(self) -> None:
        losses = self.curve_sums.compute().cpu()  # (M, L) or (points, 1), already reduced over ranks
        self._check_finite(losses)
        if self.plan is not None:
            self._joint_results(losses[:, 0])
            return
        endpoints = self._endpoint_results()
        curves: dict[str, dict[str, list[float]]] = {}
        barriers: dict[str, dict[str, float]] = {}
        for m, method in enumerate(self.methods):
            curves[method] = {"loss": losses[m].tolist()}
            barriers[method] = loss_barrier(self.lambdas, curves[method]["loss"])
            if self.task_metrics:
                self._add_task_curve(m, curves[method], barriers[method])
            barriers[method].update(midpoint_figures(self.lambdas, curves[method], endpoints))
            self._log_curve(method, curves[method], barriers[method])
        self.results = {"lambdas": self.lambdas, "curves": curves, "barriers": barriers, "endpoints": endpoints}

    def _endpoint_results(self) -> dict[str, list[float]]:
        """Loss (and task metrics) of models A and B as they are: [A, B] per figure."""
        figures = {"loss": self.endpoint_sums.compute()[0].cpu().tolist()}
        if self.task_metrics:
            values = _computed(self.task_metrics[-2:])
            figures.update({name: [point[name] for point in values] for name in values[0]})
        return figures

    def _joint_results(self, losses: Tensor) -> None:
        metrics = _computed(self.task_metrics) if self.task_metrics else None
        self.results = {**self.plan.results(losses.tolist(), metrics), "models": self.model_paths}
        for method in self.plan.methods:
            for pair, figures in self.results["barriers"][method].items():
                self.log(f"test/barrier/{method}/{pair}", figures["barrier"], rank_zero_only=True)
            for key, value in self.results["average"][method].items():
                self.log(f"test/average/{method}/{key}", value, rank_zero_only=True)

    def _check_finite(self, losses: Tensor) -> None:
        """Stop at the first non-finite loss, naming the method and λ (nothing has been written yet)."""
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            m, i = bad[0].tolist()
            if self.plan is not None:
                point = self.plan.points[m]
                method, where = point.method, "weights " + ", ".join(f"{w:g}" for w in point.weights)
            else:
                method, where = list(self.methods)[m], f"lambda={self.lambdas[i]:g}"
            raise DataError(
                f"the loss of method {method!r} at {where} is {losses[m, i].item()}: the models or their "
                "alignment hold non-finite values (loaded with allow_nonfinite?) or the evaluation overflowed"
            )

    def _add_task_curve(self, m: int, curve: dict, barrier: dict) -> None:
        points = self.task_metrics[m * len(self.lambdas) : (m + 1) * len(self.lambdas)]
        values = _computed(points)
        for name in values[0]:
            curve[name] = [point[name] for point in values]
            # a metric should be high: its barrier is the largest drop below the line between the endpoints
            drop = loss_barrier(self.lambdas, [-v for v in curve[name]])
            barrier.update({f"{name}_barrier": drop["barrier"], f"{name}_barrier_midpoint": drop["barrier_midpoint"],
                            f"{name}_a": curve[name][0], f"{name}_b": curve[name][-1]})

    def _log_curve(self, method: str, curve: Mapping[str, list[float]], barrier: Mapping[str, float]) -> None:
        for name, values in curve.items():
            for lam, value in zip(self.lambdas, values):
                self.log(f"test/{method}/{name}@lambda={lam:.2f}", value, rank_zero_only=True)
        for key, value in barrier.items():
            self.log(f"test/{key}/{method}", value, rank_zero_only=True)


class _PointOutputs:
    """A batch's outputs by what determines them, so a point met again is not run again: parameters that are the
    models' own tensors (every method's λ = 0 unless it transforms A, vanilla's λ = 1, the endpoints, a joint
    merge's reference model), or a key the caller gives (a joint merge's vertex on several lines). Only the models'
    own tensors are known by their memory: it lives as long as the models, so a data pointer names the same values
    throughout; a point's fresh tensors may reuse a freed point's memory."""

    def __init__(self, *models: nn.Module) -> None:
        self._own = {p.data_ptr() for model in models for p in model.parameters()}
        self._outputs: dict[Any, tuple[Tensor, ...]] = {}

    def key(self, params: Mapping[str, Tensor], point: Any = None) -> Any:
        """The models' own tensors' key, else ``point`` (None: not reusable)."""
        if all(t.data_ptr() in self._own for t in params.values()):
            return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for name, t in params.items())
        return point

    def get(self, key: Any) -> tuple[Tensor, ...] | None:
        return None if key is None else self._outputs.get(key)

    def put(self, key: Any, output: tuple[Tensor, ...]) -> None:
        if key is not None:
            self._outputs[key] = output


def _computed(points: Sequence[torchmetrics.MetricCollection]) -> list[dict[str, float]]:
    """Each point's task metrics (reduced over ranks), the points then reset for the next epoch."""
    values = [{name: float(v) for name, v in metrics.compute().items()} for metrics in points]
    for metrics in points:
        metrics.reset()
    return values
