"""Fold LayerNorm gains into the layers that read them, so a pre-LN model's residual stream admits orthogonal maps.

A pre-LN model reads its residual stream x only through LayerNorms: a reader computes W (g ⊙ n(x) + b) + c, with
n(x) = (x − mean(x)) / std(x). Folding rewrites it as W' (n(x) + β) + c with W' = W diag(g) and β = b / g, and the
LayerNorm's gain set to 1: the same function, and the LayerNorm is now n(x) + β. For an orthogonal Q that fixes the
all-ones direction, n(Qx) = Q n(x) (centring and the norm commute with Q), so moving x, β and every writer by Q and
every reader by Q⁻ᵀ = Q leaves the model's function unchanged — which no elementwise gain would allow.

A reader tied to another weight (GPT-2's ``lm_head`` to the word embeddings, behind the final LayerNorm) cannot keep
the tie once its columns are scaled: it is untied, in both endpoints of a merge, and reported. A family whose
LayerNorms normalize the stream itself (post-LN, or a LayerNorm over the summed embeddings) cannot be folded this
way: `fold_layer_norms` refuses it with the family's reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from lightning_merge.errors import ConfigError
from lightning_merge.merge.families import RESIDUAL
from lightning_merge.merge.spec import Axis, PermutationSpec


def untied_by_folding(spec: PermutationSpec) -> list[str]:
    """The tied weights `fold_layer_norms` unties: the LayerNorm readers that are tie aliases."""
    return [reader for readers in spec.norm_readers.values() for reader in readers if reader in spec.ties]


def fold_layer_norms(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec
) -> tuple[dict[str, torch.Tensor], PermutationSpec, list[str]]:
    """The function-preserving folded weights, the spec that describes them, and the weights that were untied.

    Raises:
        ConfigError: the family does not read its stream only through LayerNorms, or a gain is exactly zero.
    """
    refusal = spec.family.orthogonal_residual_refusal() if spec.family else "the model's family is unknown"
    if refusal:
        raise ConfigError(f"cannot fold LayerNorms into their readers: {refusal}")
    if spec.norms_folded:
        return dict(state_dict), spec, []
    state = spec.split(state_dict)
    axes, ties, untied = dict(spec.axes), dict(spec.ties), untied_by_folding(spec)
    for norm, readers in spec.norm_readers.items():
        gain, bias = state[f"{norm}.weight"], state[f"{norm}.bias"]
        if (gain == 0).any():
            raise ConfigError(f"{norm} has a gain of exactly 0, which cannot be folded into the layers reading it")
        for reader in readers:
            state[reader] = _scale_residual_axis(state[reader], spec.axes[reader], gain)
            if reader in untied:
                del ties[reader]
                axes[reader] = tuple(Axis(RESIDUAL, "in") if a is not None else None for a in axes[reader])
        state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.ones_like(gain), bias / gain
        axes[f"{norm}.weight"], axes[f"{norm}.bias"] = (None,), (Axis(RESIDUAL, "out"),)
    folded = dataclasses.replace(spec, axes=axes, ties=ties, norms_folded=True)
    return folded.join(state), folded, untied


def _scale_residual_axis(tensor: torch.Tensor, axes: tuple[Axis | None, ...], gain: torch.Tensor) -> torch.Tensor:
    index = next(i for i, axis in enumerate(axes) if axis is not None and axis.group == RESIDUAL)
    shape = [1] * tensor.dim()
    shape[index] = -1
    return tensor * gain.to(tensor.dtype).reshape(shape)
