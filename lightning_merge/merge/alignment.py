"""Alignments: what a method fits per spec group, and the one generic function that applies them to B's weights.

An alignment of group ``g`` is an invertible map M of B's features of ``g`` into A's basis. Applying it walks the
spec's axes (`apply_alignments`): an ``out`` axis (the features themselves) is transformed by M, an ``in`` axis (a
reader of them) by M⁻ᵀ, a ``norm`` axis (an elementwise LayerNorm scale) only by a permutation. Kinds:

- `Permutation`: M is a permutation matrix, so every role is the same gather. Function-preserving for every group,
  except an attention permutation that moves features across heads (`Permutation.preserves_function` checks).
- `Orthogonal`: an orthogonal map of the residual stream fixing the all-ones direction; exact for pre-LN models once
  their LayerNorm gains are folded into the layers that read them (`lightning_merge.merge.fold`).
- `Transport`: a soft correspondence (optimal transport, Imfeld et al.): each of A's features takes a convex
  combination of B's, and so does every reader and LayerNorm gain. Not invertible in general, so not
  function-preserving: the path runs from A to B's transported model, whose midpoint is the fused model.
- `Zip`: one model's part of a ZipIt! merge (merge and unmerge matrices, features of one model merged with each
  other too); every model of the merge is zipped, and their average is the merged model.
- `HeadLinear`: an attention group's heads paired by a permutation, then within each head one invertible map for
  the query/key subspace (T on query rows, T⁻ᵀ on key rows: QKᵀ unchanged) and one for the value/output subspace
  (T on value rows, T⁻¹ on output columns). Function-preserving by construction.

Orientation (as matching returns it): ``perm[i]`` is the index in B's feature order that goes to position ``i``.
If ``sd_b = apply_alignments(sd_a, spec, planted)``, the alignment that brings B back is the inverse.

Saved as safetensors (`save_alignments`): keys ``method/group/<tensor>``, the kind of each in the metadata. Files of
earlier versions (``permutations.safetensors``: keys ``method/group``, permutations only) load too.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from lightning_merge.errors import CheckpointError, ConfigError, UnknownNameError
from lightning_merge.merge.interpolate import math_dtype
from lightning_merge.merge.spec import Axis, PermGroup, PermutationSpec

ALIGNMENTS_FORMAT = "lightning_merge.alignments/1"


class Alignment(ABC):
    """An invertible map of one group's features of model B into model A's basis."""

    kind: ClassVar[str]
    needs_folded_norms: ClassVar[bool] = False  # exact only on folded LayerNorms (`lightning_merge.merge.fold`)

    @abstractmethod
    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        """``tensor`` with dimension ``index`` (an axis of this alignment's group) moved into A's basis."""

    @abstractmethod
    def check(self, group: PermGroup) -> None:
        """Raise `ConfigError` unless this alignment fits ``group`` (sizes, heads, invertibility)."""

    @abstractmethod
    def preserves_function(self, group: PermGroup) -> bool:
        """Whether applying it to every axis of ``group`` leaves model B's function unchanged."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define it, by name (what `save_alignments` writes)."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Alignment:
        """The alignment `tensors` describes."""


@dataclass(frozen=True, eq=False)
class Permutation(Alignment):
    """A permutation of the group's features: ``perm[i]`` = B's feature that goes to position ``i``."""

    perm: torch.Tensor
    kind: ClassVar[str] = "permutation"

    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        return torch.index_select(tensor, index, self.perm.to(tensor.device))

    def check(self, group: PermGroup) -> None:
        if self.perm.shape != (group.size,) or not torch.equal(torch.sort(self.perm.cpu()).values,
                                                               torch.arange(group.size)):
            raise ConfigError(f"the alignment of group {group.name!r} is not a permutation of {group.size} features")

    def preserves_function(self, group: PermGroup) -> bool:
        return group.kind != "attn" or moves_heads_whole(self.perm, group.num_heads)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"perm": self.perm}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Permutation:
        return cls(tensors["perm"].long())


@dataclass(frozen=True, eq=False)
class HeadLinear(Alignment):
    """Heads paired by ``perm`` (which moves heads whole), then per head one map per subspace.

    Attributes:
        perm: (d,) head-aware permutation, applied first.
        maps: subspace (``qk``, ``vo``) -> (num_heads, head_dim, head_dim) invertible maps, head h's map acting on
            the features now at head h; a subspace without a map is only permuted.
    """

    perm: torch.Tensor
    maps: Mapping[str, torch.Tensor]
    kind: ClassVar[str] = "head_linear"

    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        tensor = torch.index_select(tensor, index, self.perm.to(tensor.device))
        if axis.subspace not in self.maps:
            return tensor
        if axis.role == "norm":
            raise ConfigError(f"a linear map cannot act on the elementwise axis of group {axis.group!r}")
        maps = self.maps[axis.subspace]
        # an "in" axis reads the features: it takes M⁻ᵀ, so that (M⁻ᵀ w)ᵀ (M x) = wᵀ x
        matrix = maps if axis.role == "out" else torch.linalg.inv(maps.double()).mT
        return _per_head_map(tensor, index, matrix)

    def check(self, group: PermGroup) -> None:
        Permutation(self.perm).check(group)
        if not moves_heads_whole(self.perm, group.num_heads):
            raise ConfigError(f"the head pairing of group {group.name!r} moves features across heads")
        shape = (group.num_heads, group.head_dim, group.head_dim)
        for subspace, maps in self.maps.items():
            if subspace not in group.subspaces:
                raise ConfigError(f"group {group.name!r} has no subspace {subspace!r} ({', '.join(group.subspaces)})")
            if tuple(maps.shape) != shape:
                got = tuple(maps.shape)
                raise ConfigError(f"{subspace} maps of group {group.name!r} have shape {got}, not {shape}")
            if not torch.isfinite(maps).all():
                raise ConfigError(f"{subspace} maps of group {group.name!r} hold non-finite values")
            if torch.linalg.svdvals(maps.double()).min() < 1e-8:
                raise ConfigError(f"{subspace} maps of group {group.name!r} are not invertible")

    def preserves_function(self, group: PermGroup) -> bool:
        return moves_heads_whole(self.perm, group.num_heads)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"perm": self.perm, **self.maps}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> HeadLinear:
        return cls(tensors["perm"].long(), {name: value for name, value in tensors.items() if name != "perm"})


@dataclass(frozen=True, eq=False)
class Orthogonal(Alignment):
    """An orthogonal map of the residual stream that fixes the all-ones direction (so LayerNorm's centring and
    scaling commute with it). Exact only once the LayerNorm gains are folded into their readers
    (`lightning_merge.merge.fold`): it refuses to act on an elementwise (``norm``) axis.

    Attributes:
        matrix: (d, d) orthogonal, ``matrix @ 1 = 1``; a feature vector x of B becomes ``matrix @ x``.
    """

    matrix: torch.Tensor
    kind: ClassVar[str] = "orthogonal"
    needs_folded_norms: ClassVar[bool] = True

    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        if axis.role == "norm":
            raise ConfigError(f"an orthogonal map of group {axis.group!r} cannot act on a LayerNorm gain; fold the "
                              "gains into the layers that read them first (lightning_merge.merge.fold)")
        return _per_head_map(tensor, index, self.matrix[None])  # M⁻ᵀ = M: readers and writers alike

    def check(self, group: PermGroup) -> None:
        matrix = self.matrix.double()
        if tuple(matrix.shape) != (group.size, group.size) or not torch.isfinite(matrix).all():
            raise ConfigError(f"the orthogonal map of group {group.name!r} is not a finite {group.size}x{group.size} "
                              "matrix")
        identity = torch.eye(group.size, dtype=torch.float64, device=matrix.device)
        ones = torch.ones(group.size, dtype=torch.float64, device=matrix.device)
        if (matrix.T @ matrix - identity).abs().max() > 1e-6 or (matrix @ ones - ones).abs().max() > 1e-6:
            raise ConfigError(f"the map of group {group.name!r} is not orthogonal with the all-ones direction fixed")

    def preserves_function(self, group: PermGroup) -> bool:
        return True  # on folded LayerNorms; `apply` refuses the elementwise axes it would break

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Orthogonal:
        return cls(tensors["matrix"])


@dataclass(frozen=True, eq=False)
class Transport(Alignment):
    """A transport plan scaled to rows summing to 1: B's features become ``matrix @ x`` on every axis.

    Attributes:
        matrix: (d, d), non-negative, every row summing to 1; row i weighs the B features that go to position i.
            OTFusion (Singh & Jaggi) moves a layer's readers with the same plan as its writers, and so does this
            kind: readers' columns and elementwise LayerNorm gains are averaged as the features are.
    """

    matrix: torch.Tensor
    kind: ClassVar[str] = "transport"

    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        return _per_head_map(tensor, index, self.matrix[None])

    def check(self, group: PermGroup) -> None:
        matrix = self.matrix.double()
        if tuple(matrix.shape) != (group.size, group.size) or not torch.isfinite(matrix).all():
            raise ConfigError(f"the transport plan of group {group.name!r} is not a finite {group.size}x{group.size} "
                              "matrix")
        if (matrix < 0).any() or (matrix.sum(1) - 1).abs().max() > 1e-6:
            raise ConfigError(f"the transport plan of group {group.name!r} is not non-negative with rows summing to 1")

    def preserves_function(self, group: PermGroup) -> bool:
        is_permutation = bool(((self.matrix == 0) | (self.matrix == 1)).all())  # rows sum to 1: one 1 per row
        return is_permutation and bool((self.matrix.sum(0) == 1).all()) and (
            group.kind != "attn" or moves_heads_whole(self.matrix.argmax(1), group.num_heads))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"matrix": self.matrix}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Transport:
        return cls(tensors["matrix"])


@dataclass(frozen=True, eq=False)
class Zip(Alignment):
    """One model's part of a ZipIt! merge of N models: its features into the merged ones and back.

    The merged model is the average over the N models of each one's zipped weights (writers and LayerNorm gains
    through ``merge``, readers through ``unmerge``), so ``merge`` holds N times the model's block of the merge matrix.

    Attributes:
        merge: (d, d): merged feature i = Σ_j merge[i, j] x_j / N summed over the models.
        unmerge: (d, d): the model's feature j is read as Σ_i unmerge[j, i] of the merged features.
    """

    merge: torch.Tensor
    unmerge: torch.Tensor
    kind: ClassVar[str] = "zip"

    def apply(self, tensor: torch.Tensor, index: int, axis: Axis) -> torch.Tensor:
        matrix = self.unmerge.T if axis.role == "in" else self.merge
        return _per_head_map(tensor, index, matrix[None])

    def check(self, group: PermGroup) -> None:
        for name, matrix in (("merge", self.merge), ("unmerge", self.unmerge)):
            if tuple(matrix.shape) != (group.size, group.size) or not torch.isfinite(matrix).all():
                raise ConfigError(f"the zip {name} matrix of group {group.name!r} is not a finite "
                                  f"{group.size}x{group.size} matrix")

    def preserves_function(self, group: PermGroup) -> bool:
        return False  # merges features within the model, and scales them by N

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"merge": self.merge, "unmerge": self.unmerge}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Zip:
        return cls(tensors["merge"], tensors["unmerge"])


ALIGNMENT_KINDS: dict[str, type[Alignment]] = {
    kind.kind: kind for kind in (Permutation, HeadLinear, Orthogonal, Transport, Zip)}


def needs_folded_norms(alignments: Mapping[str, Alignment]) -> bool:
    """Whether applying ``alignments`` needs the LayerNorm gains folded into their readers first."""
    return any(alignment.needs_folded_norms for alignment in alignments.values())


def _per_head_map(tensor: torch.Tensor, index: int, matrix: torch.Tensor) -> torch.Tensor:
    """Apply (H, hd, hd) ``matrix`` to dimension ``index`` of ``tensor``, read as H blocks of hd features."""
    heads, head_dim = matrix.shape[0], matrix.shape[1]
    dtype = math_dtype(tensor.dtype)
    moved = tensor.movedim(index, -1).to(dtype)
    blocks = moved.reshape(*moved.shape[:-1], heads, head_dim)  # (..., H, hd)
    mapped = torch.einsum("...hj,hij->...hi", blocks, matrix.to(tensor.device, dtype))
    return mapped.reshape(moved.shape).movedim(-1, index).to(tensor.dtype).contiguous()


def moves_heads_whole(perm: torch.Tensor, num_heads: int) -> bool:
    """Whether ``perm`` keeps every head's features together (heads may move, dims within heads may shuffle)."""
    head_dim = perm.numel() // num_heads
    heads = perm.reshape(num_heads, head_dim) // head_dim
    return bool((heads == heads[:, :1]).all())


def check_alignments(spec: PermutationSpec, alignments: Mapping[str, Alignment]) -> None:
    """Raise unless every alignment names a group of ``spec`` and fits it.

    Raises:
        UnknownNameError: an alignment for a group the spec does not have.
        ConfigError: an alignment that does not fit its group.
    """
    for name, alignment in alignments.items():
        if name not in spec.groups:
            known = ", ".join(spec.groups)
            raise UnknownNameError(f"no group {name!r} in the {spec.architecture} spec; known: {known}")
        alignment.check(spec.groups[name])


def apply_alignments(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, alignments: Mapping[str, Alignment]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every weight moved into A's basis along the axes its groups act on.

    Args:
        state_dict: weights of a model the spec describes (tied aliases may be absent).
        spec: the model's `PermutationSpec`.
        alignments: group name -> `Alignment`; groups without one stay as they are.

    Returns:
        A new dict; untouched entries are the input tensors themselves, tied aliases share their source's tensor.
    """
    check_alignments(spec, alignments)
    return spec.join(transform_state_dict(spec.split(state_dict), spec, alignments))


def transform_state_dict(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, alignments: Mapping[str, Alignment],
    skip: str | None = None,
) -> dict[str, torch.Tensor]:
    """`apply_alignments` without the checks, on a state dict whose fused weights are already split
    (`PermutationSpec.split`), optionally leaving group ``skip``'s axes alone (differentiable)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name in spec.ties and spec.ties[name] in state_dict:
            continue  # filled from its source below, so the tie survives
        out[name] = transform_tensor(tensor, spec.axes.get(name, ()), alignments, skip)
    for alias, source in spec.ties.items():
        if alias in state_dict and source in out:
            out[alias] = out[source]
    return {name: out[name] for name in state_dict}  # keep the input's key order


def transform_tensor(
    tensor: torch.Tensor, axes: tuple[Axis | None, ...], alignments: Mapping[str, Alignment], skip: str | None = None
) -> torch.Tensor:
    """One weight moved into A's basis along each of its aligned axes (except group ``skip``'s)."""
    for index, axis in enumerate(axes):
        if axis is not None and axis.group != skip and axis.group in alignments:
            tensor = alignments[axis.group].apply(tensor, index, axis)
    return tensor


def permutations(perms: Mapping[str, torch.Tensor]) -> dict[str, Permutation]:
    """Group name -> perm tensor, as `Permutation` alignments."""
    return {name: Permutation(perm) for name, perm in perms.items()}


def save_alignments(path: str | Path, alignments: Mapping[str, Mapping[str, Alignment]]) -> None:
    """Write method -> group -> alignment as safetensors (keys ``method/group/<tensor>``) to ``path``.

    The caller picks the path (the merge writes it atomically); tensors are copied to CPU and made contiguous.
    """
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for method, groups in alignments.items():
        for group, alignment in groups.items():
            kinds[f"{method}/{group}"] = alignment.kind
            for name, tensor in alignment.tensors().items():
                flat[f"{method}/{group}/{name}"] = tensor.detach().cpu().contiguous().clone()
    metadata = {"format": ALIGNMENTS_FORMAT, "methods": json.dumps(list(alignments)), "kinds": json.dumps(kinds)}
    save_file(flat, str(path), metadata=metadata)


def load_alignments(path: str | Path) -> dict[str, dict[str, Alignment]]:
    """Read method -> group -> alignment from `save_alignments`' format or an older ``permutations.safetensors``.

    Raises:
        CheckpointError: the file is missing, not safetensors, or its metadata does not describe its tensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"alignments file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        methods = json.loads(metadata.get("methods", "[]"))
        kinds = json.loads(metadata["kinds"]) if "kinds" in metadata else None
    except (OSError, SafetensorError, ValueError, KeyError) as err:
        raise CheckpointError(f"alignments file {path} is corrupt: {err}") from err
    if kinds is None:  # an older permutations.safetensors: "method/group" -> perm
        return _group_by_method(methods, {key: Permutation(t.long()) for key, t in tensors.items()})
    stray = [name for name in tensors if name.rpartition("/")[0] not in kinds]
    if stray:
        raise CheckpointError(f"alignments file {path}: tensor {stray[0]} belongs to no alignment of its metadata")
    return _group_by_method(methods, {key: _read_alignment(path, key, kind, tensors) for key, kind in kinds.items()})


def _read_alignment(path: Path, key: str, kind: str, tensors: Mapping[str, torch.Tensor]) -> Alignment:
    if kind not in ALIGNMENT_KINDS:
        raise CheckpointError(f"alignments file {path}: unknown kind {kind!r} of {key}")
    parts = {name.removeprefix(f"{key}/"): t for name, t in tensors.items() if name.startswith(f"{key}/")}
    try:
        return ALIGNMENT_KINDS[kind].from_tensors(parts)
    except KeyError as err:
        raise CheckpointError(f"alignments file {path}: {key} lacks tensor {err}") from err


def _group_by_method(methods: list[str], flat: Mapping[str, Alignment]) -> dict[str, dict[str, Alignment]]:
    out: dict[str, dict[str, Alignment]] = {method: {} for method in methods}
    for key, alignment in flat.items():
        method, _, group = key.rpartition("/")
        out.setdefault(method, {})[group] = alignment
    return out
