"""Shared fixtures: everything runs on CPU, in temp dirs, with tiny models."""

from __future__ import annotations

import gc
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Python's cyclic collector off for the test (explicit ``gc.collect()`` still runs), then as it was."""
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


@pytest.fixture
def cpu_trainer_kwargs(tmp_path) -> dict:
    """Trainer kwargs that keep a test on CPU, quiet and inside its temp dir."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


# One tiny config per family (hidden 16, 2 layers, 4 heads of 4, FF 24): every family-parametrised test builds from it.
TINY_SIZES = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24)
TINY_FF = 24


def tiny_config(family: str = "bert", **overrides):
    """An HF config of ``family`` (a name in `lightning_merge.merge.families.FAMILIES`) at the tiny test size."""
    from transformers import AutoConfig

    from lightning_merge.merge.families import get_family

    record = get_family(family)
    kwargs = {**TINY_SIZES, record.ff_size[0]: TINY_FF, "num_labels": 3, "pad_token_id": 0, "bos_token_id": 2,
              "eos_token_id": 2}
    if record.model_type.startswith("roberta"):
        kwargs["pad_token_id"] = 1  # RoBERTa's positions start after padding_idx, as in its released models
    return AutoConfig.for_model(record.model_type, **{**kwargs, **overrides})


def tiny_model(family: str = "bert", task: str = "masked_lm", **overrides):
    """A randomly initialised tiny model of ``family`` for ``task`` (``base`` for the bare encoder/decoder)."""
    import transformers

    from lightning_merge.merge.families import get_family

    class_name = get_family(family).classes[task]
    return getattr(transformers, class_name)(tiny_config(family, **overrides))


def family_tasks() -> list[tuple[str, str]]:
    """(family, task) for every task class of every family."""
    from lightning_merge.merge.families import FAMILIES

    return [(name, task) for name, family in FAMILIES.items() for task in family.classes]


def tiny_batch(family: str = "bert", seed: int = 3) -> dict[str, torch.Tensor]:
    """Three sequences of 12 tokens, two of them padded (right), with token types where the family takes them."""
    from lightning_merge.merge.families import get_family

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, TINY_SIZES["vocab_size"], (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    pad = tiny_config(family).pad_token_id
    input_ids = input_ids.masked_fill(attention_mask == 0, pad)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if get_family(family).token_types:
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[:, 6:] = 1
        batch["token_type_ids"] = token_type_ids
    return batch
