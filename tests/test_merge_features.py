"""FeatureRecorder: hooks on the spec's feature points, token features of real tokens only."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import tiny_config
from transformers import BertForMaskedLM

from lightning_merge.errors import ArchitectureMismatch
from lightning_merge.merge.features import FeatureRecorder
from lightning_merge.merge.spec import spec_for_model


@pytest.fixture
def model() -> BertForMaskedLM:
    return BertForMaskedLM(tiny_config()).eval()


def inputs() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    return dict(input_ids=input_ids, attention_mask=attention_mask)


@torch.no_grad()
def test_features_of_real_tokens_at_every_point(model):
    spec = spec_for_model(model)
    with FeatureRecorder(model, spec) as recorder:
        out = model(**inputs(), output_hidden_states=True)
        features = recorder.pop(inputs()["attention_mask"])
    assert set(features) == set(spec.groups)
    assert features["ff.1"]["bert.encoder.layer.1.output.dense:input"].shape == (9, 24)
    assert features["attn.0"]["bert.encoder.layer.0.attention.output.dense:input"].shape == (9, 16)
    residual = list(features["res"].values())
    assert len(residual) == 5 and all(x.shape == (9, 16) for x in residual)
    keep = inputs()["attention_mask"].bool()
    torch.testing.assert_close(residual[0], out.hidden_states[0][keep])  # after the embedding LayerNorm
    torch.testing.assert_close(residual[-1], out.hidden_states[-1][keep])  # after the last layer


@torch.no_grad()
def test_special_tokens_excluded_and_groups_selected(model):
    spec = spec_for_model(model)
    special = torch.zeros(2, 6, dtype=torch.long)
    special[:, 0] = 1
    with FeatureRecorder(model, spec, groups=["ff.0"]) as recorder:
        model(**inputs())
        features = recorder.pop(inputs()["attention_mask"], special)
    assert list(features) == ["ff.0"]
    assert next(iter(features["ff.0"].values())).shape == (7, 24)


@torch.no_grad()
def test_hooks_are_removed(model):
    recorder = FeatureRecorder(model, spec_for_model(model))
    with recorder:
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="no activation recorded"):
        recorder.pop(inputs()["attention_mask"])


def test_missing_module_is_named(model):
    spec = spec_for_model(model)
    with pytest.raises(ArchitectureMismatch, match="no module bert.encoder.layer.0.output.dense"):
        FeatureRecorder(model.bert, spec, groups=["ff.0"]).register()


def test_collect_statistics_masks(model):
    from lightning_merge.errors import DataError
    from lightning_merge.merge.features import collect_statistics

    spec = spec_for_model(model)
    special = torch.zeros(2, 6, dtype=torch.long)
    special[:, 0] = 1
    batch = dict(inputs(), special_tokens_mask=special, labels=torch.zeros(2, 6, dtype=torch.long))
    assert collect_statistics(model, model, [batch], spec, ["ff.0"]).token_count == 9
    assert collect_statistics(model, model, [batch], spec, ["ff.0"], exclude_special_tokens=True).token_count == 7
    with pytest.raises(DataError, match="needs an attention_mask"):
        collect_statistics(model, model, [dict(input_ids=batch["input_ids"])], spec, ["ff.0"])
    with pytest.raises(DataError, match="needs a special_tokens_mask"):
        collect_statistics(model, model, [inputs()], spec, ["ff.0"], exclude_special_tokens=True)


def _other_model() -> BertForMaskedLM:
    torch.manual_seed(1)
    return BertForMaskedLM(tiny_config()).eval()


@torch.no_grad()
def test_pair_recorder_streams_the_same_sums_as_two_recorders(model):
    from lightning_merge.merge.features import PairStatisticsRecorder
    from lightning_merge.merge.stats import MergeStatistics

    model_b, spec = _other_model(), spec_for_model(model)
    special = torch.zeros(2, 6, dtype=torch.long)
    special[:, -1] = 1
    everything = torch.ones(2, 6, dtype=torch.long)  # nothing dropped: the recorder keeps views, not copies
    batches = [(inputs()["attention_mask"], None), (everything, special), (everything, None)]
    streamed, popped = MergeStatistics(spec), MergeStatistics(spec)
    with PairStatisticsRecorder(model, model_b, streamed) as recorder:
        for mask, special_mask in batches:
            recorder.begin_batch(mask, special_mask)
            model(input_ids=inputs()["input_ids"], attention_mask=mask)
            model_b(input_ids=inputs()["input_ids"], attention_mask=mask)
            recorder.end_batch()
    with FeatureRecorder(model, spec) as recorder_a, FeatureRecorder(model_b, spec) as recorder_b:
        for mask, special_mask in batches:
            model(input_ids=inputs()["input_ids"], attention_mask=mask)
            model_b(input_ids=inputs()["input_ids"], attention_mask=mask)
            popped.update_from_features(recorder_a.pop(mask, special_mask), recorder_b.pop(mask, special_mask))
    assert streamed.token_count == popped.token_count == 9 + 10 + 12
    for key, tensor in popped.state_tensors().items():
        torch.testing.assert_close(streamed.state_tensors()[key], tensor, rtol=0, atol=1e-12)


@torch.no_grad()
def test_pair_recorder_rejects_b_first_and_incomplete_batches(model):
    from lightning_merge.merge.features import PairStatisticsRecorder
    from lightning_merge.merge.stats import MergeStatistics

    model_b, spec = _other_model(), spec_for_model(model)
    with PairStatisticsRecorder(model, model_b, MergeStatistics(spec, ["ff.0"])) as recorder:
        with pytest.raises(RuntimeError, match="outside begin_batch"):
            model(**inputs())
        recorder.begin_batch(inputs()["attention_mask"])
        with pytest.raises(RuntimeError, match="model B reached .* before model A"):
            model_b(**inputs())
        recorder.begin_batch(inputs()["attention_mask"])
        model(**inputs())
        with pytest.raises(RuntimeError, match="no activation of model B recorded at bert.encoder.layer.0"):
            recorder.end_batch()
    assert not any(m._forward_hooks for m in (*model.modules(), *model_b.modules()))


@torch.no_grad()
def test_a_removed_pair_recorder_frees_its_statistics_without_the_cyclic_collector(model, no_automatic_gc):
    from lightning_merge.merge.features import PairStatisticsRecorder
    from lightning_merge.merge.stats import MergeStatistics

    model_b, spec = _other_model(), spec_for_model(model)
    statistics = MergeStatistics(spec, ["ff.0"])
    alive = weakref.ref(statistics)
    recorder = PairStatisticsRecorder(model, model_b, statistics)
    for _ in range(2):  # registering again after a removal records again
        with recorder:
            recorder.begin_batch(inputs()["attention_mask"])
            model(**inputs())
            model_b(**inputs())
            recorder.end_batch()
    assert statistics.token_count == 2 * 9
    del statistics, recorder
    assert alive() is None  # no reference cycle left: freed by reference counting alone


@torch.no_grad()
def test_a_pair_recorder_that_fails_to_register_leaves_no_hooks(model):
    from lightning_merge.merge.features import PairStatisticsRecorder
    from lightning_merge.merge.stats import MergeStatistics

    spec = spec_for_model(model)
    not_bert = torch.nn.Linear(2, 2)  # model B lacks every feature module: its hooks fail after A's are in place
    with pytest.raises(ArchitectureMismatch, match="has no module"):
        with PairStatisticsRecorder(model, not_bert, MergeStatistics(spec, ["ff.0"])):
            pass
    assert not any(m._forward_hooks for m in model.modules())


def test_kept_tokens_is_a_view_when_nothing_is_dropped():
    from lightning_merge.merge.features import kept_tokens

    value = torch.randn(2, 3, 4)
    assert kept_tokens(value, None).data_ptr() == value.data_ptr()
    keep = torch.tensor([[True, False, True], [True, True, False]])
    torch.testing.assert_close(kept_tokens(value, keep), value[keep])
