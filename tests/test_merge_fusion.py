"""Fusion methods on tiny models: OT's Sinkhorn plans and transport alignment, REPAIR's and RegMean's paths (the
math checked against what the models compute), their composition rules and bad options."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config as family_config
from test_merge_methods import batches, parameters
from transformers import BertForMaskedLM

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import (
    Orthogonal,
    Transport,
    apply_alignments,
    load_alignments,
    permutations,
    save_alignments,
)
from lightning_merge.merge.features import collect_statistics, feature_moments
from lightning_merge.merge.fusion import OptimalTransport, RegMean, Repair, sinkhorn
from lightning_merge.merge.interpolate import load_state_dict_tied
from lightning_merge.merge.matching import match_features
from lightning_merge.merge.method import FitInputs
from lightning_merge.merge.methods import fit_methods, get_method
from lightning_merge.merge.paths import FeatureMoments
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import PermGroup, spec_for_model


def tiny_bert(seed: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(family_config("bert", hidden_size=32, intermediate_size=48)).double().eval()


def statistics_for(model_a, model_b, methods):
    spec = spec_for_model(model_a)
    features = list(dict.fromkeys(f for m in methods for f in m.statistics_features(spec)))
    own = list(dict.fromkeys(f for m in methods for f in m.own_features(spec)))
    return spec, collect_statistics(model_a, model_b, batches(), spec, features, products="float64", own_groups=own)


def fitted(model_a, model_b, names):
    methods = {name: get_method(name) for name in names}
    spec, statistics = statistics_for(model_a, model_b, methods.values())
    inputs = FitInputs(spec, parameters(model_a), parameters(model_b), statistics)
    paths: dict = {}
    alignments = fit_methods(methods, inputs, paths=paths)
    return spec, alignments, paths


def aligned_params(model_b, spec, alignments):
    names = [name for name, _ in model_b.named_parameters(remove_duplicate=False)]
    state = apply_alignments(model_b.state_dict(), spec, alignments)
    return {name: state[name] for name in names}


def all_params(model):
    return {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}


@pytest.fixture(scope="module")
def planted():
    model_a = tiny_bert(0)
    spec = spec_for_model(model_a)
    model_b = tiny_bert(1)
    planted = permutations(random_permutations(spec, torch.Generator().manual_seed(3)))
    load_state_dict_tied(model_b, apply_alignments(model_a.state_dict(), spec, planted))
    return model_a, model_b


@pytest.fixture(scope="module")
def unrelated():
    return tiny_bert(0), tiny_bert(1)


def test_sinkhorn_has_uniform_marginals_and_tends_to_the_hungarian_permutation():
    corr = torch.rand(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    plan = sinkhorn(1 - corr, reg=0.1)
    assert torch.allclose(plan.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plan.sum(0), torch.ones(12, dtype=torch.float64), atol=1e-6)  # uniform both ways
    assert (plan > 1e-6).sum() > 12  # soft at this regulariser
    sharp = sinkhorn(1 - corr, reg=1e-3, max_iterations=5000)
    assert torch.equal(sharp.argmax(1), match_features(corr))


def test_ot_transports_a_planted_copy_back_onto_a(planted):
    model_a, model_b = planted
    spec, alignments, _ = fitted(model_a, model_b, ["ot[reg=0.001,max_iterations=5000]"])
    plans = alignments["ot[reg=0.001,max_iterations=5000]"]
    assert set(plans) == set(spec.groups) and all(isinstance(plan, Transport) for plan in plans.values())
    transported = apply_alignments(model_b.state_dict(), spec, plans)
    for name, tensor in model_a.state_dict().items():
        assert (transported[name] - tensor).abs().max() <= 1e-6, name
    assert not get_method("ot").function_preserving


def test_ot_is_soft_on_unrelated_models_and_keeps_heads_apart(unrelated):
    spec, alignments, _ = fitted(*unrelated, ["ot[reg=0.05]"])
    plan = alignments["ot[reg=0.05]"]["attn.0"].matrix
    group = spec.groups["attn.0"]
    blocks = plan.reshape(group.num_heads, group.head_dim, group.num_heads, group.head_dim).sum((1, 3))
    assert ((blocks > 0).sum(1) == 1).all()  # each head of A draws on exactly one head of B
    assert not alignments["ot[reg=0.05]"]["ff.0"].preserves_function(spec.groups["ff.0"])


def test_transport_alignment_is_checked_and_saved(tmp_path):
    group = PermGroup("ff.0", "ff", 3)
    with pytest.raises(ConfigError, match="rows summing to 1"):
        Transport(torch.full((3, 3), 0.5, dtype=torch.float64)).check(group)
    with pytest.raises(ConfigError, match="not a finite 3x3"):
        Transport(torch.eye(2, dtype=torch.float64)).check(group)
    exact = Transport(torch.eye(3, dtype=torch.float64)[[2, 0, 1]])
    assert exact.preserves_function(group)
    save_alignments(tmp_path / "a.safetensors", {"ot": {"ff.0": exact}})
    loaded = load_alignments(tmp_path / "a.safetensors")["ot"]["ff.0"]
    assert isinstance(loaded, Transport) and torch.equal(loaded.matrix, exact.matrix)


def test_repair_affine_renormalises_to_the_interpolated_moments():
    one = torch.ones(2, dtype=torch.float64)
    moments = FeatureMoments((), 0 * one, 2 * one, one, 3 * one, 0 * one)
    scale, shift = moments.affine(0.5)
    # predicted std sqrt(0.25 + 2.25) of the line's feature, target 2, mean 1
    assert torch.allclose(scale, 2 / torch.tensor(2.5).sqrt().double() * one)
    assert torch.allclose(shift, (1 - scale) * 1)


def test_repair_gives_the_interpolated_model_the_endpoints_interpolated_statistics():
    """A and B share everything but layer 0's FF, so its pre-activations on the line are exactly (1−λ)z_A + λz_B:
    after REPAIR the merged model's pre-activations have the interpolated mean and std on the statistics' tokens."""
    model_a = tiny_bert(0)
    model_b = copy.deepcopy(model_a)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in model_b.bert.encoder.layer[0].intermediate.dense.parameters():
            param.copy_(torch.randn_like(param) * param.std() * 2 + 0.3)
    spec, alignments, paths = fitted(model_a, model_b, ["vanilla+repair"])
    lam = 0.3
    merged = copy.deepcopy(model_a)
    load_state_dict_tied(merged, paths["vanilla+repair"].at(all_params(model_a), all_params(model_b), lam))

    def pre_activations(model):
        captured = []
        hook = model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(
            lambda module, args, out: captured.append(out))
        values = []
        with torch.no_grad():
            for batch in batches():
                captured.clear()
                model.bert(**batch)
                values.append(captured[0][batch["attention_mask"].bool()])
        hook.remove()
        return torch.cat(values)

    z_a, z_b, z = pre_activations(model_a), pre_activations(model_b), pre_activations(merged)
    target_mean = (1 - lam) * z_a.mean(0) + lam * z_b.mean(0)
    target_std = (1 - lam) * z_a.std(0, correction=0) + lam * z_b.std(0, correction=0)
    assert torch.allclose(z.mean(0), target_mean, atol=1e-9)
    assert torch.allclose(z.std(0, correction=0), target_std, atol=1e-9)
    line = (1 - lam) * z_a + lam * z_b
    assert not torch.allclose(line.std(0, correction=0), target_std, atol=1e-3)  # the line itself shrinks them


@pytest.mark.parametrize("name", ["ff+attn+res+repair", "ff+attn+res+regmean", "ff+attn[linear]+res+regmean[alpha=1]"])
def test_paths_keep_both_endpoints_and_a_planted_copy_flat(planted, unrelated, name):
    model_a, model_b = planted
    spec, alignments, paths = fitted(model_a, model_b, [name])
    params_a, aligned_b = all_params(model_a), aligned_params(model_b, spec, alignments[name])
    middle = paths[name].at(params_a, aligned_b, 0.5)
    assert max((middle[k] - params_a[k]).abs().max().item() for k in params_a) <= 1e-10
    model_a, model_b = unrelated
    spec, alignments, paths = fitted(model_a, model_b, [name])
    params_a, aligned_b = all_params(model_a), aligned_params(model_b, spec, alignments[name])
    for lam, expected in ((0.0, params_a), (1.0, aligned_b)):
        point = paths[name].at(params_a, aligned_b, lam)
        assert all(torch.equal(point[k], expected[k]) for k in params_a)
    middle = paths[name].at(params_a, aligned_b, 0.5)
    assert middle["cls.predictions.decoder.weight"] is middle["bert.embeddings.word_embeddings.weight"]


def test_regmean_layers_solve_the_least_squares_problem_on_the_recorded_grams(unrelated):
    model_a, model_b = unrelated
    name = "ff+attn+res+regmean[alpha=1]"
    spec, alignments, paths = fitted(model_a, model_b, [name])
    path = paths[name]
    params_a, aligned_b = all_params(model_a), aligned_params(model_b, spec, alignments[name])
    lam = 0.3
    merged = path.at(params_a, aligned_b, lam)
    for weight, grams in path.layers.items():
        def augmented(params):
            matrix = params[weight].double()
            return torch.cat([matrix, params[grams.bias].double()[:, None]], 1) if grams.bias else matrix
        gradient = ((1 - lam) * (augmented(merged) - augmented(params_a)) @ grams.gram_a
                    + lam * (augmented(merged) - augmented(aligned_b)) @ grams.gram_b)
        assert gradient.abs().max() <= 1e-8 * grams.gram_a.abs().max(), weight
    assert not torch.equal(merged["bert.encoder.layer.0.output.dense.weight"],
                           0.7 * params_a["bert.encoder.layer.0.output.dense.weight"]
                           + 0.3 * aligned_b["bert.encoder.layer.0.output.dense.weight"])


def test_own_statistics_are_each_models_gram_matrices(unrelated):
    model_a, _ = unrelated
    spec = spec_for_model(model_a)
    features = "ff.0/input:bert.encoder.layer.0.output.dense"
    twin = copy.deepcopy(model_a)
    statistics = collect_statistics(model_a, twin, batches(), spec, ["ff.0"], products="float64",
                                    own_groups=[features])
    gram, total, count = statistics.own_moments(features, 0)
    (point,) = statistics.group_points("ff.0")  # the same layer input, A against its twin
    assert torch.allclose(gram, point.cross) and torch.allclose(total, point.sum_a) and count == point.count
    with pytest.raises(ConfigError, match="no own statistics of 'ff.1/input"):
        statistics.own_moments("ff.1/input:bert.encoder.layer.1.output.dense", 1)


def test_regmean_refuses_folded_layer_norms(unrelated):
    model_a, model_b = unrelated
    method = get_method("regmean")
    spec, statistics = statistics_for(model_a, model_b, [method])
    inputs = FitInputs(spec, statistics=statistics)
    with pytest.raises(ConfigError, match="res\\[orthogonal\\] folds away"):
        method.fit_path(inputs, {"res": Orthogonal(torch.eye(32, dtype=torch.float64))})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ot[reg=0]", "reg=0.0 must be a positive number"),
        ("ot[reg=-1]", "reg=-1.0 must be a positive number"),
        ("ot[groups=attn[linear]]", "attn\\[linear\\] has no transport plan"),
        ("ot[max_iterations=0]", "max_iterations=0 must be at least 1"),
        ("ff+attn[linear]+res+repair", "repair corrects each of B's features .* compose it with permutations"),
        ("ot+repair", "repair corrects each of B's features"),
        ("ff+attn+res+repair+regmean", "already changes the path and paths do not compose"),
        ("regmean[alpha=1.5]", "alpha=1.5 must lie in \\[0, 1\\]"),
        ("ff+regmean[on=ff]", "names its alignment twice"),
        ("to_reference[method=ff+attn+res+repair]", "keeps the straight path"),
        ("zip+regmean", "regmean keeps model A as it is, which 'zip' transforms too"),
    ],
)
def test_bad_fusion_requests_name_the_problem_and_the_fix(name, message):
    with pytest.raises(ConfigError, match=message):
        get_method(name)


def test_fusion_methods_declare_what_they_are():
    assert isinstance(get_method("repair"), Repair) and get_method("repair").inner.name == "ff+attn+res"
    assert get_method("weight_matching+regmean").needs == {"statistics", "weights"}
    assert get_method("ff+attn+res+repair").function_preserving  # the endpoints stay exact
    assert not get_method("ot").permutations_only and isinstance(get_method("ot"), OptimalTransport)
    assert isinstance(get_method("regmean[alpha=0.5]"), RegMean)
    described = get_method("ff+attn+res+regmean").describe()
    assert described["path"] == "regmean" and "Jin et al." in described["reference"]


@pytest.mark.parametrize("name", ["ff+attn+res+regmean", "ff+attn[linear]+res+regmean"])
def test_regmean_moves_b_grams_into_a_basis_as_b_aligned_would_record_them(unrelated, name):
    """B's Grams moved by the alignment equal the Grams of B's aligned model recorded directly (permutations and
    per-head maps, the value/output subspace included)."""
    model_a, model_b = unrelated
    spec, alignments, paths = fitted(model_a, model_b, [name])
    aligned = tiny_bert(1)
    load_state_dict_tied(aligned, apply_alignments(model_b.state_dict(), spec, alignments[name]))
    method = get_method(name)
    own = method.own_features(spec)
    recorded = collect_statistics(model_a, aligned, batches(), spec, ["ff.0"], products="float64", own_groups=own)
    for weight, grams in paths[name].layers.items():
        index, features = spec.inputs[weight]
        gram, total, count = (t.double() for t in recorded.own_moments(features, 1))
        direct = torch.cat([torch.cat([gram, total[:, None]], 1), torch.cat([total, count.reshape(1)])[None]], 0)
        shrunk = 0.9 * direct + 0.1 * torch.diag(torch.diagonal(direct))
        assert torch.allclose(grams.gram_b, shrunk, rtol=1e-9, atol=1e-9 * shrunk.abs().max()), weight


def test_exact_repair_measures_the_merged_model_layer_by_layer(unrelated):
    """With measured statistics every corrected feature set of the final merged model has exactly the endpoints'
    interpolated mean and std on the measurement batches (each set corrected after the ones before it)."""
    model_a, model_b = unrelated
    name = "ff+attn+res+repair[exact=true,batches=3]"
    method = get_method(name)
    spec, statistics = statistics_for(model_a, model_b, [method])

    def activations(params, features, count):
        return feature_moments(model_a, params, spec, features, batches()[:count])

    inputs = FitInputs(spec, statistics=statistics, activations=activations)
    alignments = fit_methods({name: method}, inputs)[name]
    path = method.fit_path(inputs.view(method.needs), alignments)
    params_a, aligned_b = all_params(model_a), aligned_params(model_b, spec, alignments)
    merged = path.at(params_a, aligned_b, 0.4)
    measured = feature_moments(model_a, merged, spec, list(path.features), batches()[:3])
    assert list(measured) == ["attn.0/value", "ff.0/pre", "attn.1/value", "ff.1/pre"]  # forward order
    for features, (mean, variance) in measured.items():
        target_mean, target_std = path.features[features].target(0.4)
        assert torch.allclose(mean, target_mean, atol=1e-9) and torch.allclose(variance.sqrt(), target_std, atol=1e-9)
    assert path.at(params_a, aligned_b, 0.4)["bert.encoder.layer.0.output.dense.bias"].equal(
        merged["bert.encoder.layer.0.output.dense.bias"])  # measured once per λ, then reused
    with pytest.raises(ConfigError, match="given no activations"):
        method.fit_path(FitInputs(spec, statistics=statistics).view(method.needs), alignments)


def test_regmean_on_a_classifier_fits_the_pooler_on_first_tokens():
    from conftest import tiny_model

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(tiny_model("bert", "sequence_classification").double().eval())
    spec, alignments, paths = fitted(*models, ["ff+attn+res+regmean"])
    gram = paths["ff+attn+res+regmean"].layers["bert.pooler.dense.weight"].gram_a[-1, -1]  # the token count
    assert gram == len(batches()) * 8  # one token (the first) per sequence: 6 batches of 8
    path = paths["ff+attn+res+regmean"]
    params_a = all_params(models[0])
    aligned_b = aligned_params(models[1], spec, alignments["ff+attn+res+regmean"])
    merged = path.at(params_a, aligned_b, 0.5)
    grams = path.layers["bert.pooler.dense.weight"]

    def augmented(params):
        return torch.cat([params["bert.pooler.dense.weight"], params["bert.pooler.dense.bias"][:, None]], 1).double()

    gradient = 0.5 * ((augmented(merged) - augmented(params_a)) @ grams.gram_a
                      + (augmented(merged) - augmented(aligned_b)) @ grams.gram_b)
    assert gradient.abs().max() <= 1e-8 * grams.gram_a.abs().max()  # the least-squares fit on the CLS tokens
