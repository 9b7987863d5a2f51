"""Record the features a spec matches on, with forward hooks on the spec's feature points (plain PyTorch).

Usage::

    with FeatureRecorder(model, spec) as recorder:
        model(**batch)
        features = recorder.pop(batch["attention_mask"])   # {group: {point key: (N, d)}}

Features are kept only for non-padding tokens (and, if a special-tokens mask is given, non-special tokens), so the
statistics are over real tokens as in the paper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_merge.errors import ArchitectureMismatch
from lightning_merge.merge.spec import FeaturePoint, PermutationSpec

Features = dict[str, dict[str, torch.Tensor]]


class FeatureRecorder:
    """Forward hooks on the feature points of ``spec``'s groups; `pop` returns the last forward's token features.

    Args:
        model: the model the spec was built for (module names relative to it).
        spec: its `PermutationSpec`.
        groups: group names to record (default: all groups of the spec).
    """

    def __init__(self, model: torch.nn.Module, spec: PermutationSpec, groups: Iterable[str] | None = None) -> None:
        self.model = model
        self.spec = spec
        self.groups = list(spec.groups if groups is None else groups)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> FeatureRecorder:
        self.register()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def points(self) -> list[FeaturePoint]:
        """The distinct feature points of the recorded groups."""
        unique: dict[str, FeaturePoint] = {}
        for group in self.groups:
            for point in self.spec.points[group]:
                unique.setdefault(point.key, point)
        return list(unique.values())

    def register(self) -> None:
        """Register one forward hook per feature point (idempotent)."""
        if self._handles:
            return
        for point in self.points():
            module = self._module(point.module)
            self._handles.append(module.register_forward_hook(self._hook(point)))

    def remove(self) -> None:
        """Remove the hooks and drop anything captured."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def _module(self, name: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError as err:
            spec = self.spec.architecture
            raise ArchitectureMismatch(f"model has no module {name} needed by the {spec} spec") from err

    def _hook(self, point: FeaturePoint):
        def hook(module: torch.nn.Module, inputs: tuple, output: Any) -> None:
            value = inputs[0] if point.source == "input" else output
            self._captured[point.key] = value.detach()

        return hook

    def pop(self, attention_mask: torch.Tensor, special_tokens_mask: torch.Tensor | None = None) -> Features:
        """Token features of the last forward pass, padding (and special tokens, if masked) removed.

        Args:
            attention_mask: (B, T), 1 for real tokens.
            special_tokens_mask: (B, T), 1 for tokens to leave out (e.g. [CLS]/[SEP]); optional.

        Returns:
            group name -> point key -> (N, d) features, N = kept tokens. Clears the captured activations.
        """
        keep = attention_mask.bool()
        if special_tokens_mask is not None:
            keep = keep & ~special_tokens_mask.bool()
        missing = [p.key for p in self.points() if p.key not in self._captured]
        if missing:
            raise RuntimeError(f"no activation recorded at {missing[0]}; run a forward pass inside the recorder")
        tokens = {key: value[keep.to(value.device)] for key, value in self._captured.items()}  # (B, T, d) -> (N, d)
        self._captured.clear()
        return {group: {p.key: tokens[p.key] for p in self.spec.points[group]} for group in self.groups}
