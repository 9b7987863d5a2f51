"""ZipIt!: the greedy merge (budget, linkage, heads), zipping a planted copy, N = 3 models, bad options."""

from __future__ import annotations

import pytest
import torch
from test_merge_fusion import all_params, tiny_bert
from test_merge_methods import batches

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Zip, apply_alignments, permutations
from lightning_merge.merge.features import collect_joint_statistics
from lightning_merge.merge.interpolate import combine_state_dicts, load_state_dict_tied
from lightning_merge.merge.joint_methods import JointInputs
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import fit_methods, get_method
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.zipit import merge_and_unmerge, zip_features


def block_corr(cross: torch.Tensor, within_a: torch.Tensor | None = None) -> torch.Tensor:
    size = cross.shape[0]
    within = torch.eye(size, dtype=torch.float64) if within_a is None else within_a
    return torch.cat([torch.cat([within, cross], 1), torch.cat([cross.T, torch.eye(size, dtype=torch.float64)], 1)])


def test_without_budget_every_cluster_holds_one_feature_of_each_model():
    cross = torch.rand(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5
    cross[torch.arange(6), torch.tensor([3, 0, 5, 1, 2, 4])] = 0.9
    within = torch.eye(6, dtype=torch.float64)
    within[0, 1] = within[1, 0] = 0.99  # A's features 0 and 1 are near duplicates
    members = zip_features(block_corr(cross, within), 2, alpha=0.3, beta=0)
    assert members.shape == (12, 6) and (members[:6].sum(0) == 1).all() and (members[6:].sum(0) == 1).all()
    paired = members[:6].argmax(1), members[6:].argmax(1)
    assert torch.equal(paired[1][torch.tensor([3, 0, 5, 1, 2, 4])], paired[0])  # the planted matches
    with_budget = zip_features(block_corr(cross, within), 2, alpha=0.3, beta=1)
    assert (with_budget[:2].sum(0) == 2).any()  # the duplicates merged within A


def test_merge_and_unmerge_average_the_cluster_and_copy_it_back():
    members = torch.tensor([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=torch.float64)  # A0+B1, A1+B0
    (merge_a, unmerge_a), (merge_b, unmerge_b) = merge_and_unmerge(members, 2)
    assert torch.equal(merge_a, torch.eye(2, dtype=torch.float64)) and torch.equal(unmerge_b, members[2:])
    assert torch.equal(merge_b, torch.tensor([[0, 1], [1, 0]], dtype=torch.float64))


def test_zip_of_a_planted_copy_gives_back_model_a():
    model_a = tiny_bert(0)
    spec = spec_for_model(model_a)
    model_b = tiny_bert(1)
    planted = permutations(random_permutations(spec, torch.Generator().manual_seed(4)))
    load_state_dict_tied(model_b, apply_alignments(model_a.state_dict(), spec, planted))
    method = get_method("zip[beta=0]")
    statistics = collect_joint_statistics([model_a, model_b], batches(), spec, method.statistics_features(spec),
                                          products="float64", own_groups=method.own_features(spec)).pair(0, 1)
    references: dict = {}
    alignments = fit_methods({"zip": method}, FitInputs(spec, statistics=statistics), references=references)
    assert all(isinstance(a, Zip) for a in [*alignments["zip"].values(), *references["zip"].values()])
    zipped = [apply_alignments(m.state_dict(), spec, groups)
              for m, groups in ((model_a, references["zip"]), (model_b, alignments["zip"]))]
    merged = combine_state_dicts(zipped, [0.5, 0.5])
    for name, tensor in model_a.state_dict().items():
        assert (merged[name] - tensor).abs().max() <= 1e-10, name
    group = spec.groups["attn.0"]
    unmerge = references["zip"]["attn.0"].unmerge  # A's features -> merged ones, within heads
    heads = unmerge.nonzero()[:, 0] // group.head_dim, unmerge.nonzero()[:, 1] // group.head_dim
    assert torch.equal(heads[0], heads[1])


def test_zip_merges_three_models_into_one():
    models = [tiny_bert(seed) for seed in range(3)]
    spec = spec_for_model(models[0])
    method = get_method("zip")
    joint = collect_joint_statistics(models, batches(), spec, method.statistics_features(spec), products="float64",
                                     own_groups=method.own_features(spec))
    inputs = JointInputs(spec, 3, lambda i, j: FitInputs(spec, statistics=joint.pair(i, j)))
    alignments = method.fit_joint(inputs)
    assert len(alignments) == 3 and all(set(a) == set(spec.groups) for a in alignments)
    ff = [a["ff.0"] for a in alignments]
    assert all(torch.equal(z.unmerge.sum(1), torch.ones(z.unmerge.shape[0], dtype=torch.float64)) for z in ff)
    rows = torch.stack([z.merge.sum(1) for z in ff]).sum(0) / 3
    assert torch.allclose(rows, torch.ones_like(rows))  # every merged feature is a mean of its cluster
    merged = combine_state_dicts([apply_alignments(m.state_dict(), spec, a) for m, a in zip(models, alignments)],
                                 [1 / 3] * 3)
    assert torch.isfinite(merged["bert.encoder.layer.0.output.dense.weight"]).all()
    assert not torch.allclose(merged["bert.encoder.layer.0.output.dense.weight"],
                              all_params(models[0])["bert.encoder.layer.0.output.dense.weight"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("zip[beta=2]", "beta=2.0 asks for more within-model merges than a model has merges"),
        ("zip[beta=-0.1]", "beta=-0.1 asks for more within-model merges"),
        ("zip[alpha=1.5]", "alpha=1.5 must lie in \\[0, 1\\]"),
        ("zip[groups=attn[linear]]", "attn\\[linear\\] has no zip"),
        ("zip[layers=-2]", "layers=-2 must be the number of layers to zip"),
        ("zip[groups=ff+attn,layers=1]", "a partial zip hands its stream .* include res"),
    ],
)
def test_bad_zip_options_name_the_problem(name, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name)


def test_a_partial_zip_zips_the_trunk_only():
    models = [tiny_bert(seed) for seed in range(2)]
    spec = spec_for_model(models[0])  # 2 layers
    method = get_method("zip[layers=1]")
    assert method.split_layer(spec) == 1
    assert get_method("zip[layers=2]").split_layer(spec) is None and get_method("zip").split_layer(spec) is None
    assert method.statistics_features(spec) == ["ff.0", "attn.0", "res"] == method.own_features(spec)
    joint = collect_joint_statistics(models, batches(), spec, method.statistics_features(spec), products="float64",
                                     own_groups=method.own_features(spec))
    alignments = method.fit_joint(JointInputs(spec, 2, lambda i, j: FitInputs(spec, statistics=joint.pair(i, j))))
    assert all(set(a) == {"ff.0", "attn.0", "res"} for a in alignments)
    # the stream is zipped from the points before layer 1 only: the embeddings' LayerNorm and layer 0's two
    assert method._points(spec, spec.groups["res"]) == slice(0, 3)
    assert get_method("zip[layers=1,groups=ff+attn+res[last]]")._points(spec, spec.groups["res"]) == slice(2, 3)
    with pytest.raises(ConfigError, match="layers=3 but the models have 2 layers"):
        get_method("zip[layers=3]").check_spec(spec)


def test_a_spent_budget_bans_only_merges_within_one_model():
    """With no budget A0 and A1 may not merge with each other, but once A0 has joined B0 the mixed cluster may take
    A1; the ban is not inherited through the linkage."""
    corr = torch.tensor([[1.0, 0.95, 0.9, 0.1],   # A0
                         [0.95, 1.0, 0.9, 0.1],   # A1
                         [0.9, 0.9, 1.0, 0.1],    # B0
                         [0.1, 0.1, 0.1, 1.0]],   # B1
                        dtype=torch.float64)
    members = zip_features(corr, 2, alpha=0.5, beta=0)
    clusters = {tuple(column.nonzero().flatten().tolist()) for column in members.T}
    assert clusters == {(0, 1, 2), (3,)}
