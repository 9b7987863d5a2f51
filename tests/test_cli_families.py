"""`lm-merge merge` on a pair of every family (BERT, RoBERTa, DistilBERT, RoBERTa-PreLayerNorm, GPT-2): model B is
model A with planted permutations of every group, so every function-preserving method must find a flat path; GPT-2's
orthogonal residual map finds it too, and the merged model it exports (its lm_head untied) reloads with that loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_cli import ROOT, assert_same_barriers, in_subprocess, run_cli, write_corpus

from lightning_merge.merge.alignment import apply_alignments, permutations
from lightning_merge.merge.families import CAUSAL_LM, FAMILIES, MASKED_LM
from lightning_merge.merge.permute import random_permutations
from lightning_merge.merge.spec import spec_for_model

MERGE_CONFIG = {MASKED_LM: "configs/merge/mlm.yaml", CAUSAL_LM: "configs/merge/clm.yaml"}
FAMILY_TASK = {name: (CAUSAL_LM if CAUSAL_LM in family.classes else MASKED_LM) for name, family in FAMILIES.items()}


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    from lightning_merge.data.tokenizer import cached_wordpiece

    root = tmp_path_factory.mktemp("families")
    corpus = write_corpus(root / "corpus.txt")
    tokenizer = cached_wordpiece(corpus.read_text().splitlines(), 120, root / "cache", model_max_length=512)
    tokenizer.save_pretrained(root / "tokenizer")
    return corpus, root / "tokenizer"


def planted_pair(root: Path, family: str, tokenizer_dir: Path) -> tuple[Path, Path]:
    """Model A of ``family`` (random, tiny) and B = A with every group permuted, as HF directories."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = tiny_model(family, FAMILY_TASK[family], vocab_size=len(tokenizer), max_position_embeddings=40,
                       pad_token_id=tokenizer.pad_token_id).eval()
    with torch.no_grad():  # away from the init, so that a misaligned average costs loss
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))
    spec = spec_for_model(model)
    state = model.state_dict()
    for name, weights in (("a", state), ("b", apply_alignments(state, spec, permutations(random_permutations(spec))))):
        model.load_state_dict(weights)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root / "a", root / "b"


def merge_args(run: Path, family: str, model_a: Path, model_b: Path, corpus: Path, methods: list[str]) -> list[str]:
    return [
        "merge", "--config", str(ROOT / MERGE_CONFIG[FAMILY_TASK[family]]), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--model.init_args.model_a", str(model_a), "--model.init_args.model_b", str(model_b),
        "--model.init_args.lambdas", "[0, 0.5, 1]", "--data.init_args.tokenizer", str(model_a),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(corpus), "--data.init_args.batch_size", "4",
        "--data.init_args.block_size", "32", "--data.init_args.cache_dir", str(run.parent / "cache"),
        "--methods", json.dumps(methods), "--export_method", methods[-1],
    ]


def methods_for(family: str) -> list[str]:
    orthogonal = ["ff+attn[linear]+res[orthogonal]", "ff+attn+res[orthogonal]"] if family == "gpt2" else []
    return ["vanilla", "ff+attn+res", "weight_matching", *orthogonal]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merge_runs_on_a_planted_pair_of_every_family(family, corpus_and_tokenizer, tmp_path) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    model_a, model_b = planted_pair(tmp_path, family, tokenizer)
    run = tmp_path / "run"
    methods = methods_for(family)
    assert run_cli(merge_args(run, family, model_a, model_b, corpus, methods)) == 0
    barriers = json.loads((run / "barriers.json").read_text())
    for method in methods[1:]:  # B is A permuted: every alignment finds a flat path
        assert barriers[method]["barrier"] <= 1e-4, (method, barriers[method])
        assert abs(barriers[method]["loss_a"] - barriers[method]["loss_b"]) <= 1e-4
    curves = json.loads((run / "results.json").read_text())["curves"]
    for method in methods[1:]:
        assert max(curves[method]["loss"]) - min(curves[method]["loss"]) <= 1e-4  # one function all along
    assert max(curves["vanilla"]["loss"]) - min(curves["vanilla"]["loss"]) > 1e-2  # not so without alignment
    assert (run / "merged" / "config.json").is_file()


def test_exported_orthogonal_merge_is_untied_and_reloads(corpus_and_tokenizer, tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    corpus, tokenizer = corpus_and_tokenizer
    model_a, model_b = planted_pair(tmp_path, "gpt2", tokenizer)
    run = tmp_path / "run"
    assert run_cli(merge_args(run, "gpt2", model_a, model_b, corpus, ["ff+attn+res[orthogonal]"])) == 0
    assert "lm_head.weight untied from transformer.wte.weight" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(run / "merged")
    assert not merged.config.tie_word_embeddings
    assert merged.lm_head.weight.data_ptr() != merged.transformer.wte.weight.data_ptr()
    assert json.loads((run / "results.json").read_text())["untied"] == {"ff+attn+res[orthogonal]": ["lm_head.weight"]}


def test_orthogonal_residual_on_a_post_layernorm_family_says_why_and_what_to_use(
    corpus_and_tokenizer, tmp_path, capsys
) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    model_a, model_b = planted_pair(tmp_path, "bert", tokenizer)
    args = merge_args(tmp_path / "run", "bert", model_a, model_b, corpus, ["ff+attn+res[orthogonal]"])
    assert run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "res[orthogonal] cannot keep model B's function: bert is post-LayerNorm" in err[0]
    assert "use res (a permutation)" in err[0]
    assert not (tmp_path / "run" / "barriers.json").exists()


def test_a_pair_of_two_families_names_both(corpus_and_tokenizer, tmp_path, capsys) -> None:
    corpus, tokenizer = corpus_and_tokenizer
    bert_a, _ = planted_pair(tmp_path / "bert", "bert", tokenizer)
    roberta_a, _ = planted_pair(tmp_path / "roberta", "roberta", tokenizer)
    assert run_cli(merge_args(tmp_path / "run", "bert", bert_a, roberta_a, corpus, ["vanilla"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model_a and model_b differ in family: 'bert' vs 'roberta'" in err[0]


@pytest.mark.parametrize("family", ["gpt2", pytest.param("roberta", marks=pytest.mark.slow),
                                    pytest.param("distilbert", marks=pytest.mark.slow),
                                    pytest.param("roberta-prelayernorm", marks=pytest.mark.slow)])
def test_ddp_on_two_processes_matches_one_process_for_every_family(family, corpus_and_tokenizer, tmp_path) -> None:
    """BERT's DDP check is in test_cli; GPT-2 (fused, Conv1D, causal, folded norms) runs by default, the others slow."""
    corpus, tokenizer = corpus_and_tokenizer
    model_a, model_b = planted_pair(tmp_path, family, tokenizer)
    methods = [m for m in methods_for(family) if m != "weight_matching"]
    def args(run: str, *devices: str) -> list[str]:
        return [*merge_args(tmp_path / run, family, model_a, model_b, corpus, methods), "--statistics_dtype",
                "float64", *devices]

    assert run_cli(args("one", "--trainer.devices", "1")) == 0
    in_subprocess(args("ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp"))
    one, ddp = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "ddp"))
    assert_same_barriers(one, ddp, methods)
