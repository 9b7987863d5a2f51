"""Bad inputs and faults against `lm-merge fit`, `merge` and `reproduce`, as a table: each row gives the command,
the exit code, a fragment of the one `error:` line, and the files that must be unchanged afterwards (no traceback,
nothing already written lost or replaced, no merge output written)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import ROOT, fit_two_seeds, run_cli, tiny_fit_args


@dataclass(frozen=True)
class Row:
    """One bad input: ``argv(paths)`` -> command; ``unchanged(paths)`` -> files to compare before and after."""

    name: str
    argv: Callable[[dict], list[str]]
    code: int
    message: str
    unchanged: Callable[[dict], list[Path]] = lambda p: []
    writes_no_merge: bool = True


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    """Two tiny fitted seeds, one finished merge of them, and broken copies of a model, built once."""
    root = tmp_path_factory.mktemp("bad")
    corpus = fit_two_seeds(root)
    p = {"root": root, "corpus": corpus, "a": root / "seed0" / "hf", "b": root / "seed1" / "hf",
         "empty": root / "empty.txt", "run": root / "merge_done"}
    p["empty"].write_text("")
    p["nan"] = _broken_copy(p["b"], root / "nan", lambda w: w.__setitem__((0, 0), float("nan")))
    p["corrupt"] = _corrupt_copy(p["b"], root / "corrupt")
    p["wide"] = _other_architecture(root / "wide")
    p["not_a_dir"] = root / "plain_file"
    p["not_a_dir"].write_text("a file where a directory would go")
    assert run_cli(merge_args(p, p["run"], "[vanilla]", "--export_method", "null")) == 0
    return p


def _broken_copy(source: Path, target: Path, damage: Callable[[torch.Tensor], None]) -> Path:
    shutil.copytree(source, target)
    weights = load_file(target / "model.safetensors")
    key = next(k for k in weights if k.endswith("intermediate.dense.weight"))
    damage(weights[key])
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _corrupt_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    data = bytearray((target / "model.safetensors").read_bytes())
    data[8:40] = b"\x00" * 32  # the JSON header overwritten
    (target / "model.safetensors").write_bytes(bytes(data))
    return target


def _other_architecture(target: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig.from_pretrained(target.parent / "seed0" / "hf")
    config.intermediate_size += 8
    BertForMaskedLM(config).save_pretrained(target)
    return target


def merge_args(p: dict, run: Path, methods: str = "[vanilla, ff+attn+res]", *extra: str, b: str = "b") -> list[str]:
    return [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--model.init_args.model_a", str(p["a"]), "--model.init_args.model_b", str(p[b]),
        "--model.init_args.lambdas", "[0, 0.5, 1]", "--data.init_args.tokenizer", str(p["a"]),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(p["corpus"]), "--data.init_args.block_size", "32",
        "--data.init_args.cache_dir", str(p["root"] / "cache"), "--methods", methods, "--export_method", "null",
        *extra,
    ]


def fit_args(p: dict, *extra: str, seed: int = 0) -> list[str]:
    return [*tiny_fit_args(p["root"], p["corpus"], seed), *extra]


def fresh_fit(p: dict, *extra: str) -> list[str]:
    args = tiny_fit_args(p["root"] / "fresh", p["corpus"], 0)
    return [*args, *extra]


def reproduce_args(p: dict, *extra: str) -> list[str]:
    return ["reproduce", "--study_dir", str(p["root"] / "study"), *extra]


FINISHED_FIT = lambda p: [p["a"] / "model.safetensors", p["root"] / "seed0" / "checkpoints" / "last.ckpt"]  # noqa: E731
FINISHED_MERGE = lambda p: [p["run"] / "barriers.json", p["run"] / "results.json"]  # noqa: E731

ROWS = [
    # fit
    Row("fit: unknown preset", lambda p: fresh_fit(p, "--model.init_args.preset", "huge"), 2,
        "unknown model preset 'huge'"),
    Row("fit: unknown attention kernel", lambda p: fresh_fit(p, "--model.init_args.attn_implementation", "fast"), 2,
        "unknown attn_implementation 'fast'"),
    Row("fit: unknown key", lambda p: fresh_fit(p, "--model.init_args.no_such_key", "1"), 2, "no_such_key"),
    Row("fit: missing corpus", lambda p: fresh_fit(p, "--data.init_args.source.train_files", "/nonexistent/c.txt"),
        2, "/nonexistent/c.txt"),
    Row("fit: empty corpus", lambda p: fresh_fit(p, "--data.init_args.source.train_files", str(p["empty"])), 2,
        "empty"),
    Row("fit: block size too small", lambda p: fresh_fit(p, "--data.init_args.block_size", "4"), 2,
        "block_size=4 is too small"),
    Row("fit: zero batch size", lambda p: fresh_fit(p, "--data.init_args.batch_size", "0"), 2,
        "batch_size=0 must be at least 1"),
    Row("fit: negative block count", lambda p: fresh_fit(p, "--data.init_args.max_train_blocks", "-5"), 2,
        "max_train_blocks=-5 must be at least 1"),
    Row("fit: masking probability above 1", lambda p: fresh_fit(p, "--data.init_args.mlm_probability", "1.5"), 2,
        "mlm_probability=1.5 must be in (0, 1)"),
    Row("fit: over a finished run", lambda p: fit_args(p), 2, "holds a finished run; resume it with --ckpt_path last",
        FINISHED_FIT),
    Row("fit: resume from a missing checkpoint", lambda p: fresh_fit(p, "--ckpt_path", str(p["root"] / "no.ckpt")),
        2, "no.ckpt does not exist"),
    Row("fit: resume from a non-checkpoint", lambda p: fit_args(p, "--ckpt_path", str(p["corpus"])), 2,
        "is corrupt or truncated", FINISHED_FIT),
    Row("fit: output under a plain file", lambda p: [*fresh_fit(p), "--trainer.default_root_dir",
                                                     str(p["not_a_dir"] / "run")], 2, "cannot write"),
    # merge: models
    Row("merge: missing model A", lambda p: merge_args(p, p["root"] / "m1", "[vanilla]", "--model.init_args.model_a",
                                                       str(p["root"] / "missing")), 2, "missing does not exist"),
    Row("merge: corrupt safetensors", lambda p: merge_args(p, p["root"] / "m2", b="corrupt"), 2,
        "could not load the model in"),
    Row("merge: a NaN weight", lambda p: merge_args(p, p["root"] / "m3", b="nan"), 2,
        "has 1 non-finite value(s) in bert.encoder.layer.0.intermediate.dense.weight"),
    Row("merge: a NaN weight let through", lambda p: merge_args(p, p["root"] / "m4", "[vanilla]",
                                                                "--model.init_args.allow_nonfinite", "true", b="nan"),
        2, "the loss of method 'vanilla' at lambda=0.5 is nan"),
    Row("merge: other architecture", lambda p: merge_args(p, p["root"] / "m5", b="wide"), 2,
        "differ in intermediate_size"),
    Row("merge: unknown task", lambda p: merge_args(p, p["root"] / "m6", "[vanilla]", "--model.init_args.task",
                                                    "masked_lmx"), 2, "unknown merge task 'masked_lmx'"),
    # merge: methods and settings
    Row("merge: unknown method", lambda p: merge_args(p, p["root"] / "m7", "[vanilla, zipit]"), 2,
        "unknown merge method 'zipit'"),
    Row("merge: zero learning budget", lambda p: merge_args(p, p["root"] / "m8", "['learned[steps=0]']"), 2,
        "steps=0 must be at least 1"),
    Row("merge: negative learning budget", lambda p: merge_args(p, p["root"] / "m9", "['learned[steps=-2]']"), 2,
        "steps=-2 must be at least 1"),
    Row("merge: NaN learning rate", lambda p: merge_args(p, p["root"] / "m10", "['learned[lr=nan]']"), 2,
        "lr=nan must be a positive number"),
    Row("merge: linear residual", lambda p: merge_args(p, p["root"] / "m11", "['res[linear]']"), 2,
        "group 'res' cannot take a linear alignment"),
    Row("merge: unknown option", lambda p: merge_args(p, p["root"] / "m12", "['weight_matching[budget=3]']"), 2,
        "unknown option 'budget=3'; options: max_passes, seed"),
    Row("merge: NaN lambda", lambda p: merge_args(p, p["root"] / "m13", "[vanilla]", "--model.init_args.lambdas",
                                                  "[0, .nan, 1]"), 2, "lambdas must be finite numbers"),
    Row("merge: grid without 1", lambda p: merge_args(p, p["root"] / "m14", "[vanilla]", "--model.init_args.lambdas",
                                                      "[0, 0.5]"), 2, "must contain 1"),
    Row("merge: export of a method not run", lambda p: merge_args(p, p["root"] / "m15", "[vanilla]",
                                                                  "--export_method", "permute"), 2,
        "export_method 'permute' is not among the methods"),
    Row("merge: unknown statistics dtype", lambda p: merge_args(p, p["root"] / "m16", "[ff]", "--statistics_dtype",
                                                                "float16"), 2, "unknown statistics dtype 'float16'"),
    Row("merge: zero statistics batch", lambda p: merge_args(p, p["root"] / "m17", "[ff]", "--statistics_batch_size",
                                                             "0"), 2, "statistics_batch_size=0 must be at least 1"),
    Row("merge: negative block count", lambda p: merge_args(p, p["root"] / "m18", "[ff]", "--statistics_max_blocks",
                                                            "-5"), 2, "statistics_max_blocks=-5 must be at least 1"),
    Row("merge: empty statistics text", lambda p: merge_args(
        p, p["root"] / "m19", "[ff]", "--statistics_data", "lightning_merge.data.mlm.MLMDataModule",
        "--statistics_data.init_args.tokenizer", str(p["a"]), "--statistics_data.init_args.block_size", "32",
        "--statistics_data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--statistics_data.init_args.source.train_files", str(p["empty"]),
        "--statistics_data.init_args.cache_dir", str(p["root"] / "cache")), 2, "empty"),
    Row("merge: into a finished merge", lambda p: merge_args(p, p["run"], "[vanilla]"), 2,
        "holds an earlier merge; pass --overwrite true", FINISHED_MERGE, writes_no_merge=False),
    Row("merge: output under a plain file", lambda p: merge_args(p, p["not_a_dir"] / "run", "[vanilla]"), 2,
        "cannot write"),
    # reproduce
    Row("reproduce: one seed", lambda p: reproduce_args(p, "--seeds", "[0]"), 2,
        "a study needs at least two distinct seeds"),
    Row("reproduce: repeated seed", lambda p: reproduce_args(p, "--seeds", "[1, 1]"), 2,
        "a study needs at least two distinct seeds"),
    Row("reproduce: unknown key", lambda p: reproduce_args(p, "--no_such_key", "1"), 2, "no_such_key"),
]


def _digests(files: list[Path]) -> dict[Path, str]:
    return {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_is_one_line_with_a_nonzero_exit_and_changes_nothing(row: Row, paths, capsys) -> None:
    argv = row.argv(paths)
    before = _digests(row.unchanged(paths))
    capsys.readouterr()
    assert run_cli(argv) == row.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and row.message in lines[0], lines or err[-2000:]
    assert _digests(row.unchanged(paths)) == before
    if row.writes_no_merge:
        run = Path(argv[argv.index("--trainer.default_root_dir") + 1]) if "--trainer.default_root_dir" in argv else None
        assert run is None or not any((run / name).exists() for name in ("barriers.json", "results.json")), run


def test_the_table_is_large_enough() -> None:
    assert len(ROWS) >= 30 and len({row.name for row in ROWS}) == len(ROWS)


def test_the_finished_merge_of_the_table_is_intact(paths) -> None:
    assert json.loads((paths["run"] / "barriers.json").read_text())["vanilla"]["barrier"] >= 0
