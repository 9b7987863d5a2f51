"""Model sizes as presets, and one loader for every place a model goes (HF dir, our ``.ckpt``, hub id)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from lightning_merge.errors import CheckpointError, ConfigError, UnknownNameError
from lightning_merge.merge.families import get_family
from lightning_merge.merge.permute import random_orthogonal

# name -> config kwargs (litgpt's name_to_config), in BERT's field names; `build_config` renames the FF width for
# families that call it otherwise. "base" is BERT-base; the others fit 2 CPU cores.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}

HF_CONFIG_KEY = "hf_config"  # where our Lightning checkpoints keep the HF config of the wrapped model
# HF attention kernels a model can be built with: torch's fused attention (the default) and HF's plain matmuls
ATTENTION_KERNELS = ("sdpa", "eager")


def attention_kwargs(attn_implementation: str | None) -> dict[str, str]:
    """HF's ``attn_implementation`` argument for a model's loader: ``{}`` keeps the family's default (SDPA).

    Raises:
        ConfigError: a kernel other than the two every family and device has (flash and flex kernels depend on the
            GPU, an extra package and the family, and would fail only once the model is built).
    """
    if attn_implementation is None:
        return {}
    if attn_implementation not in ATTENTION_KERNELS:
        raise ConfigError(f"unknown attn_implementation {attn_implementation!r}; known: {', '.join(ATTENTION_KERNELS)}")
    return {"attn_implementation": attn_implementation}


def build_config(
    preset: str, vocab_size: int, max_position_embeddings: int = 512, family: str = "bert", **overrides: Any
) -> PretrainedConfig:
    """The HF config of a ``family`` model (``bert``, ``gpt2``, ...) from a size preset; ``overrides`` win."""
    if preset not in PRESETS:
        raise UnknownNameError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    record = get_family(family)
    sizes = dict(PRESETS[preset])
    sizes[record.ff_size[0]] = sizes.pop("intermediate_size")
    kwargs = {**sizes, "vocab_size": vocab_size, "max_position_embeddings": max_position_embeddings, **overrides}
    return AutoConfig.for_model(record.model_type, **kwargs)


def sinusoidal_positions(num_positions: int, width: int, amplitude: float) -> torch.Tensor:
    """Sinusoids (Vaswani et al.) of the given peak ``amplitude``, in a random orthonormal basis of the hidden space.

    An init for BERT's learned position embeddings: offsets between positions are rotations of these vectors, so
    attention to neighbours is easy to learn, while the random basis (from torch's global RNG, i.e. the seed) keeps
    models of different seeds from sharing position directions.
    """
    if width % 2:
        raise ConfigError(f"sinusoidal position init needs an even hidden size, got {width}")
    positions = torch.arange(num_positions, dtype=torch.float64)[:, None]
    frequencies = torch.exp(torch.arange(0, width, 2, dtype=torch.float64) * (-math.log(10000.0) / width))
    table = torch.zeros(num_positions, width, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(positions * frequencies), torch.cos(positions * frequencies)
    return (amplitude * table @ random_orthogonal(width)).float()


def _looks_like_path(source: str) -> bool:
    hub_id_like = source.count("/") <= 1 and not source.startswith((".", "/", "~"))
    return not hub_id_like or source.endswith((".ckpt", ".safetensors"))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read one of our Lightning checkpoints without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing .ckpt, HF directory or hub id")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        kind = type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a Lightning checkpoint ({kind})") from err


def check_checkpoint(path: str | Path) -> None:
    """Raise `CheckpointError` unless ``path`` is a readable checkpoint (opened lazily: cheap for large files)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass an existing .ckpt file")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        kind = type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({kind}); resume from another one, or "
                              "train anew with --overwrite true") from err


def _from_lightning_checkpoint(path: Path, model_class: type[PreTrainedModel], **kwargs: Any) -> PreTrainedModel:
    checkpoint = load_checkpoint(path)
    if HF_CONFIG_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} was not written by lightning_merge (no {HF_CONFIG_KEY!r} entry)")
    fields = {**checkpoint[HF_CONFIG_KEY], **kwargs}
    config = AutoConfig.for_model(fields.pop("model_type", "bert"), **fields)
    model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a task head (and a pooler) the source lacks starts fresh; the base model itself must be complete
    base = f"{model.base_model_prefix}."
    missing = [k for k in missing if k.startswith(base) and not k.startswith(f"{base}pooler.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit {model_class.__name__}: missing {missing[:3]}")
    return model


def _from_hf_dir(path: Path, model_class: type[PreTrainedModel], **kwargs: Any) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; pass an HF directory written by save_pretrained")
    try:
        return model_class.from_pretrained(path, **kwargs)
    except Exception as err:  # safetensors, json and torch each raise their own types for a damaged file
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"could not load the model in {path} (corrupt or incomplete?): {reason}") from err


def load_pretrained(
    source: str | Path, model_class: type[PreTrainedModel], allow_nonfinite: bool = False, **kwargs: Any
) -> PreTrainedModel:
    """Load ``model_class`` from a local HF dir, one of our ``.ckpt`` files, or a hub id.

    Args:
        source: ``checkpoints/mlm/seed0/hf``, ``.../last.ckpt`` or ``google/multiberts-seed_0``.
        model_class: e.g. ``BertForMaskedLM``, or an Auto class (``AutoModelForMaskedLM``) that picks the class of
            the source's family.
        allow_nonfinite: load a model with NaN or infinite weights instead of refusing it.
        kwargs: config overrides such as ``num_labels``.

    Raises:
        CheckpointError: the source is missing or unreadable, or (unless ``allow_nonfinite``) a weight is not finite.
    """
    model = _load(source, model_class, **kwargs)
    if not allow_nonfinite:
        check_finite(model, str(source))
    return model


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Raise `CheckpointError` naming the first weight or buffer of ``model`` that holds a NaN or an infinity."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if torch.is_floating_point(tensor) and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"model {source} has {bad} non-finite value(s) in {name} (a corrupt file or a diverged run); "
                "pass allow_nonfinite to load it anyway"
            )


def _load(source: str | Path, model_class: type[PreTrainedModel], **kwargs: Any) -> PreTrainedModel:
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_hf_dir(path, model_class, **kwargs)
    if path.is_file():
        return _from_lightning_checkpoint(path, model_class, **kwargs)
    if _looks_like_path(text):
        raise CheckpointError(f"model path {text} does not exist; pass an HF directory, a .ckpt file or a hub id")
    try:
        return model_class.from_pretrained(text, **kwargs)
    except OSError as err:
        raise CheckpointError(f"could not load {text!r} from the Hugging Face hub: {str(err).splitlines()[0]}") from err
