"""Runs killed with SIGKILL (no clean-up of any kind) and run again: `fit` resumes from its last checkpoint, a
`merge` counts as done only if its completion marker was written, and what the killed run left half-written never
passes for a result. (`reproduce` stages: tests/test_study.py kills one mid-stage.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import ROOT, fit_two_seeds, run_cli, tiny_fit_args, write_corpus

from lightning_merge.report import MERGE_COMPLETE


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "lightning_merge.cli", *args], stdout=handle, stderr=handle,
                                env=env, cwd=ROOT)


def wait_for(condition, process: subprocess.Popen, timeout: float = 300.0) -> bool:
    """Poll until ``condition()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return condition()
        time.sleep(0.01)
    raise TimeoutError("the run neither reached the point to kill it at nor ended")


def readable_checkpoint(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def test_a_killed_fit_resumes_from_its_last_checkpoint(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.txt")
    args = tiny_fit_args(tmp_path, corpus, 0)
    args[args.index("--trainer.max_steps") + 1] = "400"
    args[args.index("--trainer.val_check_interval") + 1] = "3"
    last = tmp_path / "seed0" / "checkpoints" / "last.ckpt"
    process = start(args, tmp_path / "fit.log")
    assert wait_for(lambda: last.is_file() and readable_checkpoint(last), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "seed0" / "hf" / "config.json").exists()  # killed before its export
    args[args.index("--trainer.max_steps") + 1] = "9"
    assert run_cli([*args, "--ckpt_path", "last"]) == 0
    assert (tmp_path / "seed0" / "hf" / "config.json").is_file()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 9
    assert run_cli(args) == 2  # now finished: a fresh fit into it is refused


def test_a_resumed_fit_trains_on_what_the_interrupted_one_would_have(tmp_path, monkeypatch) -> None:
    """Interrupted at step 45 of 100 (mid-epoch: ~70 batches an epoch) and resumed from its step-40 checkpoint, the
    run ends with the model of an uninterrupted run: same batches, same masks, same optimiser state."""
    from safetensors.torch import load_file

    from lightning_merge.modules.mlm import MLMModule

    corpus = write_corpus(tmp_path / "corpus.txt")

    def fit(root: Path, *extra: str) -> int:
        args = tiny_fit_args(root, corpus, 0)
        args[args.index("--trainer.max_steps") + 1] = "100"
        args[args.index("--trainer.val_check_interval") + 1] = "20"
        return run_cli([*args, *extra])

    assert fit(tmp_path / "whole") == 0

    def interrupt(module, batch, batch_idx):
        if module.global_step == 45:
            raise KeyboardInterrupt  # as Ctrl-C would: Lightning shuts down without its end-of-training hooks

    with monkeypatch.context() as patch:
        patch.setattr(MLMModule, "on_train_batch_start", interrupt, raising=False)
        assert fit(tmp_path / "parts") != 0
    checkpoint = torch.load(tmp_path / "parts" / "seed0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 40 and not (tmp_path / "parts" / "seed0" / "hf").exists()
    assert fit(tmp_path / "parts", "--ckpt_path", "last") == 0
    whole, parts = (load_file(tmp_path / run / "seed0" / "hf" / "model.safetensors") for run in ("whole", "parts"))
    assert whole.keys() == parts.keys()
    for name, tensor in whole.items():
        torch.testing.assert_close(parts[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kill_when", ["alignments.safetensors", "barriers.json"])
def test_a_killed_merge_is_redone_unless_its_marker_says_it_finished(tmp_path, kill_when) -> None:
    corpus = fit_two_seeds(tmp_path)
    run = tmp_path / "merge"
    args = [
        "merge", "--config", str(ROOT / "configs/merge/mlm.yaml"), "--trainer.default_root_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--model.init_args.model_a", str(tmp_path / "seed0/hf"), "--model.init_args.model_b",
        str(tmp_path / "seed1/hf"), "--model.init_args.lambdas", "[0, 0.5, 1]",
        "--data.init_args.tokenizer", str(tmp_path / "seed0/hf"),
        "--data.init_args.source", "lightning_merge.data.sources.LocalFilesSource",
        "--data.init_args.source.train_files", str(corpus), "--data.init_args.block_size", "32",
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--methods", "[vanilla, ff+attn+res]",
        "--export_method", "ff+attn+res",
    ]
    process = start(args, tmp_path / "merge.log")
    wait_for(lambda: (run / kill_when).exists(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = (run / MERGE_COMPLETE).exists()
    if finished:  # the kill came after the marker: the run is whole and a rerun is refused
        assert all((run / name).exists() for name in ("barriers.json", "results.json", "merged/config.json"))
        assert run_cli(args) == 2
        return
    assert run_cli(args) == 0  # the killed run counts for nothing: no --overwrite needed
    assert (run / MERGE_COMPLETE).is_file() and (run / "merged" / "config.json").is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp") or ".old." in p.name]
