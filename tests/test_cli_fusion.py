"""`lm-merge merge` with the fusion methods: merged-model figures against the endpoints, vanilla and the best
alignment; ZipIt! transforming model A too; bad requests as one line."""

from __future__ import annotations

import json

import pytest
import test_cli_families
import torch
from test_cli import run_cli
from test_cli_joint import merge_args, save_models

from lightning_merge.merge.alignment import Zip, load_alignments

corpus_and_tokenizer = test_cli_families.corpus_and_tokenizer  # the same module-scoped fixture

FUSION = ["ff+attn+res+repair", "ff+attn+res+repair[exact=true,batches=2]", "ff+attn+res+regmean", "ot",
          "zip[layers=1]", "zip"]


def test_fusion_methods_report_their_merged_model(corpus_and_tokenizer, tmp_path) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=False, count=2)
    run = tmp_path / "run"
    assert run_cli(merge_args(run, models, corpus, ["vanilla", "ff+attn+res", *FUSION])) == 0
    results = json.loads((run / "results.json").read_text())
    barriers, endpoints = results["barriers"], results["endpoints"]
    assert endpoints["loss"] == pytest.approx([barriers["vanilla"]["loss_a"], barriers["vanilla"]["loss_b"]])
    for method in ["ff+attn+res", *FUSION]:
        figures = barriers[method]
        assert figures["midpoint_lambda"] == 0.5
        assert figures["midpoint_excess"] == pytest.approx(figures["midpoint_loss"] - sum(endpoints["loss"]) / 2)
        assert figures["midpoint_loss_vs_vanilla"] == pytest.approx(
            figures["midpoint_loss"] - barriers["vanilla"]["midpoint_loss"])
        assert figures["midpoint_loss_vs_best_alignment"] == pytest.approx(
            figures["midpoint_loss"] - barriers["ff+attn+res"]["midpoint_loss"])
    assert results["best_alignment"] == "ff+attn+res"
    for path_method in FUSION[:3]:  # the paths keep both endpoints and change the merged model
        assert barriers[path_method]["loss_a"] == pytest.approx(endpoints["loss"][0], abs=1e-6)
        assert barriers[path_method]["loss_b"] == pytest.approx(endpoints["loss"][1], abs=1e-6)
        assert barriers[path_method]["midpoint_loss"] != pytest.approx(barriers["ff+attn+res"]["midpoint_loss"])
        assert barriers[path_method]["function_preserving"]
    assert not barriers["ot"]["function_preserving"] and not barriers["zip"]["function_preserving"]
    assert results["methods"]["ff+attn+res+regmean"]["path"] == "regmean"
    alignments = load_alignments(run / "alignments.safetensors")
    assert isinstance(alignments["zip/model0"]["ff.0"], Zip) and isinstance(alignments["zip/model1"]["res"], Zip)
    assert (run / "merged.png").stat().st_size > 0 and (run / "merged" / "config.json").exists()


@pytest.mark.parametrize(
    ("count", "methods", "message"),
    [
        (3, ["ff+attn+res+repair"], "method 'ff+attn+res+repair' changes the path between a pair of models; with 3"),
        (2, ["ot[reg=0]"], "reg=0.0 must be a positive number"),
        (2, ["zip[beta=3]"], "beta=3.0 asks for more within-model merges than a model has merges"),
        (2, ["ff+attn[linear]+res+repair"], "compose it with permutations, e.g. ff+attn+res+repair"),
        (2, ["zip[layers=1]"], "export_method 'zip[layers=1]' makes a two-headed model"),
        (2, ["zip[layers=5]"], "layers=5 but the models have 2 layers"),
    ],
)
def test_bad_fusion_requests_are_one_line(corpus_and_tokenizer, tmp_path, capsys, count, methods, message) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=True, count=count)
    assert run_cli(merge_args(tmp_path / "run", models, corpus, methods)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run" / "barriers.json").exists()


def test_a_partial_zip_of_copies_with_their_own_tails(corpus_and_tokenizer, tmp_path) -> None:
    """B is a permuted copy of A up to layer 1 and has its own layer 1: zipping one layer recovers the shared trunk
    exactly, so λ = 0 is A and λ = 1 is B (each tail with its own weight), and the mixture along the path is never
    worse than the line between their losses (cross-entropy is convex in the predicted distribution)."""
    from transformers import AutoModelForMaskedLM

    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=True, count=2)
    model_b = AutoModelForMaskedLM.from_pretrained(models[1])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, param in model_b.named_parameters():
            if name.startswith("bert.encoder.layer.1."):
                param.add_(0.5 * torch.randn_like(param))
    model_b.save_pretrained(models[1])
    run = tmp_path / "run"
    partial = "zip[layers=1,alpha=0,beta=0]"
    assert run_cli(merge_args(run, models, corpus, [partial, "vanilla"])) == 0
    results = json.loads((run / "results.json").read_text())
    figures, endpoints = results["barriers"][partial], results["endpoints"]
    assert abs(endpoints["loss"][0] - endpoints["loss"][1]) > 1e-2  # the tails differ
    assert figures["loss_a"] == pytest.approx(endpoints["loss"][0], abs=1e-5)
    assert figures["loss_b"] == pytest.approx(endpoints["loss"][1], abs=1e-5)
    assert figures["barrier"] <= 1e-5 and figures["midpoint_excess"] <= 1e-5
    assert results["methods"][partial]["options"]["layers"] == 1
