"""`lm-merge` end to end in-process: help, every shipped recipe parses, fit and merge on tiny data, bad input."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from lightning_merge.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
WORDS = "the a river city king queen north south old new war music film river stone light dark".split()


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def write_corpus(path: Path, lines: int = 300) -> Path:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) for _ in range(lines))
    path.write_text(text + "\n")
    return path


def tiny_fit_args(tmp_path: Path, corpus: Path, seed: int = 0, config: str = "configs/mlm.yaml") -> list[str]:
    return [
        "fit", "--config", str(ROOT / config), "--seed_everything", str(seed),
        "--trainer.default_root_dir", str(tmp_path / f"seed{seed}"), "--trainer.max_steps", "2",
        "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
        "--model.init_args.preset", "tiny",
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(corpus), "--data.init_args.vocab_size", "120",
        "--data.init_args.block_size", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.cache_dir", str(tmp_path / "cache"),
    ]


def test_help_lists_subcommands(capsys) -> None:
    from lightning_merge.cli import SUBCOMMANDS
    from lightning_merge.lightning_cli import LightningMergeCLI

    assert run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert set(SUBCOMMANDS) == {*LightningMergeCLI.subcommands(), "reproduce"}  # the static list cannot rot
    for subcommand in SUBCOMMANDS:
        assert f"  {subcommand} " in out
    assert run_cli(["merge", "--help"]) == 0 and "--methods" in capsys.readouterr().out


def test_top_level_help_imports_neither_torch_nor_lightning() -> None:
    import subprocess
    import sys

    code = ("import sys; from lightning_merge.cli import main; main(['--help']); "
            "assert not {'torch', 'pytorch_lightning'} & set(sys.modules), 'heavy import'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lm-merge <subcommand> --help" in result.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_every_shipped_config_parses(config, capsys) -> None:
    text = (ROOT / config).read_text()
    subcommand = "merge" if "/merge/" in config else "reproduce" if "/reproduce/" in config else "fit"
    assert run_cli([subcommand, "--config", str(ROOT / config), "--print_config"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()
    assert text


def fit_two_seeds(root: Path) -> Path:
    """Seeds 0 and 1 trained for two steps through `lm-merge fit` into ``root/seed{0,1}``; returns their corpus."""
    corpus = write_corpus(root / "corpus.txt")
    for seed in (0, 1):
        assert run_cli(tiny_fit_args(root, corpus, seed)) == 0
    return corpus


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """Two tiny seeds trained for two steps through `lm-merge fit` (HF export included)."""
    root = tmp_path_factory.mktemp("fit")
    fit_two_seeds(root)
    return root


def test_an_interrupted_reproduce_exits_130_without_a_traceback(monkeypatch, capsys) -> None:
    import lightning_merge.cli as cli

    def interrupted(args: list[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_reproduce", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["reproduce", "--config", "configs/reproduce/quickstart.yaml"])
    assert exited.value.code == 130 and "Traceback" not in capsys.readouterr().err


def test_fit_writes_checkpoints_hf_export_and_logs(fitted) -> None:
    run = fitted / "seed0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    model = AutoModelForMaskedLM.from_pretrained(run / "hf")
    assert model.config.num_hidden_layers == 2
    assert (run / "hf" / "tokenizer.json").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_clm_fit_pretrains_a_gpt2_and_logs_its_unigram_gap(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM

    corpus = write_corpus(tmp_path / "corpus.txt")
    assert run_cli(tiny_fit_args(tmp_path, corpus, 0, "configs/clm.yaml")) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seed0" / "hf")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    events = EventAccumulator(str(tmp_path / "seed0" / "tb"))
    events.Reload()
    assert {"val/loss", "val/unigram_gap"} <= set(events.Tags()["scalars"])


def test_fit_resumes_from_last(fitted, tmp_path) -> None:
    corpus = fitted / "corpus.txt"
    args = tiny_fit_args(fitted, corpus, 0)
    args[args.index("--trainer.max_steps") + 1] = "4"
    assert run_cli([*args, "--ckpt_path", "last"]) == 0


def test_fit_refuses_a_finished_run_unless_resumed_or_overwritten(fitted, tmp_path, capsys) -> None:
    args = tiny_fit_args(fitted, fitted / "corpus.txt", 1)
    export = (fitted / "seed1" / "hf" / "model.safetensors").read_bytes()
    assert run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "holds a finished run; resume it with --ckpt_path last" in err[0]
    assert (fitted / "seed1" / "hf" / "model.safetensors").read_bytes() == export  # the finished model is untouched
    copy = tmp_path / "copy"
    shutil.copytree(fitted / "seed1", copy / "seed1")
    assert run_cli([*tiny_fit_args(copy, fitted / "corpus.txt", 1), "--overwrite", "true"]) == 0


def test_a_truncated_checkpoint_on_resume_is_one_line(fitted, tmp_path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(fitted / "seed0", copy / "seed0")
    last = copy / "seed0" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert run_cli([*tiny_fit_args(copy, fitted / "corpus.txt", 0), "--ckpt_path", "last"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"checkpoint {last} is corrupt or truncated" in err[0]


def test_merge_subcommand_writes_every_output(fitted, tmp_path) -> None:
    run = tmp_path / "merge"
    args = [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.model_a", str(fitted / "seed0/hf"), "--model.init_args.model_b", str(fitted / "seed1/hf"),
        "--model.init_args.lambdas", "[0, 0.5, 1]",
        "--data.init_args.tokenizer", str(fitted / "seed0/hf"),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(fitted / "corpus.txt"),
        "--data.init_args.block_size", "32", "--data.init_args.cache_dir", str(fitted / "cache"),
        "--methods", "[vanilla, ff+attn+res, weight_matching, 'ff+attn[linear]+res', 'learned[steps=2,attn=linear]']",
        "--export_method", "learned[steps=2,attn=linear]",
    ]
    assert run_cli(args) == 0
    for name in ("alignments.safetensors", "curves.csv", "barriers.json", "barrier.png", "merged/config.json"):
        assert (run / name).exists(), name
    barriers = json.loads((run / "barriers.json").read_text())
    assert set(barriers) == {"vanilla", "ff+attn+res", "weight_matching", "ff+attn[linear]+res",
                             "learned[steps=2,attn=linear]"}
    assert all(figures["function_preserving"] for figures in barriers.values())
    assert run_cli(args) == 2  # a second run into the same directory is refused, the first run's files stay
    assert json.loads((run / "barriers.json").read_text()) == barriers


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.init_args.preset", "huge"], "unknown model preset 'huge'"),
        (["--model.init_args.no_such_key", "1"], "no_such_key"),
        (["--data.init_args.source.train_files", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    ],
)
def test_bad_fit_input_is_one_line(tmp_path, capsys, extra, message) -> None:
    args = tiny_fit_args(tmp_path, write_corpus(tmp_path / "corpus.txt"), 0) + extra
    assert run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0]


def test_merge_with_missing_checkpoint_names_the_path(tmp_path, capsys) -> None:
    args = ["merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--model.init_args.model_a", str(tmp_path / "missing_a"), "--model.init_args.model_b", str(tmp_path)]
    assert run_cli(args) == 2
    assert "missing_a does not exist" in capsys.readouterr().err


def test_merge_with_unknown_statistics_dtype_is_one_line(fitted, tmp_path, capsys) -> None:
    args = [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.init_args.model_a", str(fitted / "seed0/hf"), "--model.init_args.model_b", str(fitted / "seed1/hf"),
        "--data.init_args.tokenizer", str(fitted / "seed0/hf"), "--statistics_dtype", "float16",
    ]
    assert run_cli(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "unknown statistics dtype 'float16'; known: float64, float32" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("['learned[steps=0]']", "method 'learned[steps=0]': steps=0 must be at least 1, e.g. learned[steps=1000]"),
        ("['learned[steps=-3,attn=linear]']", "steps=-3 must be at least 1"),
        ("['res[linear]']", "method 'res[linear]': group 'res' cannot take a linear alignment"),
        ("['ff[linear]+attn[linear]']", "group 'ff' cannot take a linear alignment: the GELU"),
        ("[vanilla, zipit]", "unknown merge method 'zipit'"),
        ("['learned[init=attn[ignore_heads]]']", "must be a function-preserving, non-learned method"),
    ],
)
def test_bad_method_is_one_line_before_any_model_loads(tmp_path, capsys, methods, message) -> None:
    args = ["merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(tmp_path),
            "--model.init_args.model_a", str(tmp_path / "missing_a"), "--model.init_args.model_b", str(tmp_path),
            "--methods", methods]
    assert run_cli(args) == 2  # the missing models would fail next: the method is checked first
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err


def small_merge_args(fitted: Path, run: Path, *extra: str) -> list[str]:
    return [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"),
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--model.init_args.model_a", str(fitted / "seed0/hf"), "--model.init_args.model_b", str(fitted / "seed1/hf"),
        "--model.init_args.lambdas", "[0, 0.5, 1]", "--data.init_args.tokenizer", str(fitted / "seed0/hf"),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(fitted / "corpus.txt"), "--data.init_args.batch_size", "3",
        "--data.init_args.block_size", "32", "--data.init_args.cache_dir", str(fitted / "cache"),
        "--methods", "[vanilla, ff+attn+res, weight_matching, 'ff+attn[linear]+res', 'learned[steps=2]', "
                     "ff+attn+res+regmean, 'ff+attn+res+repair[exact=true,batches=2]', ot]",
        "--export_method", "null", *extra,
    ]


def in_subprocess(args: list[str]) -> None:
    """``lm-merge`` in a process of its own, as DDP needs (it starts the other ranks as copies of that process)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lightning_merge.cli", *args], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_on_two_processes_matches_one_process(fitted, tmp_path) -> None:
    from lightning_merge.merge.alignment import load_alignments

    # float64 products: float32 ones round differently when the blocks are split across ranks (linear maps ~1e-7)
    exact_sums = ("--statistics_dtype", "float64")
    assert run_cli(small_merge_args(fitted, tmp_path / "one", "--trainer.devices", "1", *exact_sums)) == 0
    in_subprocess(small_merge_args(fitted, tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                                   *exact_sums))
    one_process, two_ranks = (load_alignments(tmp_path / run / "alignments.safetensors") for run in ("one", "ddp"))
    assert one_process.keys() == two_ranks.keys()
    exact = [method for method in one_process if not method.startswith("learned")]  # learning sees other batches
    for method in exact:
        for group, alignment in one_process[method].items():
            for name, tensor in alignment.tensors().items():
                torch.testing.assert_close(two_ranks[method][group].tensors()[name], tensor, rtol=0, atol=1e-9)
    one, ddp = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "ddp"))
    assert one["timings"]["statistics_tokens"] == ddp["timings"]["statistics_tokens"]
    assert_same_barriers(one, ddp, exact)


def assert_same_barriers(one: dict, other: dict, methods: list[str], tolerance: float = 1e-6) -> None:
    """Every barrier figure of ``methods`` equal in two merges' results; where the λ of a barrier differs, the
    barrier must be tied at both (float noise picks either of two equal maxima)."""
    for method in methods:
        curve, lambdas = one["curves"][method]["loss"], one["lambdas"]
        for key, value in one["barriers"][method].items():
            theirs = other["barriers"][method][key]
            if key in ("barrier_lambda", "barrier_midpoint_lambda") and value != theirs:
                def height(lam: float) -> float:
                    i = lambdas.index(lam)
                    if key == "barrier_midpoint_lambda":
                        return curve[i] - (curve[0] + curve[-1]) / 2
                    return curve[i] - ((1 - lam) * curve[0] + lam * curve[-1])
                assert abs(height(value) - height(theirs)) <= tolerance, (method, key)
                continue
            assert abs(value - theirs) <= tolerance, (method, key)
