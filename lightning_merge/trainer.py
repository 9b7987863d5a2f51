"""`MergeTrainer`: a Lightning Trainer with a ``merge`` entry point (statistics pass, matching, barrier curves)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torchmetrics
from lightning_fabric.utilities.exceptions import MisconfigurationException
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, DistributedSampler, Subset

from lightning_merge.callbacks import HFExport, MergeCallback
from lightning_merge.data.tensors import spread_indices
from lightning_merge.errors import ConfigError, DataError, OutputExistsError
from lightning_merge.io import (
    atomic_dir,
    atomic_file,
    atomic_write_text,
    check_free_space,
    check_writable,
    output_errors,
    remove_stale_temporaries,
)
from lightning_merge.memory import release_freed_memory
from lightning_merge.merge.alignment import save_alignments
from lightning_merge.merge.features import feature_moments
from lightning_merge.merge.joint import cycle_consistency_error, pairwise_from_joint
from lightning_merge.merge.joint_methods import (
    JointInputs,
    JointMethod,
    fit_joint,
    fit_pairwise,
    permutations_only,
    with_identities,
)
from lightning_merge.merge.method import (
    ACTIVATIONS,
    LOSS,
    STATISTICS,
    WEIGHTS,
    ActivationMoments,
    FitInputs,
    MergeMethod,
    TrainingLoss,
)
from lightning_merge.merge.methods import fit_methods, get_method
from lightning_merge.merge.stats import STATISTICS_DTYPE, product_dtype
from lightning_merge.models import check_checkpoint, check_finite
from lightning_merge.modules.learning import AlignmentLearningModule
from lightning_merge.modules.merge import InterpolationModule
from lightning_merge.report import MERGE_COMPLETE, compare_midpoints, write_joint_report, write_report

# The paper's comparisons: FF alone, FF+attention per attention variant, residual per variant, the full method.
DEFAULT_METHODS: tuple[str, ...] = (
    "vanilla",
    "ff",
    "ff+attn[head_perm]",
    "ff+attn[monotonic]",
    "ff+attn[ignore_heads]",
    "res[first]",
    "res[last]",
    "res[all]",
    "ff+attn+res",
)


class MergeTrainer(pl.Trainer):
    """A Trainer that can also ``merge`` two models (`MergeTrainer.merge`), and whose ``fit`` never trains over a
    finished run unless told to."""

    def fit(
        self,
        model: pl.LightningModule,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        datamodule: pl.LightningDataModule | None = None,
        ckpt_path: str | Path | None = None,
        weights_only: bool | None = None,
        overwrite: bool = False,
    ) -> None:
        """Lightning's ``fit``, after two checks that would otherwise fail late or silently.

        Args:
            overwrite: train into a directory whose HF export says a run finished there (otherwise refused: resume
                it with ``ckpt_path``, or choose another ``default_root_dir``).
            (the other arguments are Lightning's)

        Raises:
            OutputExistsError: the run directory holds a finished run and neither ``ckpt_path`` nor ``overwrite``.
            CheckpointError: the checkpoint to resume from is missing or unreadable (e.g. truncated by a kill).
        """
        finished = [d for d in self._export_dirs() if (d / "config.json").is_file()]
        if finished and ckpt_path is None and not overwrite:
            raise OutputExistsError(
                f"{finished[0]} holds a finished run; resume it with --ckpt_path last, replace it with --overwrite "
                "true, or choose another --trainer.default_root_dir"
            )
        resumed = self._resume_checkpoint(ckpt_path)
        if resumed is not None:
            check_checkpoint(resumed)
        check_writable(self.default_root_dir)
        with output_errors(self.default_root_dir):  # a full disk at a checkpoint: one line, not a traceback
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, weights_only)

    def _export_dirs(self) -> list[Path]:
        return [callback.export_dir(self) for callback in self.callbacks if isinstance(callback, HFExport)]

    def _resume_checkpoint(self, ckpt_path: str | Path | None) -> Path | None:
        """The file ``ckpt_path`` names: itself, or for ``last`` the checkpoint callbacks' last checkpoint."""
        if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
            return None
        if ckpt_path != "last":
            return Path(ckpt_path)
        candidates = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                      for cb in self.checkpoint_callbacks if getattr(cb, "dirpath", None)]
        return next((path for path in candidates if path.exists()), None)

    def merge(
        self,
        model: InterpolationModule,
        datamodule: pl.LightningDataModule | None = None,
        methods: list[str] | None = None,
        export_method: str | None = "ff+attn+res",
        export_lambda: float = 0.5,
        exclude_special_tokens: bool = False,
        statistics_split: str = "train",
        statistics_max_blocks: int | None = 512,
        statistics_dtype: str = STATISTICS_DTYPE,
        statistics_data: pl.LightningDataModule | None = None,
        statistics_batch_size: int | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Align model B to model A with every method and measure the loss barrier of each.

        One statistics pass (validation loop over the datamodule's feature batches) serves every method; the
        barrier curves come from one test loop over the (first) validation loader, whose masks are fixed. Outputs
        go to ``trainer.default_root_dir``.

        Args:
            model: the `InterpolationModule` holding models A and B.
            datamodule: gives ``features_dataloader(split, max_blocks)`` (unmasked text; else its validation
                inputs) for statistics and ``val_dataloader()`` for the curves.
            methods: merge method names (default: the paper's comparisons, `DEFAULT_METHODS`).
            export_method: method whose λ = ``export_lambda`` model is saved to ``merged/`` (None: none).
            export_lambda: λ of the exported merged model.
            exclude_special_tokens: leave special tokens out of the statistics.
            statistics_split: split whose text feeds the statistics (with ``features_dataloader``).
            statistics_max_blocks: at most this many blocks of it (evenly spread; None: all).
            statistics_dtype: ``float32`` (default) or ``float64``: the dtype each block's feature products are
                formed in (from features shifted by the block's mean); the sums are float64 either way. float32 is
                1.2-1.8x faster on CPU (on GPUs by far) and gave the same permutations as float64 on the three
                quickstart pairs (benchmarks/statistics_precision.py measures it); float64 for exact sums.
            statistics_data: a separate datamodule for the statistics (e.g. a BookCorpus sample, as in the
                paper); default: ``datamodule``.
            statistics_batch_size: sequences per batch of the statistics pass (default: the datamodule's). The
                pass holds model A's features at every feature point for one batch while B runs, so a smaller batch
                lowers its peak memory in proportion; the sums do not change.
            overwrite: replace the outputs of an earlier run in the same directory.
        """
        names = list(methods or DEFAULT_METHODS)
        run_dir = Path(self.default_root_dir)
        chosen = self._check_request(run_dir, names, export_method, overwrite, model.num_models)
        for method in chosen.values():
            method.check_spec(model.spec)
        splits = {name: layer for name, method in chosen.items()
                  if (layer := method.split_layer(model.spec)) is not None}
        if export_method in splits:
            raise ConfigError(f"export_method {export_method!r} makes a two-headed model (a shared trunk and each "
                              "model's own layers), which no single checkpoint holds; export another method")
        product_dtype(statistics_dtype)  # an unknown name fails before any work
        if statistics_batch_size is not None and statistics_batch_size < 1:
            raise ConfigError(f"statistics_batch_size={statistics_batch_size} must be at least 1, or null")
        if statistics_max_blocks is not None and statistics_max_blocks < 1:
            raise ConfigError(f"statistics_max_blocks={statistics_max_blocks} must be at least 1, or null for all")
        check_writable(run_dir)  # before any compute: a merge must not fail at its very end for lack of a place
        check_free_space(run_dir, _output_bytes(model, export_method), "the merge's outputs")
        self._clear_interrupted_run(run_dir)
        datamodule.setup("test")
        model.check_tokenizer(getattr(datamodule, "tokenizer", None))
        timings: dict[str, Any] = {}

        def statistics_loader() -> Any:  # built only if a method reads statistics
            if statistics_data is not None:
                statistics_data.setup("validate")
                model.check_tokenizer(getattr(statistics_data, "tokenizer", None))
            return _statistics_loader(
                statistics_data or datamodule, statistics_split, statistics_max_blocks, statistics_batch_size
            )

        inputs = self._fit_inputs(
            model, datamodule, statistics_loader, chosen, exclude_special_tokens, statistics_dtype, timings
        )
        if model.num_models == 2:
            paths: dict[str, Any] = {}
            references: dict[str, Any] = {}
            alignments = self._fit_alignments(model, chosen, inputs, timings, paths, references)
            model.set_methods(alignments, _task_metrics(datamodule), paths, references, splits)
        else:
            joint, pairwise = self._fit_joint_alignments(chosen, inputs, timings)
            model.set_joint_methods(joint, pairwise, _task_metrics(datamodule), splits)
            alignments = _alignments_by_model(joint, pairwise)
        untied = _report_folding(model)
        release_freed_memory()  # the statistics and correlations, before the curves' parameters and activations
        start = time.perf_counter()
        self.test(model, dataloaders=_first(datamodule.val_dataloader()), verbose=False)
        timings["curves_s"] = time.perf_counter() - start
        release_freed_memory()  # the curves' activations, before the export builds the merged model
        timings["curve_points"] = model.curve_point_count
        descriptions = {name: method.describe() for name, method in chosen.items()}
        if model.num_models == 2:
            for name, figures in model.results["barriers"].items():
                figures["function_preserving"] = descriptions[name]["function_preserving"]
            straight = [name for name, method in chosen.items()
                        if method.needs and method.function_preserving and not method.changes_path]
            model.results["best_alignment"] = compare_midpoints(model.results["barriers"], straight)
        else:
            for name, figures in model.results["average"].items():
                figures["function_preserving"] = descriptions[name]["function_preserving"]
            model.results["cycle_consistency_error"] = _cycle_errors(model)
        results = {**model.results, "methods": descriptions, "untied": untied, "timings": timings}
        self._write_outputs(run_dir, model, alignments, results, export_method, export_lambda, datamodule)
        return results

    def _check_request(
        self, run_dir: Path, names: list[str], export_method: str | None, overwrite: bool, num_models: int = 2
    ) -> dict[str, MergeMethod]:
        chosen = {name: get_method(name) for name in names}  # unknown names and bad options fail before any work
        learners = [name for name, method in chosen.items() if LOSS in method.needs]
        if num_models > 2 and learners:
            raise ConfigError(f"method {learners[0]!r} trains on one pair of models; with {num_models} models use "
                              "pairwise methods that need no training or a joint method (to_reference, merge_many, "
                              "cycle_consistent)")
        paths = [name for name, method in chosen.items() if method.changes_path]
        if num_models > 2 and paths:
            raise ConfigError(f"method {paths[0]!r} changes the path between a pair of models; with {num_models} "
                              "models use alignments (e.g. ff+attn+res, ot, merge_many), or merge pairs")
        if export_method is not None and export_method not in names:
            raise ConfigError(f"export_method {export_method!r} is not among the methods: {', '.join(names)}")
        if (run_dir / MERGE_COMPLETE).exists() and not overwrite:
            raise OutputExistsError(
                f"{run_dir} holds an earlier merge; pass --overwrite true or another --trainer.default_root_dir"
            )
        return chosen

    @rank_zero_only
    def _clear_interrupted_run(self, run_dir: Path) -> None:
        """Clear what an interrupted earlier merge left: its temporary files, and its marker if it is replaced."""
        for path in remove_stale_temporaries(run_dir):
            print(f"removed {path}, left by an interrupted earlier merge", flush=True)
        if (run_dir / "barriers.json").exists() and not (run_dir / MERGE_COMPLETE).exists():
            print(f"{run_dir} holds an incomplete earlier merge (no {MERGE_COMPLETE}); its outputs are replaced",
                  flush=True)
        (run_dir / MERGE_COMPLETE).unlink(missing_ok=True)  # the run is complete again only when this one ends

    def _fit_inputs(
        self, model: InterpolationModule, datamodule: Any, statistics_loader: Callable[[], Any],
        methods: Mapping[str, MergeMethod], exclude_special: bool, statistics_dtype: str, timings: dict,
    ) -> FitInputs:
        """Exactly what the methods declare they need: statistics (one pass for all), weights, a training loss.

        Missing data fails here, naming the methods that need it, before any statistics pass or fit."""
        needs = set().union(*(method.needs for method in methods.values()))
        learners = [name for name, method in methods.items() if LOSS in method.needs]
        training = None
        if learners:
            self._check_learning_strategy(learners[0])
            _training_batches(datamodule, learners[0])
            training = TrainingLoss(model.mean_loss, self._optimiser(datamodule))
        statistics = None
        loader = statistics_loader() if needs & {STATISTICS, ACTIVATIONS} else None
        if STATISTICS in needs:
            if len(loader) == 0:
                readers = ", ".join(name for name, method in methods.items() if STATISTICS in method.needs)
                raise DataError(f"{readers} need activation statistics, but the statistics data is empty; give the "
                                "datamodule text (or statistics_data), or use methods that need none, e.g. "
                                "weight_matching")
            features = [f for method in methods.values() for f in method.statistics_features(model.spec)]
            own = [f for method in methods.values() for f in method.own_features(model.spec)]
            statistics = self._collect_statistics(model, datamodule, loader, list(dict.fromkeys(features)),
                                                  exclude_special, statistics_dtype, timings, list(dict.fromkeys(own)))
        if model.num_models == 2:
            weights = (_parameters(model.model_a), _parameters(model.model_b)) if WEIGHTS in needs else (None, None)
            activations = None
            if ACTIVATIONS in needs:
                activations = _activation_moments(model, loader, _special_token_ids(datamodule, exclude_special))
            return FitInputs(model.spec, *weights, statistics=statistics, training=training, activations=activations)
        every = [_parameters(m) for m in model.all_models] if WEIGHTS in needs else None

        def pair(i: int, j: int) -> FitInputs:
            return FitInputs(model.spec, *((every[i], every[j]) if every else (None, None)),
                             statistics=statistics.pair(i, j) if statistics is not None else None)

        return JointInputs(model.spec, model.num_models, pair)

    def _check_learning_strategy(self, method: str) -> None:
        if self.world_size > 1 and not isinstance(self.strategy, DDPStrategy):
            raise ConfigError(f"method {method!r} trains with DDP when it runs on several devices; run the merge with "
                              f"--trainer.strategy ddp (not {type(self.strategy).__name__})")

    def _collect_statistics(
        self, model: InterpolationModule, datamodule: Any, loader: Any, features: list[str], exclude_special: bool,
        statistics_dtype: str, timings: dict, own_features: list[str] | None = None,
    ) -> Any:
        special_ids = _special_token_ids(datamodule, exclude_special)
        callback = MergeCallback(features, special_token_ids=special_ids, statistics_dtype=statistics_dtype,
                                 own_features=own_features or ())
        self.callbacks.append(callback)
        try:
            self.validate(model, dataloaders=loader, verbose=False)
        finally:
            self.callbacks.remove(callback)
        timings.update(callback.timings, statistics_tokens=callback.statistics.token_count)
        release_freed_memory()  # the pass's activations and features, before matching allocates its correlations
        return callback.statistics

    def _fit_alignments(
        self, model: InterpolationModule, methods: Mapping[str, MergeMethod], inputs: FitInputs, timings: dict,
        paths: dict[str, Any], references: dict[str, Any],
    ) -> dict[str, dict[str, Any]]:
        fit_seconds: dict[str, float] = {}
        start = time.perf_counter()
        try:
            alignments = fit_methods(methods, inputs, fit_seconds, paths, references)
        finally:
            inputs.close()
        timings.update(matching_s=time.perf_counter() - start, fit_s=fit_seconds)
        return alignments

    def _fit_joint_alignments(
        self, methods: Mapping[str, MergeMethod], inputs: JointInputs, timings: dict
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, dict[tuple[int, int], dict[str, Any]]]]:
        """Every method's alignment of every model into model 0's basis, and the pairwise methods' fits of every
        pair (a pairwise method's common basis is its alignment of each model to model 0, fitted once)."""
        fit_seconds: dict[str, float] = {}
        joint, pairwise = {}, {}
        start = time.perf_counter()
        try:
            for name, method in methods.items():
                began = time.perf_counter()
                joint[name] = fit_joint(method, inputs)
                if not isinstance(method, JointMethod):
                    pairwise[name] = fit_pairwise(method, inputs)
                fit_seconds[name] = time.perf_counter() - began
        finally:
            inputs.close()
        timings.update(matching_s=time.perf_counter() - start, fit_s=fit_seconds)
        return joint, pairwise

    def _optimiser(self, datamodule: Any) -> Callable[[torch.nn.Module, int, float, str], None]:
        """`TrainingLoss.optimise` for this merge: Lightning fits the method's module on the training batches,
        on this trainer's devices, strategy, precision and logger."""

        def optimise(alignment: torch.nn.Module, steps: int, lr: float, name: str) -> None:
            learner = AlignmentLearningModule(alignment, lr, name)
            trainer = pl.Trainer(
                max_steps=steps, max_epochs=-1, accelerator=self.accelerator, devices=self._device_request(),
                num_nodes=self.num_nodes, strategy="ddp" if self.world_size > 1 else "auto",
                precision=_learning_precision(self.precision), logger=self.logger or False,
                enable_checkpointing=False, enable_model_summary=False,
                enable_progress_bar=self.progress_bar_callback is not None, num_sanity_val_steps=0,
                limit_val_batches=0, log_every_n_steps=self.log_every_n_steps, default_root_dir=self.default_root_dir,
            )
            trainer.fit(learner, train_dataloaders=_training_batches(datamodule, name))

        return optimise

    def _device_request(self) -> int | list[int]:
        """This trainer's devices as a new Trainer takes them: the same GPU indices; a count on the CPU."""
        return self.device_ids if self.strategy.root_device.type == "cuda" else self.num_devices

    @rank_zero_only
    def _write_outputs(
        self, run_dir: Path, model: InterpolationModule, alignments: dict, results: dict, export_method: str | None,
        export_lambda: float, datamodule: Any,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(run_dir / "alignments.safetensors") as tmp:
            save_alignments(tmp, _with_references(alignments, model.references))
        if model.num_models > 2:
            table = write_joint_report(run_dir, results)
            atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
            if export_method is not None:
                self._export(run_dir / "merged", model.merged_average(export_method),
                             f"the average of {model.num_models} models by {export_method}", datamodule)
            self._finish(run_dir, alignments, export_method, table)
            return
        metric_columns = [k for k in next(iter(results["barriers"].values())) if k.endswith(("_barrier", "_a", "_b"))
                          and k not in BARRIER_COLUMNS]
        midpoint_columns = [k for k in next(iter(results["barriers"].values()))
                            if k.startswith("midpoint_") and k.endswith(("_excess", "_drop", "_vs_vanilla"))]
        table = write_report(run_dir, results["lambdas"], results["curves"], results["barriers"],
                             [*BARRIER_COLUMNS, *metric_columns, *midpoint_columns], results["endpoints"])
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
        if export_method is not None:
            self._export(run_dir / "merged", model.merged_model(export_method, export_lambda),
                         f"merged by {export_method} at lambda={export_lambda:g}", datamodule)
        self._finish(run_dir, alignments, export_method, table)

    @staticmethod
    def _finish(run_dir: Path, alignments: dict, export_method: str | None, table: str) -> None:
        marker = {"methods": list(alignments), "export_method": export_method, "finished": time.time()}
        atomic_write_text(run_dir / MERGE_COMPLETE, json.dumps(marker, indent=2) + "\n")  # last: the run is whole
        print(f"\nBarriers along the interpolation paths ({run_dir}):\n{table}\n", flush=True)

    @staticmethod
    def _export(path: Path, merged: Any, what: str, datamodule: Any) -> None:
        check_finite(merged, what)
        tokenizer = getattr(datamodule, "tokenizer", None)
        with atomic_dir(path, overwrite=True) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)


@rank_zero_only
def _say(line: str) -> None:
    print(line, flush=True)


def _activation_moments(model: InterpolationModule, loader: DataLoader, special: list[int] | None
                        ) -> ActivationMoments:
    """`FitInputs.activations` of a pair merge: model A's structure run on ``count`` batches of rows spread evenly
    over the statistics data (not its first rows: GLUE's come longest first), the same on every rank."""

    def activations(params: Mapping[str, torch.Tensor], features: list[str], count: int) -> dict:
        rows = spread_indices(len(loader.dataset), count * loader.batch_size).tolist()
        batches = DataLoader(Subset(loader.dataset, rows), batch_size=loader.batch_size, collate_fn=loader.collate_fn)
        return feature_moments(model.model_a, params, model.spec, features, batches, special)

    return activations


def _special_token_ids(datamodule: Any, exclude_special: bool) -> list[int] | None:
    """The tokens the statistics leave out (``exclude_special_tokens``): the tokenizer's special ones."""
    tokenizer = getattr(datamodule, "tokenizer", None)
    return tokenizer.all_special_ids if exclude_special and tokenizer is not None else None


def _with_references(alignments: Mapping[str, Any], references: Mapping[str, Any]) -> dict[str, Any]:
    """A pair merge's alignments to save: a method that transforms model A too (ZipIt!) under ``method/model0`` and
    ``method/model1``, as N-model merges key them (`_alignments_by_model`)."""
    both = {name: [references[name], groups] for name, groups in alignments.items() if name in references}
    alone = {name: groups for name, groups in alignments.items() if name not in references}
    return {**alone, **_alignments_by_model(both, {})}


def _report_folding(model: InterpolationModule) -> dict[str, list[str]]:
    """Say which methods evaluate folded endpoints and what they untie: nothing is approximated silently."""
    untied = {}
    for method in model.method_names:
        if not model.folds(method):
            continue
        untied[method] = model.untied(method)
        detail = "; ".join(f"{name} untied from {model.spec.ties[name]}" for name in untied[method])
        _say(f"{method}: LayerNorm gains folded into the layers that read them in both endpoints (same functions)"
             + (f"; {detail} in both" if detail else ""))
    return {method: names for method, names in untied.items() if names}


def _alignments_by_model(joint: Mapping[str, list], pairwise: Mapping[str, Mapping[tuple[int, int], Any]]) -> dict:
    """What ``alignments.safetensors`` holds for N models: keys ``method/model{k}/group`` (into model 0's basis) and,
    for pairwise methods, ``method/pair{i}-{j}/group`` (model j into model i's)."""
    out = {f"{name}/model{k}": groups for name, per_model in joint.items() for k, groups in enumerate(per_model)}
    out.update({f"{name}/pair{i}-{j}": groups for name, per_pair in pairwise.items()
                for (i, j), groups in per_pair.items()})
    return out


def _cycle_errors(model: InterpolationModule) -> dict[str, float | None]:
    """Per method, the share of features whose pairwise alignments do not compose (P_ik ≠ P_jk ∘ P_ij): of the
    pairwise fits for pairwise methods, of the alignments their common basis implies for joint ones (0 by
    construction); None where an alignment is not a permutation."""
    errors: dict[str, float | None] = {}
    for method, per_model in model.joint_alignments.items():
        per_pair = model.pair_alignments.get(method)
        alignments = list(per_pair.values()) if per_pair is not None else per_model
        if not permutations_only(alignments):
            errors[method] = None
            continue
        if per_pair is None:
            per_pair = pairwise_from_joint(with_identities(model.spec, per_model))
        errors[method] = cycle_consistency_error(
            {pair: with_identities(model.spec, [groups])[0] for pair, groups in per_pair.items()})
    return errors


BARRIER_COLUMNS = ("barrier", "barrier_midpoint", "loss_a", "loss_b", "function_preserving")


def _output_bytes(model: InterpolationModule, export_method: str | None) -> int:
    """About what a merge writes: the merged model in float32 if one is exported, plus curves, tables and logs."""
    parameters = sum(p.numel() for p in model.model_a.parameters())
    return (4 * parameters if export_method is not None else 0) + 16 * 2**20


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name (tied ones once), detached: what weight-based methods read."""
    return {name: param.detach() for name, param in model.named_parameters()}


class RankStridedSampler(DistributedSampler):
    """Every rank takes every world_size-th item, none repeated, so sums over ranks equal one process's sums.

    Lightning's own DistributedSampler pads ranks to equal length by repeating items, which would count them twice
    in the statistics and curves. The world is read when iterating, after the strategy has set up the processes;
    being a DistributedSampler, Lightning leaves it in place. Evaluation only: ranks may run one batch apart.
    """

    def __init__(self, dataset: Any) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, len(self.dataset), world))

    def __len__(self) -> int:
        rank, world = self._world()
        return len(range(rank, len(self.dataset), world))


def _unrepeated(loader: DataLoader, batch_size: int | None = None) -> DataLoader:
    """The same loader (or with another batch size), split across ranks without repeats (`RankStridedSampler`)."""
    return DataLoader(loader.dataset, batch_size=batch_size or loader.batch_size,
                      sampler=RankStridedSampler(loader.dataset), collate_fn=loader.collate_fn,
                      num_workers=loader.num_workers)


def _first(loaders: Any, batch_size: int | None = None) -> Any:
    return _unrepeated(loaders[0] if isinstance(loaders, (list, tuple)) else loaders, batch_size)


def _statistics_loader(datamodule: Any, split: str, max_blocks: int | None, batch_size: int | None) -> Any:
    """Unmasked text of ``split`` when the datamodule offers it (MLM), else its (first) validation inputs; in batches
    of ``batch_size`` (None: the datamodule's)."""
    features = getattr(datamodule, "features_dataloader", None)
    if callable(features):
        return _unrepeated(features(split=split, max_blocks=max_blocks), batch_size)
    return _first(datamodule.val_dataloader(), batch_size)


def _learning_precision(precision: str) -> str:
    """A learned alignment's maps and inverses need float32 at least: half-precision-only runs learn in float32."""
    return "32-true" if str(precision) in ("16-true", "bf16-true", "16", "bf16") else precision


def _training_batches(datamodule: Any, method: str) -> DataLoader:
    """The datamodule's training loader for a learned method; one clear error when it has none."""
    problem = f"method {method!r} trains on the datamodule's training batches, but"
    datamodule.setup("fit")
    try:
        loader = datamodule.train_dataloader()
    except (NotImplementedError, MisconfigurationException) as err:
        raise DataError(f"{problem} it has none ({err}); give it a training split") from err
    if len(loader) == 0:
        raise DataError(f"{problem} its training split is empty; give it training text")
    return loader


def _task_metrics(datamodule: Any) -> torchmetrics.MetricCollection | None:
    """The task metrics of a classification datamodule (a GLUE task), evaluated along λ beside the loss."""
    task = getattr(datamodule, "task", None)
    if task is None or not hasattr(task, "metrics"):
        return None
    from lightning_merge.modules.glue import task_metrics

    return task_metrics(task)
