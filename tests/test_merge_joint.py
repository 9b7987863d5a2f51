"""Joint alignment of N models: planted copies are all brought back exactly, joint alignments compose around every
cycle while pairwise matching need not, and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import apply_alignments, permutations
from lightning_merge.merge.joint import (
    align_to_reference,
    cycle_consistency_error,
    merge_many,
    pairwise_from_joint,
)
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model
from lightning_merge.merge.weight_matching import weight_matching


def random_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = tiny_model("bert", "masked_lm").double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model.state_dict()


@pytest.fixture(scope="module")
def spec():
    return spec_for_model(tiny_model("bert", "masked_lm"))


@pytest.mark.parametrize("joint", [merge_many, align_to_reference])
def test_planted_copies_are_all_aligned_back_exactly(spec, joint):
    reference = random_state(0)
    planted = [random_permutations(spec, torch.Generator().manual_seed(seed)) for seed in (1, 2, 3)]
    copies = [apply_alignments(reference, spec, permutations(perms)) for perms in planted]
    found = joint(spec, [reference, *copies])
    assert all(torch.equal(p.perm, torch.arange(p.perm.numel())) for p in found[0].values())
    for copy, alignments in zip(copies, found[1:]):
        back = apply_alignments(copy, spec, alignments)
        assert max((back[n] - reference[n]).abs().max().item() for n in reference) <= 1e-12


def test_joint_alignments_compose_around_every_cycle_and_pairwise_ones_need_not(spec):
    states = [random_state(seed) for seed in (10, 11, 12)]
    pairwise = {(i, j): weight_matching(spec, states[i], states[j]) for i in range(3) for j in range(i + 1, 3)}
    assert cycle_consistency_error(pairwise) > 0.05  # unrelated models: pairwise matches disagree around the cycle
    assert cycle_consistency_error(pairwise_from_joint(merge_many(spec, states))) == 0.0


def test_joint_alignment_needs_two_models_and_cycles_three(spec):
    with pytest.raises(ConfigError, match="at least two models, got 1"):
        merge_many(spec, [random_state(0)])
    with pytest.raises(ConfigError, match="at least three models"):
        cycle_consistency_error(pairwise_from_joint(align_to_reference(spec, [random_state(0), random_state(1)])))


# --- activation-based joint methods of N models (one statistics pass) ---------------------------------------------


def batches(family: str = "bert", count: int = 4) -> list[dict[str, torch.Tensor]]:
    from conftest import tiny_batch

    return [tiny_batch(family, seed) for seed in range(count)]


def perturbed_model(family: str, seed: int, task: str = "masked_lm") -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_model(family, task).double().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return model


def joint_inputs(models, spec, statistics=None):
    from lightning_merge.merge.joint_methods import JointInputs
    from lightning_merge.merge.method import FitInputs

    weights = [dict(m.named_parameters()) for m in models]
    return JointInputs(spec, len(models), lambda i, j: FitInputs(
        spec, weights[i], weights[j], statistics=statistics.pair(i, j) if statistics else None))


def test_one_pass_over_n_models_gives_every_pairs_own_statistics():
    from lightning_merge.merge.features import collect_joint_statistics, collect_statistics

    models = [perturbed_model("bert", seed) for seed in range(3)]
    spec = spec_for_model(models[0])
    joint = collect_joint_statistics(models, batches(), spec, products="float64")
    for (i, j), pair in joint.pairs.items():
        alone = collect_statistics(models[i], models[j], batches(), spec, products="float64")
        for key, value in alone.state_tensors().items():
            assert torch.equal(pair.state_tensors()[key], value), ((i, j), key)


def test_statistics_of_n_models_grow_with_pairs_not_tokens():
    from lightning_merge.merge.features import collect_joint_statistics

    models = [perturbed_model("bert", seed) for seed in range(4)]
    spec = spec_for_model(models[0])
    few = collect_joint_statistics(models, batches(count=1), spec)
    many = collect_joint_statistics(models, batches(count=4), spec)
    assert many.token_count > few.token_count and many.nbytes() == few.nbytes()
    pair = collect_joint_statistics(models[:2], batches(count=1), spec)
    assert few.nbytes() == 6 * pair.nbytes()  # N(N-1)/2 pairs of O(d²) sums each


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("name", ["to_reference", "merge_many", "merge_many[by=weights]", "cycle_consistent",
                                  "cycle_consistent[groups=ff+attn[monotonic]+res[last]]"])
def test_every_joint_method_aligns_planted_copies_back_exactly(family, name):
    from lightning_merge.merge.features import collect_joint_statistics
    from lightning_merge.merge.joint_methods import fit_joint
    from lightning_merge.merge.methods import get_method

    task = "causal_lm" if family == "gpt2" else "masked_lm"
    reference = perturbed_model(family, 0, task)
    spec = spec_for_model(reference)
    kinds = ("ff", "res") if "monotonic" in name else ("ff", "attn", "res")  # monotonic keeps heads in place
    models = [reference]
    for seed in (1, 2, 3):
        copy = perturbed_model(family, 0, task)
        drawn = random_permutations(spec, torch.Generator().manual_seed(seed), kinds=kinds)
        copy.load_state_dict(apply_alignments(copy.state_dict(), spec, permutations(drawn)))
        models.append(copy)
    statistics = collect_joint_statistics(models, batches(family), spec, products="float64")
    found = fit_joint(get_method(name), joint_inputs(models, spec, statistics))
    state = reference.state_dict()
    for model, alignments in zip(models, found):
        back = apply_alignments(model.state_dict(), spec, alignments)
        assert max((back[n] - state[n]).abs().max().item() for n in state) <= 1e-12


def noisy_moments(noise: float, models: int = 5, size: int = 64, tokens: int = 2000):
    """Pairwise moments of ``models`` noisy, permuted copies of the same features, and the planted permutations."""
    from lightning_merge.merge.stats import PairStatistics

    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(tokens, size, generator=generator)
    planted = [torch.arange(size), *(torch.randperm(size, generator=generator) for _ in range(models - 1))]
    features = [shared[:, p] + noise * torch.randn(tokens, size, generator=generator) for p in planted]
    moments = {}
    for i in range(models):
        for j in range(i + 1, models):
            stats = PairStatistics(size)
            stats.update(features[i], features[j])
            moments[(i, j)] = stats.moments()
    from lightning_merge.merge.permute import invert_permutation

    return moments, [invert_permutation(p) for p in planted]


def test_joint_matching_recovers_noisy_features_that_one_reference_cannot():
    from lightning_merge.merge.joint import (
        cycle_consistent_by_activations,
        merge_many_by_activations,
        to_reference_by_activations,
    )
    from lightning_merge.merge.matching import match_features

    moments, expected = noisy_moments(noise=4.0)

    def recovered(perms):
        return sum(float((p == e).float().mean()) for p, e in zip(perms, expected)) / len(expected)

    assert recovered(to_reference_by_activations(moments, 5, match_features)) < 0.9
    assert recovered(merge_many_by_activations(moments, 5, match_features)) == 1.0
    assert recovered(cycle_consistent_by_activations(moments, 5, match_features)) == 1.0


def test_in_a_pair_merge_merge_many_is_the_paper_s_matching():
    from lightning_merge.merge.features import collect_statistics
    from lightning_merge.merge.method import FitInputs
    from lightning_merge.merge.methods import get_method

    models = [perturbed_model("bert", seed) for seed in (5, 6)]
    spec = spec_for_model(models[0])
    statistics = collect_statistics(*models, batches(), spec, products="float64")
    inputs = FitInputs(spec, statistics=statistics)
    paper = get_method("ff+attn+res").fit(inputs.view(frozenset({"statistics"})))
    for name in ("merge_many", "to_reference", "cycle_consistent"):
        joint = get_method(name).fit(inputs.view(frozenset({"statistics"})))
        assert all(torch.equal(joint[g].perm, paper[g].perm) for g in paper), name


@pytest.mark.parametrize("name, message", [
    ("merge_many[groups=attn[linear]]", "attn\\[linear\\] is not a permutation"),
    ("cycle_consistent[groups=res[orthogonal]]", "res\\[orthogonal\\] is not a permutation"),
    ("merge_many[max_rounds=0]", "max_rounds=0 must be at least 1"),
    ("merge_many[by=gradients]", "choose one of activations, weights"),
    ("merge_many[by=weights,groups=ff]", "by=weights aligns every group"),
    ("to_reference[method=learned]", "pairwise alignment that needs no training loss"),
    ("to_reference[method=merge_many]", "pairwise alignment"),
])
def test_bad_joint_method_options_are_refused(name, message):
    from lightning_merge.merge.methods import get_method

    with pytest.raises(ConfigError, match=message):
        get_method(name)
