"""The merge pipeline end to end on tiny models: statistics pass, matching, curves, outputs."""

from __future__ import annotations

import gc
import json

import pytest
import pytorch_lightning as pl
import torch
from conftest import tiny_config as family_config
from torch.utils.data import DataLoader
from transformers import AutoModelForMaskedLM, BertForMaskedLM, PretrainedConfig

from lightning_merge.errors import (
    ArchitectureMismatch,
    CheckpointError,
    ConfigError,
    DataError,
    OutputError,
    OutputExistsError,
    UnknownNameError,
)
from lightning_merge.merge.alignment import HeadLinear, Permutation, apply_alignments, load_alignments, permutations
from lightning_merge.merge.permute import invert_permutation, random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.stats import PairStatistics
from lightning_merge.modules.merge import InterpolationModule, _PointOutputs
from lightning_merge.report import MERGE_COMPLETE
from lightning_merge.trainer import MergeTrainer

VOCAB = 40


class StatisticsBatchSizes(pl.Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.sizes.append(len(batch["input_ids"]))


class RandomTokens(pl.LightningDataModule):
    """Random token blocks with fixed masks: enough to exercise every code path of a merge."""

    def __init__(self, blocks: int = 16, length: int = 12) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.input_ids = torch.randint(5, VOCAB, (blocks, length), generator=generator)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[::3, -4:] = 0  # some padding
        masked = (torch.rand(self.input_ids.shape, generator=generator) < 0.3) & self.attention_mask.bool()
        self.labels = torch.where(masked, self.input_ids, -100)
        self.tokenizer = None

    def _loader(self, with_labels: bool) -> DataLoader:
        rows = [
            {"input_ids": i, "attention_mask": m, **({"labels": label} if with_labels else {})}
            for i, m, label in zip(self.input_ids, self.attention_mask, self.labels)
        ]
        return DataLoader(rows, batch_size=4)

    def features_dataloader(self, split: str = "train", max_blocks: int | None = None) -> DataLoader:
        return self._loader(False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(True)

    test_dataloader = val_dataloader
    train_dataloader = val_dataloader  # what a learned alignment trains on


def fit_briefly(model: BertForMaskedLM, data: RandomTokens, steps: int = 60) -> BertForMaskedLM:
    """Overfit a few steps, so that averaging with a misaligned copy costs loss (random weights barely do)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = next(iter(DataLoader(list(data.val_dataloader().dataset), batch_size=len(data.input_ids))))
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model


def tiny_config(**overrides) -> PretrainedConfig:
    return family_config("bert", **{"vocab_size": VOCAB, "num_attention_heads": 2, **overrides})  # 2 heads of 8


@pytest.fixture(scope="module")
def permuted_pair(tmp_path_factory):
    """Model A, and model B = A with planted random permutations of every group."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(1)
    model = fit_briefly(BertForMaskedLM(tiny_config()), RandomTokens()).eval()
    spec = spec_for_model(model)
    planted = random_permutations(spec, torch.Generator().manual_seed(3))
    model.save_pretrained(root / "a")
    model.load_state_dict(apply_alignments(model.state_dict(), spec, permutations(planted)))
    model.save_pretrained(root / "b")
    return root / "a", root / "b", planted


def merge(tmp_path, model_a, model_b, methods, **kwargs):
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 0.25, 0.5, 0.75, 1])
    return trainer.merge(module, RandomTokens(), methods=methods, **kwargs)


def test_merge_with_permuted_self_is_flat_only_when_aligned(tmp_path, permuted_pair) -> None:
    model_a, model_b, planted = permuted_pair
    results = merge(tmp_path, model_a, model_b, ["vanilla", "ff+attn+res"])
    barriers = results["barriers"]
    assert barriers["ff+attn+res"]["barrier"] <= 1e-4
    assert barriers["vanilla"]["barrier"] > 1e-2
    losses = results["curves"]["ff+attn+res"]["loss"]
    assert max(losses) - min(losses) <= 1e-4  # the whole path is one function
    run = tmp_path / "run"
    alignments = load_alignments(run / "alignments.safetensors")
    for group, perm in planted.items():
        assert torch.equal(alignments["ff+attn+res"][group].perm, invert_permutation(perm)), group
    assert json.loads((run / "barriers.json").read_text())["vanilla"]["barrier"] == barriers["vanilla"]["barrier"]
    assert (run / "curves.csv").read_text().startswith("method,lambda,loss")
    assert (run / "barrier.png").stat().st_size > 0
    merged = AutoModelForMaskedLM.from_pretrained(run / "merged")
    assert merged.cls.predictions.decoder.weight.data_ptr() == merged.bert.embeddings.word_embeddings.weight.data_ptr()


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """One entry per model evaluation of the curves (`functional_call` in the merge module)."""
    import lightning_merge.modules.merge as merge_module

    calls: list[int] = []
    functional_call = merge_module.functional_call

    def counted(*args, **kwargs):
        calls.append(1)
        return functional_call(*args, **kwargs)

    monkeypatch.setattr(merge_module, "functional_call", counted)
    return calls


def test_points_holding_the_models_own_weights_run_once_per_batch(tmp_path, permuted_pair, forwards,
                                                                  monkeypatch) -> None:
    """λ = 0 of both methods and the endpoint A are one computation, as are vanilla's λ = 1 and the endpoint B;
    the curves are exactly those of evaluating every point."""
    model_a, model_b, _ = permuted_pair
    reused = merge(tmp_path / "reused", model_a, model_b, ["vanilla", "ff+attn+res"])
    batches, lambdas = 4, 5
    assert len(forwards) == batches * (2 * lambdas + 2 - 3)  # A twice and B once not run again
    forwards.clear()
    monkeypatch.setattr(_PointOutputs, "get", lambda self, key: None)
    every_point = merge(tmp_path / "every", model_a, model_b, ["vanilla", "ff+attn+res"])
    assert len(forwards) == batches * (2 * lambdas + 2)
    assert reused["curves"] == every_point["curves"] and reused["endpoints"] == every_point["endpoints"]


def test_a_joint_merge_runs_each_of_its_points_once_per_batch(tmp_path, permuted_pair, forwards,
                                                              monkeypatch) -> None:
    """A vertex ends two lines and is a point of its own, an edge's midpoint is on the triangle grid too, and the
    reference model is the same in every method: each runs once, and the results are those of running them all."""
    model_a, model_b, _ = permuted_pair
    model_c = BertForMaskedLM.from_pretrained(model_a)  # a third copy of A, permuted otherwise
    spec = spec_for_model(model_c)
    model_c.load_state_dict(apply_alignments(model_c.state_dict(), spec, permutations(
        random_permutations(spec, torch.Generator().manual_seed(5)))))
    model_c.save_pretrained(tmp_path / "c")
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def joint_merge(run: str) -> dict:
        trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / run), **quiet)
        module = InterpolationModule(models=[str(model_a), str(model_b), str(tmp_path / "c")], lambdas=[0, 0.5, 1],
                                     simplex_steps=2)
        return trainer.merge(module, RandomTokens(), methods=["vanilla", "to_reference"], export_method="vanilla")

    reused = joint_merge("reused")
    runs = len(forwards)
    forwards.clear()
    monkeypatch.setattr(_PointOutputs, "get", lambda self, key: None)
    every_point = joint_merge("every")
    batches, points = 4, 2 * (3 * 3 + 3 + 1 + 3)  # per method: 3 lines of 3, 3 vertices, the average, 3 inside
    assert len(forwards) == batches * points
    # vanilla (pairwise: its lines in each pair's basis): each model once, three line midpoints, three inside, the
    # average = 10; to_reference (one common basis): its vertices 1 and 2, three midpoints, the average = 6 (vertex
    # 0 is model 0 itself, run for vanilla already)
    assert runs == batches * (10 + 6)
    assert reused["timings"]["curve_points"] == points
    timings = ("timings",)
    assert {k: v for k, v in reused.items() if k not in timings} == {
        k: v for k, v in every_point.items() if k not in timings}


BEYOND_THE_PAPER = ["vanilla", "weight_matching", "ff+attn[linear]+res", "learned[init=permute,steps=4]",
                    "learned[init=ff+attn[linear]+res,steps=4,attn=linear]"]


def test_every_alignment_kind_goes_through_the_merge(tmp_path, permuted_pair, capsys) -> None:
    model_a, model_b, planted = permuted_pair
    batches = StatisticsBatchSizes()
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[batches],
                           **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 0.5, 1])
    results = trainer.merge(module, RandomTokens(), methods=BEYOND_THE_PAPER, export_method=BEYOND_THE_PAPER[-1])
    assert batches.sizes  # one statistics pass, for the methods that need statistics
    for name in BEYOND_THE_PAPER[1:]:
        assert results["barriers"][name]["barrier"] <= 1e-4, name  # each finds B's planted alignment
        assert results["barriers"][name]["function_preserving"] is True
        assert results["timings"]["fit_s"][name] >= 0.0
    assert results["methods"]["weight_matching"]["needs"] == ["weights"]
    assert results["methods"]["learned[init=permute,steps=4]"]["needs"] == ["loss", "statistics", "weights"]
    saved = load_alignments(tmp_path / "run" / "alignments.safetensors")
    assert list(saved) == BEYOND_THE_PAPER and saved["vanilla"] == {}
    assert isinstance(saved["ff+attn[linear]+res"]["attn.0"], HeadLinear)
    assert isinstance(saved[BEYOND_THE_PAPER[-1]]["attn.1"], HeadLinear)
    assert isinstance(saved["weight_matching"]["res"], Permutation)
    assert torch.equal(saved["weight_matching"]["res"].perm, invert_permutation(planted["res"]))
    assert "| function_preserving |" in capsys.readouterr().out
    assert (tmp_path / "run" / "merged" / "config.json").is_file()


def test_methods_without_statistics_skip_the_statistics_pass(tmp_path, permuted_pair) -> None:
    model_a, model_b, planted = permuted_pair
    batches = StatisticsBatchSizes()
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[batches],
                           **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 0.5, 1])
    results = trainer.merge(module, RandomTokens(), methods=["vanilla", "weight_matching"], export_method=None)
    assert batches.sizes == [] and "statistics_s" not in results["timings"]
    assert results["barriers"]["weight_matching"]["barrier"] <= 1e-4


class NoFeatures(RandomTokens):
    def features_dataloader(self, split: str = "train", max_blocks: int | None = None) -> DataLoader:
        return DataLoader([], batch_size=4)


class NoTrainingSplit(pl.LightningDataModule):
    """A datamodule with evaluation data only: nothing a learned method could train on."""

    def __init__(self) -> None:
        super().__init__()
        self.data = RandomTokens()
        self.tokenizer = None

    def features_dataloader(self, split: str = "train", max_blocks: int | None = None) -> DataLoader:
        return self.data.features_dataloader(split, max_blocks)

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()


def test_missing_statistics_or_training_data_names_the_method_and_the_fix(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(model_a), str(model_b))
    with pytest.raises(DataError, match="^ff, permute need activation statistics, but the statistics data is empty.*"
                                        "weight_matching"):
        trainer.merge(module, NoFeatures(), methods=["vanilla", "ff", "permute", "weight_matching"], export_method=None)
    with pytest.raises(DataError, match="method 'learned\\[init=weight_matching\\]' trains on the datamodule's "
                                        "training batches, but it has none"):
        trainer.merge(module, NoTrainingSplit(), methods=["learned[init=weight_matching]"], export_method=None)
    assert not (tmp_path / "run" / "barriers.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_learned_methods_train_on_the_gpu(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="gpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 0.5, 1])
    methods = ["learned[init=weight_matching,steps=3]", "learned[attn=linear,steps=3]"]
    results = trainer.merge(module, RandomTokens(), methods=methods, export_method=None)
    assert all(results["barriers"][name]["barrier"] <= 1e-3 for name in methods)


def test_a_nan_weight_stops_the_merge_with_one_line_and_writes_nothing(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    broken = BertForMaskedLM.from_pretrained(model_b)
    with torch.no_grad():
        broken.bert.encoder.layer[0].intermediate.dense.weight[0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    with pytest.raises(CheckpointError, match="nan has 1 non-finite value"):
        InterpolationModule(str(model_a), str(tmp_path / "nan"))
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(model_a), str(tmp_path / "nan"), lambdas=[0, 0.5, 1], allow_nonfinite=True)
    with pytest.raises(DataError, match="the loss of method 'vanilla' at lambda=0.5 is nan"):
        trainer.merge(module, RandomTokens(), methods=["vanilla"], export_method=None)
    assert not any(p.name in ("barriers.json", "results.json") for p in (tmp_path / "run").rglob("*"))


def test_only_a_complete_merge_counts_as_an_earlier_run(tmp_path, permuted_pair, capsys) -> None:
    model_a, model_b, _ = permuted_pair
    run = tmp_path / "run"
    run.mkdir()
    (run / "barriers.json").write_text("{}")  # an earlier merge killed while exporting: no completion marker
    (run / ".merged.abc123.tmp").mkdir()  # its half-written export
    (run / ".results.json.77.tmp").write_text("half")
    results = merge(tmp_path, model_a, model_b, ["vanilla", "ff+attn+res"])
    assert (run / MERGE_COMPLETE).is_file() and (run / "merged" / "config.json").is_file()
    assert not list(run.glob(".*.tmp")) and "incomplete earlier merge" in capsys.readouterr().out
    assert json.loads((run / "barriers.json").read_text()) == json.loads(json.dumps(results["barriers"]))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge(tmp_path, model_a, model_b, ["vanilla"], export_method=None)


def test_a_merge_without_room_for_its_outputs_stops_before_any_work(tmp_path, permuted_pair, monkeypatch) -> None:
    from collections import namedtuple

    from lightning_merge import io

    model_a, model_b, _ = permuted_pair
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free
    with pytest.raises(OutputError, match="the merge's outputs needs about 1[67] MiB in .*, but only 1 MiB are free"):
        merge(tmp_path, model_a, model_b, ["vanilla", "ff+attn+res"])
    assert not (tmp_path / "run" / "barriers.json").exists()


def test_existing_run_is_not_overwritten(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    merge(tmp_path, model_a, model_b, ["vanilla"], export_method=None)
    before = (tmp_path / "run" / "barriers.json").read_text()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge(tmp_path, model_a, model_b, ["vanilla"], export_method=None)
    assert (tmp_path / "run" / "barriers.json").read_text() == before


def test_unknown_method_fails_before_any_work(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    with pytest.raises(UnknownNameError, match="zipit"):
        merge(tmp_path, model_a, model_b, ["vanilla", "zipit"])
    assert not (tmp_path / "run").exists()


def test_float32_statistics_and_overlapping_methods(tmp_path, permuted_pair) -> None:
    model_a, model_b, planted = permuted_pair
    methods = ["ff", "res[first]", "ff+attn+res"]  # the ff and res assignments are solved once, saved per method
    results = merge(tmp_path, model_a, model_b, methods, statistics_dtype="float32", export_method=None)
    assert results["barriers"]["ff+attn+res"]["barrier"] <= 1e-4
    alignments = load_alignments(tmp_path / "run" / "alignments.safetensors")
    for group, perm in planted.items():
        assert torch.equal(alignments["ff+attn+res"][group].perm, invert_permutation(perm)), group
    assert torch.equal(alignments["ff"]["ff.0"].perm, alignments["ff+attn+res"]["ff.0"].perm)


def test_statistics_batch_size_changes_the_batches_not_the_result(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    methods = ["ff", "ff+attn+res"]
    default = merge(tmp_path / "default", model_a, model_b, methods, export_method=None)
    batches = StatisticsBatchSizes()
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[batches],
                           **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 0.25, 0.5, 0.75, 1])
    smaller = trainer.merge(module, RandomTokens(), methods=methods, export_method=None, statistics_batch_size=3)
    assert batches.sizes == [3] * 5 + [1]  # 16 blocks in batches of 3, not RandomTokens' 4
    assert smaller["timings"]["statistics_tokens"] == default["timings"]["statistics_tokens"]
    expected = load_alignments(tmp_path / "default" / "run" / "alignments.safetensors")
    got = load_alignments(tmp_path / "run" / "alignments.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[m][g].perm, expected[m][g].perm) for m in got for g in got[m])
    with pytest.raises(ConfigError, match="statistics_batch_size=0 must be at least 1"):
        merge(tmp_path / "zero", model_a, model_b, methods, export_method=None, statistics_batch_size=0)
    assert not (tmp_path / "zero").exists()


class LiveStatisticsAtCurves(pl.Callback):
    def __init__(self) -> None:
        self.count = -1

    def on_test_start(self, trainer, pl_module) -> None:
        self.count = sum(type(o) is PairStatistics for o in gc.get_objects())  # uncollected cycles included


def test_no_statistics_survive_into_the_curves(tmp_path, permuted_pair, no_automatic_gc) -> None:
    # with the automatic collector off, a reference cycle that holds the statistics (the pass's recorders once formed
    # one) would keep them through the curves unless the merge's collection between phases frees them
    model_a, model_b, _ = permuted_pair
    live = LiveStatisticsAtCurves()
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), callbacks=[live],
                           **quiet)
    module = InterpolationModule(str(model_a), str(model_b), lambdas=[0, 1])
    trainer.merge(module, RandomTokens(), methods=["ff+attn+res"], export_method=None)
    assert live.count == 0


class NoMaskFeatures(RandomTokens):
    def features_dataloader(self, split: str = "train", max_blocks: int | None = None) -> DataLoader:
        return DataLoader([{"input_ids": i} for i in self.input_ids], batch_size=4)


def test_a_failed_statistics_pass_leaves_no_hooks_on_the_models(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(model_a), str(model_b))
    with pytest.raises(KeyError, match="attention_mask"):
        trainer.merge(module, NoMaskFeatures(), methods=["ff"], export_method=None)
    assert not any(m._forward_hooks for m in (*module.model_a.modules(), *module.model_b.modules()))


def test_unknown_statistics_dtype_fails_before_any_work(tmp_path, permuted_pair) -> None:
    model_a, model_b, _ = permuted_pair
    with pytest.raises(ConfigError, match="unknown statistics dtype 'float16'; known: float64, float32"):
        merge(tmp_path, model_a, model_b, ["ff"], statistics_dtype="float16", export_method=None)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("lambdas", [[0.0, 0.5], [0.5, 1.0], [0.0, 1.0, 1.5]])
def test_bad_lambda_grid(permuted_pair, lambdas) -> None:
    model_a, model_b, _ = permuted_pair
    with pytest.raises(ConfigError):
        InterpolationModule(str(model_a), str(model_b), lambdas=lambdas)


def test_different_architectures_are_refused(tmp_path, permuted_pair) -> None:
    model_a, _, _ = permuted_pair
    BertForMaskedLM(tiny_config(intermediate_size=48)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ArchitectureMismatch, match="intermediate_size"):
        InterpolationModule(str(model_a), str(tmp_path / "wide"))
    BertForMaskedLM(tiny_config(vocab_size=VOCAB + 1)).save_pretrained(tmp_path / "vocab")
    with pytest.raises(ArchitectureMismatch, match="vocab_size"):
        InterpolationModule(str(model_a), str(tmp_path / "vocab"))


class RandomSentences(RandomTokens):
    """Random token sequences with binary labels, posing as the offline sentiment task."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_merge.data.glue import get_task

        self.task = get_task("rt_polarity")
        self.labels = torch.randint(0, 2, (len(self.input_ids),), generator=torch.Generator().manual_seed(1))


def test_classifier_merge_reports_metric_barriers(tmp_path) -> None:
    from transformers import BertForSequenceClassification

    torch.manual_seed(2)
    for name in ("a", "b"):
        BertForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path / name)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer = MergeTrainer(accelerator="cpu", devices=1, default_root_dir=str(tmp_path / "run"), **quiet)
    module = InterpolationModule(str(tmp_path / "a"), str(tmp_path / "b"), task="sequence_classification",
                                 lambdas=[0, 0.5, 1])
    results = trainer.merge(module, RandomSentences(), methods=["vanilla", "ff+attn+res"])
    for method in ("vanilla", "ff+attn+res"):
        accuracy = results["curves"][method]["accuracy"]
        assert len(accuracy) == 3 and all(0.0 <= a <= 1.0 for a in accuracy)
        assert results["barriers"][method]["accuracy_barrier"] >= 0.0
    assert "accuracy_barrier" in (tmp_path / "run" / "barriers.json").read_text()
