"""`lm-merge merge` of N = 3 models: planted copies come back exactly with every method, two DDP processes give one
process's numbers, and bad input (too few models, a repeated one, another architecture, a training method) is one
line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_cli_families
import torch
from conftest import tiny_model
from test_cli import ROOT, in_subprocess, run_cli

from lightning_merge.merge.alignment import apply_alignments, load_alignments, permutations
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model

corpus_and_tokenizer = test_cli_families.corpus_and_tokenizer  # the same module-scoped fixture

JOINT = ["to_reference", "merge_many", "merge_many[by=weights]", "cycle_consistent", "zip[layers=1,alpha=0,beta=0]",
         "zip[alpha=0,beta=0]"]
ALIGNING = ["ff+attn+res", "weight_matching", "to_reference[method=ff+attn[linear]+res]", *JOINT]


def save_models(root: Path, tokenizer_dir: Path, planted: bool, count: int = 3, **overrides) -> list[Path]:
    """``count`` tiny BERT MLMs: permuted copies of one model (``planted``) or independently drawn ones."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    paths = []
    for k in range(count):
        torch.manual_seed(0 if planted else k)
        model = tiny_model("bert", "masked_lm", vocab_size=len(tokenizer), max_position_embeddings=40,
                           pad_token_id=tokenizer.pad_token_id, **overrides).eval()
        with torch.no_grad():  # away from the init, so that a misaligned average costs loss
            for param in model.parameters():
                param.add_(0.3 * torch.randn_like(param))
        if planted and k:
            spec = spec_for_model(model)
            drawn = random_permutations(spec, generator=torch.Generator().manual_seed(k))
            model.load_state_dict(apply_alignments(model.state_dict(), spec, permutations(drawn)))
        model.save_pretrained(root / f"model{k}")
        tokenizer.save_pretrained(root / f"model{k}")
        paths.append(root / f"model{k}")
    return paths


def merge_args(run: Path, models: list[Path], corpus: Path, methods: list[str]) -> list[str]:
    return [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--model.init_args.models", json.dumps([str(m) for m in models]),
        "--model.init_args.lambdas", "[0, 0.5, 1]", "--model.init_args.simplex_steps", "2",
        "--data.init_args.tokenizer", str(models[0]),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(corpus), "--data.init_args.batch_size", "4",
        "--data.init_args.block_size", "32", "--data.init_args.cache_dir", str(run.parent / "cache"),
        "--methods", json.dumps(methods), "--export_method", methods[-1],
    ]


def test_planted_copies_are_aligned_back_by_every_method(corpus_and_tokenizer, tmp_path) -> None:
    from transformers import AutoModelForMaskedLM

    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=True)
    run = tmp_path / "run"
    assert run_cli(merge_args(run, models, corpus, ["vanilla", *ALIGNING])) == 0
    results = json.loads((run / "results.json").read_text())
    for method in ALIGNING:
        for pair, figures in results["barriers"][method].items():
            assert abs(figures["barrier"]) < 1e-4, (method, pair)
        assert abs(results["average"][method]["loss_increase"]) < 1e-4, method
        assert results["cycle_consistency_error"][method] in (0.0, None), method
    vanilla = results["average"]["vanilla"]
    assert abs(vanilla["loss_increase"]) > 1e-2  # unaligned copies do not average to the same function
    assert all(figures["barrier_midpoint"] != 0 for figures in results["barriers"]["vanilla"].values())
    # outputs: every pair, the average, the triangle (vertices + 3 grid points at simplex_steps 2)
    assert set(results["barriers"]["merge_many"]) == {"0-1", "0-2", "1-2"}
    assert len(results["simplex"]["cycle_consistent"]["loss"]) == 6
    assert (run / "simplex.png").stat().st_size > 0 and (run / "barrier.png").exists()
    summary = json.loads((run / "barriers.json").read_text())["summary"]
    assert summary["merge_many"]["barrier_mean"] == pytest.approx(0, abs=1e-4)
    alignments = load_alignments(run / "alignments.safetensors")
    assert {"cycle_consistent/model0", "cycle_consistent/model2", "ff+attn+res/pair1-2"} <= set(alignments)
    assert "ff.0" in alignments["merge_many/model1"]
    # the exported N-way average of permuted copies is the reference model itself
    merged = AutoModelForMaskedLM.from_pretrained(run / "merged")
    reference = AutoModelForMaskedLM.from_pretrained(models[0])
    for name, value in reference.state_dict().items():
        assert torch.allclose(merged.state_dict()[name], value, atol=1e-5), name


def test_joint_methods_are_cycle_consistent_where_pairwise_matching_is_not(corpus_and_tokenizer, tmp_path) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=False, intermediate_size=48)
    run = tmp_path / "run"
    assert run_cli(merge_args(run, models, corpus, ["ff+attn+res", "to_reference", "merge_many",
                                                    "cycle_consistent"])) == 0
    results = json.loads((run / "results.json").read_text())
    errors = results["cycle_consistency_error"]
    assert errors["ff+attn+res"] > 0.1
    assert errors["to_reference"] == errors["merge_many"] == errors["cycle_consistent"] == 0.0
    # to_reference's pairs with model 0 are the pairwise fits themselves
    for pair in ("0-1", "0-2"):
        assert results["barriers"]["to_reference"][pair]["barrier"] == pytest.approx(
            results["barriers"]["ff+attn+res"][pair]["barrier"], abs=1e-6)


def test_ddp_on_two_processes_matches_one_process_for_three_models(corpus_and_tokenizer, tmp_path) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=False)
    methods = ["vanilla", "ff+attn+res", "merge_many", "cycle_consistent"]
    def args(run: str, *devices: str) -> list[str]:
        return [*merge_args(tmp_path / run, models, corpus, methods), "--statistics_dtype", "float64", *devices]

    assert run_cli(args("one", "--trainer.devices", "1")) == 0
    in_subprocess(args("ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    one, ddp = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "ddp"))
    assert one["timings"]["statistics_tokens"] == ddp["timings"]["statistics_tokens"]
    for method in methods:
        for pair, figures in one["barriers"][method].items():
            for key, value in figures.items():
                assert abs(value - ddp["barriers"][method][pair][key]) <= 1e-6, (method, pair, key)
        for key, value in one["average"][method].items():
            assert value == pytest.approx(ddp["average"][method][key], abs=1e-6), (method, key)
        assert one["simplex"][method]["loss"] == pytest.approx(ddp["simplex"][method]["loss"], abs=1e-6)


def test_bad_model_lists_are_one_line(corpus_and_tokenizer, tmp_path, capsys) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    models = save_models(tmp_path, tokenizer, planted=True)
    wider = save_models(tmp_path / "wider", tokenizer, planted=True, count=1, intermediate_size=40)[0]
    run = tmp_path / "run"

    def error(paths: list[Path], methods: list[str] = ("vanilla",)) -> str:
        capsys.readouterr()
        assert run_cli(merge_args(run, paths, corpus, list(methods))) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
        return lines[0]

    assert "at least two models" in error([models[0]])
    assert "models[2] repeats models[0]" in error([models[0], models[1], Path(str(models[0]) + "/")])
    line = error([models[0], models[1], wider])
    assert "models[2]" in line and str(wider) in line and "intermediate_size" in line
    line = error(models, ["learned"])
    assert "trains on one pair" in line and "merge_many" in line
    line = error(models, ["merge_many[groups=attn[linear]]"])
    assert "attn[linear] is not a permutation" in line and "to_reference" in line
    assert not (run / "barriers.json").exists()
