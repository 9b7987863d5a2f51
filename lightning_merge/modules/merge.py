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
from lightning_merge.merge.families import CAUSAL_LM, MASKED_LM, SEQUENCE_CLASSIFICATION, model_inputs
from lightning_merge.merge.fold import fold_layer_norms, untied_by_folding
from lightning_merge.merge.interpolate import check_lambdas, interpolate_state_dicts, loss_barrier
from lightning_merge.merge.spec import PermutationSpec, spec_for_pair
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


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError(f"unknown merge task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]


class PairModule(pl.LightningModule):
    """Models A and B of one architecture; validation runs both encoders on each batch (for feature hooks).

    Args:
        model_a: HF directory, our ``.ckpt`` or hub id of the reference model (keeps its neuron order).
        model_b: the model that gets permuted into A's basis.
        task: ``masked_lm``, ``causal_lm`` or ``sequence_classification``; the models' family (BERT, RoBERTa,
            DistilBERT, RoBERTa-PreLayerNorm, GPT-2) is read from their configs.
        allow_nonfinite: load models with NaN or infinite weights instead of refusing them (their curves will not
            be finite, and the merge stops at the first non-finite loss).
    """

    def __init__(self, model_a: str, model_b: str, task: str = "masked_lm", allow_nonfinite: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_class = get_task(task).model_class
        self.model_a = load_pretrained(model_a, model_class, allow_nonfinite).eval()
        self.model_b = load_pretrained(model_b, model_class, allow_nonfinite).eval()
        self.spec: PermutationSpec = spec_for_pair(self.model_a, self.model_b)
        self._check_vocab()

    def _check_vocab(self) -> None:
        vocab_a, vocab_b = self.model_a.config.vocab_size, self.model_b.config.vocab_size
        if vocab_a != vocab_b:
            raise ArchitectureMismatch(f"model_a and model_b differ in vocab_size: {vocab_a} vs {vocab_b}")

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
        self.model_a.base_model(**inputs)  # the hooks sit in the encoder; the heads are not needed for features
        self.model_b.base_model(**inputs)

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
    """

    def __init__(
        self,
        model_a: str,
        model_b: str,
        task: str = "masked_lm",
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        allow_nonfinite: bool = False,
    ) -> None:
        super().__init__(model_a, model_b, task, allow_nonfinite)
        self.lambdas = [float(x) for x in lambdas]
        check_lambdas(self.lambdas)
        self.objective = get_task(task).objective_class(self.model_a)
        self.methods: dict[str, dict[str, Alignment]] = {}
        self.curve_sums: CurveSums | None = None
        self.task_metrics = nn.ModuleList()
        self.results: dict | None = None
        self._folded_states: tuple[torch.device, tuple[tuple, tuple]] | None = None

    def set_methods(
        self,
        alignments: Mapping[str, Mapping[str, Alignment]],
        task_metrics: torchmetrics.MetricCollection | None = None,
    ) -> None:
        """Methods to evaluate: name -> group -> alignment of model B (empty mapping: vanilla averaging).

        ``task_metrics`` (e.g. accuracy for a classifier) are cloned for every (method, λ) point.
        """
        if not alignments:
            raise ConfigError("no merge method to evaluate; pass at least one method")
        for groups in alignments.values():
            check_alignments(self.spec, groups)  # a bad alignment fails here, before any curve point
        self.methods = {name: dict(groups) for name, groups in alignments.items()}
        self.curve_sums = CurveSums(len(self.methods), len(self.lambdas)).to(self.device)
        points = len(self.methods) * len(self.lambdas)
        self.task_metrics = nn.ModuleList([task_metrics.clone() for _ in range(points)] if task_metrics else [])
        self.task_metrics.to(self.device)

    def endpoints(self, method: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(θ_A, π(θ_B)) of ``method`` by parameter name, tied aliases included (sharing their source's tensor).

        A method whose alignment needs the LayerNorm gains folded into their readers (``res[orthogonal]``) gets
        both endpoints folded (`fold_layer_norms`: the same functions, with a tied reader untied)."""
        names = [name for name, _ in self.model_a.named_parameters(remove_duplicate=False)]
        alignments = self.methods[method]
        if needs_folded_norms(alignments):
            (state_a, spec, _), (state_b, _, _) = self._folded()
        else:
            state_a, state_b, spec = self.model_a.state_dict(), self.model_b.state_dict(), self.spec
        aligned_b = apply_alignments(state_b, spec, alignments)
        return {name: state_a[name] for name in names}, {name: aligned_b[name] for name in names}

    def untied(self, method: str) -> list[str]:
        """The weights ``method``'s endpoints untie from their tie source (see `endpoints`)."""
        return untied_by_folding(self.spec) if needs_folded_norms(self.methods[method]) else []

    def _folded(self) -> tuple[tuple, tuple]:
        """Both models folded, cached per device (Lightning moves the module between the statistics pass, the CPU
        and the test loop)."""
        device = next(self.model_a.parameters()).device
        if self._folded_states is None or self._folded_states[0] != device:
            folded = tuple(fold_layer_norms(model.state_dict(), self.spec) for model in (self.model_a, self.model_b))
            self._folded_states = (device, folded)
        return self._folded_states[1]

    def interpolated(
        self, method: str, lam: float, endpoints: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor]:
        """θ(λ) for one method as a parameter dict (every parameter name of model A, tied aliases included)."""
        state_a, aligned_b = self.endpoints(method) if endpoints is None else endpoints
        return interpolate_state_dicts(state_a, aligned_b, lam)

    def merged_model(self, method: str, lam: float) -> PreTrainedModel:
        """A copy of model A holding θ(λ) of ``method``; weights the method's endpoints untie are untied in it."""
        merged = copy.deepcopy(self.model_a)  # keeps buffers and the decoder/embedding tie
        untied = self.untied(method)
        if untied:
            merged.config.tie_word_embeddings = False
        with torch.no_grad():
            for name, value in self.interpolated(method, lam).items():
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
        for m, method in enumerate(self.methods):
            endpoints = self.endpoints(method)  # once per batch and method; cheap beside a forward
            for i, lam in enumerate(self.lambdas):
                self._evaluate_point(m, i, self.interpolated(method, lam, endpoints), batch)

    def _evaluate_point(self, m: int, i: int, params: dict[str, Tensor], batch: dict[str, Tensor]) -> None:
        # its own frame: one point's parameters are freed before the next point's are built. Every parameter name
        # is passed, aliases too, so an endpoint pair that unties a weight (`endpoints`) is evaluated untied.
        state = {f"model.{k}": v for k, v in params.items()}
        output = functional_call(self.objective, state, (batch,), tie_weights=False)
        self.curve_sums.update(m, i, output[0], output[1])
        if self.task_metrics:
            self._update_task_metric(m * len(self.lambdas) + i, output[2], batch["labels"])

    def _update_task_metric(self, index: int, logits: Tensor, labels: Tensor) -> None:
        preds = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        self.task_metrics[index].update(preds, labels)

    def on_test_epoch_end(self) -> None:
        losses = self.curve_sums.compute().cpu()  # (M, L), already reduced over ranks
        self._check_finite(losses)
        curves: dict[str, dict[str, list[float]]] = {}
        barriers: dict[str, dict[str, float]] = {}
        for m, method in enumerate(self.methods):
            curves[method] = {"loss": losses[m].tolist()}
            barriers[method] = loss_barrier(self.lambdas, curves[method]["loss"])
            if self.task_metrics:
                self._add_task_curve(m, curves[method], barriers[method])
            self._log_curve(method, curves[method], barriers[method])
        self.results = {"lambdas": self.lambdas, "curves": curves, "barriers": barriers}

    def _check_finite(self, losses: Tensor) -> None:
        """Stop at the first non-finite loss, naming the method and λ (nothing has been written yet)."""
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            m, i = bad[0].tolist()
            method, lam = list(self.methods)[m], self.lambdas[i]
            raise DataError(
                f"the loss of method {method!r} at lambda={lam:g} is {losses[m, i].item()}: the models or their "
                "alignment hold non-finite values (loaded with allow_nonfinite?) or the evaluation overflowed"
            )

    def _add_task_curve(self, m: int, curve: dict, barrier: dict) -> None:
        points = self.task_metrics[m * len(self.lambdas) : (m + 1) * len(self.lambdas)]
        values = [{name: float(v) for name, v in metrics.compute().items()} for metrics in points]
        for name in values[0]:
            curve[name] = [point[name] for point in values]
            # a metric should be high: its barrier is the largest drop below the line between the endpoints
            drop = loss_barrier(self.lambdas, [-v for v in curve[name]])
            barrier.update({f"{name}_barrier": drop["barrier"], f"{name}_barrier_midpoint": drop["barrier_midpoint"],
                            f"{name}_a": curve[name][0], f"{name}_b": curve[name][-1]})
        for metrics in points:
            metrics.reset()

    def _log_curve(self, method: str, curve: Mapping[str, list[float]], barrier: Mapping[str, float]) -> None:
        for name, values in curve.items():
            for lam, value in zip(self.lambdas, values):
                self.log(f"test/{method}/{name}@lambda={lam:.2f}", value, rank_zero_only=True)
        for key, value in barrier.items():
            self.log(f"test/{key}/{method}", value, rank_zero_only=True)
