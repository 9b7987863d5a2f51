"""The permutation spec: which permutation group acts on which axis of which weight, as data.

A spec is built once per model from its HF config (`spec_from_config`) or from the model itself (`spec_for_model`).
Weight and module names are relative to the model passed in, so the ``bert.`` prefix of ``BertForMaskedLM`` is part
of the names. Everything family specific — module names, heads, LayerNorm placement, weight layout, fused projections,
ties — comes from the family's record in `lightning_merge.merge.families`; this module only reads it.

Groups (each indexes the feature axis it acts on; `lightning_merge.merge.alignment` says how alignments act):

- ``ff.{i}``: the d_ff intermediate features of layer i (rows + bias of ``intermediate.dense``, columns of
  ``output.dense``).
- ``attn.{i}``: the d concatenated per-head context features of layer i, head-aware (``num_heads`` blocks of
  ``head_dim``): rows + bias of query, key and value share it (so QKᵀ is unchanged), columns of the attention output.
  A fused projection (GPT-2's ``c_attn``) is declared as a `Split` into equal parts (``c_attn.weight#query`` ...),
  each with its own axes: `PermutationSpec.split` and `PermutationSpec.join` convert a state dict between the two.
  Two subspaces: ``qk`` (query and key rows) and ``vo`` (value rows, output columns); a permutation moves both the
  same way, a per-head linear alignment may map them differently.
- ``res``: one permutation of the whole residual stream.

Every permuted axis is an `Axis`: its group, its role and its subspace. The role says how a linear map M of the
group's features acts on it: ``out`` axes carry the features (rows and biases of the layers that write them,
embedding columns: transformed by M), ``in`` axes read them (input columns, and the key rows that meet the queries
in QKᵀ: transformed by M⁻ᵀ), ``norm`` axes scale them elementwise (LayerNorm gains and biases: only a permutation
commutes with them). For a permutation M⁻ᵀ = M, so every role is the same gather.

The residual stream's feature points are where the stream itself is visible: each LayerNorm's output in a post-LN
family, each LayerNorm's input (and the final one's) in a pre-LN family.

The MLM decoder is tied to the word embeddings (unless the config unties them): the spec declares the tie (``ties``)
and gives the decoder weight the same axes (``(None, res)``); the decoder reads the transform's output in the
word-embedding basis, so the transform's rows, bias and LayerNorm move with ``res`` as well. The decoder's per-vocab
bias is not permuted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch

from lightning_merge.errors import ArchitectureMismatch, UnsupportedModel
from lightning_merge.merge.families import (
    ARCHITECTURES,
    RESIDUAL,
    SEQUENCE_CLASSIFICATION,
    Decoder,
    Dense,
    Family,
    Norm,
    Vector,
    family_of_class,
)

GROUP_KINDS = ("ff", "attn", "res")
PART = "#"  # fused weight name + PART + part name: ``h.0.attn.c_attn.weight#query``
AXIS_ROLES = ("out", "in", "norm")
ATTENTION_SUBSPACES = ("qk", "vo")
# Extra feature sets of an attention group, recorded only for methods that ask: ``attn.{i}/query`` etc.
ATTENTION_PROJECTIONS = ("query", "key", "value")


@dataclass(frozen=True)
class PermGroup:
    """One alignment group: ``size`` features, in ``num_heads`` contiguous blocks for attention.

    ``subspaces`` name parts of the group's axes that a linear alignment may map differently (attention: ``qk``
    and ``vo``); a permutation acts on all of them alike.
    """

    name: str
    kind: str
    size: int
    num_heads: int = 1
    subspaces: tuple[str, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.size // self.num_heads


@dataclass(frozen=True)
class Axis:
    """One axis of a weight that a group acts on: ``role`` is ``out``, ``in`` or ``norm`` (see the module doc)."""

    group: str
    role: str = "out"
    subspace: str = ""

    def __post_init__(self) -> None:
        if self.role not in AXIS_ROLES:
            raise ValueError(f"axis role {self.role!r} is not one of {AXIS_ROLES}")


@dataclass(frozen=True)
class FeaturePoint:
    """Where a group's features are read: the ``input`` (first positional arg) or ``output`` of ``module``.

    ``part`` (index, count) reads only that equal part of the last dimension (a fused projection's query, key or
    value).
    """

    module: str
    source: Literal["input", "output"]
    part: tuple[int, int] | None = None

    @property
    def key(self) -> str:
        suffix = f"[{self.part[0]}/{self.part[1]}]" if self.part else ""
        return f"{self.module}:{self.source}{suffix}"

    def select(self, value: torch.Tensor) -> torch.Tensor:
        """The point's features out of the module's (..., width) input or output."""
        return value if self.part is None else value.chunk(self.part[1], dim=-1)[self.part[0]]


@dataclass(frozen=True)
class Split:
    """A fused weight stored as equal ``parts`` (spec weight names) along dimension ``dim``."""

    dim: int
    parts: tuple[str, ...]


# Config fields that fix every shape the spec touches, in the order a mismatch is reported.
_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """Weight name -> per-axis `Axis` (``None``: axis not aligned), the groups, and their feature points.

    Attributes:
        architecture: HF class name the spec was built for.
        axes: every floating weight of the model; tied aliases are listed too, with the axes of their source.
        groups: group name -> `PermGroup`, in matching order (ff/attn per layer, then ``res``).
        points: feature set name -> feature points. Every group's matching features are under its own name; an
            attention group's projections are under ``attn.{i}/query``, ``/key`` and ``/value``.
        ties: alias weight name -> source weight name (the alias shares the source's storage).
        fields: (name, value) pairs identifying the architecture; two specs are compatible when these are equal.
        base_prefix: where the base model sits in the full model (``"bert."``).
        splits: fused model weight -> its `Split` into the parts ``axes`` describes.
        family: the `Family` record the spec was built from.
        norm_readers: pre-LN families: LayerNorm module -> the weights (``axes`` names) that read its output, where
            `lightning_merge.merge.fold.fold_layer_norms` folds its gain.
        norms_folded: whether the LayerNorm gains have been folded into their readers (see that function).
        inputs: every weight (``axes`` name) that reads an aligned group -> (its input axis, the feature set of its
            layer's input: ``{group}/input:{module}``, one point), for methods that fit a layer to its inputs
            (RegMean's Gram matrices).
    """

    architecture: str
    axes: Mapping[str, tuple[Axis | None, ...]]
    groups: Mapping[str, PermGroup]
    points: Mapping[str, tuple[FeaturePoint, ...]]
    ties: Mapping[str, str] = field(default_factory=dict)
    fields: tuple[tuple[str, Any], ...] = ()
    base_prefix: str = ""
    splits: Mapping[str, Split] = field(default_factory=dict)
    family: Family | None = None
    norm_readers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    norms_folded: bool = False
    inputs: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def split(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state_dict`` with every fused weight replaced by its parts (views), in place of the fused entry."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if name in self.splits:
                split = self.splits[name]
                out.update(zip(split.parts, tensor.chunk(len(split.parts), dim=split.dim)))
            else:
                out[name] = tensor
        return out

    def join(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `split`: parts concatenated back into their fused weight, at the first part's place."""
        part_of = {part: fused for fused, split in self.splits.items() for part in split.parts}
        out: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            fused = part_of.get(name)
            if fused is None:
                out[name] = tensor
            elif fused not in out:
                split = self.splits[fused]
                out[fused] = torch.cat([state_dict[part] for part in split.parts], dim=split.dim)
        return out

    @cached_property
    def group_axes(self) -> dict[str, list[tuple[str, int]]]:
        """The inverse map, derived once: group name -> [(weight name, axis)]."""
        inverse: dict[str, list[tuple[str, int]]] = {name: [] for name in self.groups}
        for weight, axes in self.axes.items():
            for index, axis in enumerate(axes):
                if axis is not None:
                    inverse[axis.group].append((weight, index))
        return inverse

    def feature_size(self, features: str) -> int:
        """Width of a feature set of ``points``: that of its group (``attn.0/query`` belongs to ``attn.0``)."""
        return self.groups[features.split("/")[0]].size

    @property
    def num_layers(self) -> int:
        return len(self.groups_of_kind(["ff"]))

    def layer_module(self, index: int) -> str:
        """The module of layer ``index`` (``bert.encoder.layer.3``)."""
        return self.base_prefix + self.family.layer.format(i=index)

    def stream_points_before(self, layer: int) -> int:
        """How many of the residual group's feature points, in order, read the stream before layer ``layer`` runs
        (the stream it reads included): those before the layer's own, and its first where that reads the layer's
        input (pre-LN: its first LayerNorm's input is the stream the layer reads)."""
        inside = self.layer_module(layer) + "."
        points = self.points[RESIDUAL]
        first = next(i for i, point in enumerate(points) if point.module.startswith(inside))
        return first + int(points[first].source == "input")

    def groups_of_kind(self, kinds: Iterable[str]) -> list[str]:
        """Group names whose kind is in ``kinds`` (``ff``, ``attn``, ``res``), in spec order."""
        wanted = set(kinds)
        return [name for name, group in self.groups.items() if group.kind in wanted]

    def check_compatible(self, other: PermutationSpec, what: str = "models") -> None:
        """Raise `ArchitectureMismatch` naming the first field in which ``other`` differs from this spec."""
        check_same_fields(self.fields, other.fields, what)

    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Check that ``state_dict`` holds exactly the floating weights this spec describes, with matching shapes.

        Raises:
            ArchitectureMismatch: a weight is missing or a permuted axis has the wrong size.
            UnsupportedModel: the state dict has floating weights the spec does not describe.
        """
        state_dict = self.split(state_dict)
        missing = [name for name in self.axes if name not in state_dict and name not in self.ties]
        if missing:
            raise ArchitectureMismatch(f"state dict lacks {missing[0]} (expected by the {self.architecture} spec)")
        unknown = [n for n, t in state_dict.items() if n not in self.axes and torch.is_floating_point(t)]
        if unknown:
            raise UnsupportedModel(
                f"weight {unknown[0]} is not described by the {self.architecture} spec; "
                f"supported classes: {', '.join(ARCHITECTURES)}"
            )
        for name, axes in self.axes.items():
            if name in state_dict:
                self._check_shape(name, tuple(state_dict[name].shape), axes)

    def _check_shape(self, name: str, shape: tuple[int, ...], axes: tuple[Axis | None, ...]) -> None:
        if len(shape) != len(axes):
            raise ArchitectureMismatch(f"{name} has {len(shape)} dims, the spec expects {len(axes)}")
        for index, axis in enumerate(axes):
            if axis is not None and shape[index] != self.groups[axis.group].size:
                size, group = self.groups[axis.group].size, axis.group
                raise ArchitectureMismatch(f"{name} axis {index} has size {shape[index]}, group {group} has {size}")


def check_same_fields(fields_a: Iterable[tuple[str, Any]], fields_b: Iterable[tuple[str, Any]], what: str) -> None:
    """Raise `ArchitectureMismatch` naming the first (name, value) pair that differs between the two sequences."""
    list_a, list_b = list(fields_a), list(fields_b)
    for (name_a, value_a), (name_b, value_b) in zip(list_a, list_b):
        if name_a != name_b or value_a != value_b:
            raise ArchitectureMismatch(f"{what} differ in {name_a}: {value_a!r} vs {value_b!r}")
    if len(list_a) != len(list_b):
        raise ArchitectureMismatch(f"{what} differ in their number of fields: {len(list_a)} vs {len(list_b)}")


GroupRef = str | Axis | None  # a group name takes the role its position implies


def _axis(ref: GroupRef, role: str) -> Axis | None:
    return Axis(ref, role) if isinstance(ref, str) else ref




class _SpecBuilder:
    """Small helpers that declare weights: ``dense``, ``fused_dense``, ``norm``, ``embed``, ``tie`` (git-re-basin
    style); ``layout`` says how the family's layer weights are stored (``linear``: (out, in); ``conv1d``: (in, out))."""

    def __init__(self, layout: str = "linear") -> None:
        self.layout = layout
        self.axes: dict[str, tuple[Axis | None, ...]] = {}
        self.ties: dict[str, str] = {}
        self.splits: dict[str, Split] = {}
        self.norm_readers: dict[str, list[str]] = {}
        self.reading_norm: str | None = None  # pre-LN: the LayerNorm whose output the next stream readers read
        self.inputs: dict[str, tuple[int, str]] = {}  # reader weight -> (input axis, input feature set)

    def read_by(self, norm: str | None) -> None:
        """Attribute the stream readers declared from now on to ``norm`` (None: to no LayerNorm)."""
        self.reading_norm = norm
        if norm is not None:
            self.norm_readers.setdefault(norm, [])

    def _reads(self, weight: str, p_in: GroupRef, module: str, transposed: bool) -> None:
        axis = _axis(p_in, "in")
        if axis is not None and axis.role == "in":
            self.inputs[weight] = (0 if transposed else 1, input_features(axis.group, module))
        if self.reading_norm is not None and _axis(p_in, "in") == Axis(RESIDUAL, "in"):
            self.norm_readers[self.reading_norm].append(weight)

    def dense(self, name: str, p_out: GroupRef, p_in: GroupRef, bias: bool = True, layout: str | None = None) -> None:
        rows, columns = _axis(p_out, "out"), _axis(p_in, "in")
        transposed = (layout or self.layout) == "conv1d"
        self.axes[f"{name}.weight"] = (columns, rows) if transposed else (rows, columns)
        self._reads(f"{name}.weight", p_in, name, transposed)
        if bias:
            self.axes[f"{name}.bias"] = (rows,)

    def fused_dense(self, name: str, parts: Mapping[str, GroupRef], p_in: GroupRef) -> None:
        """One layer whose outputs are equal parts (GPT-2's ``c_attn``: query, key, value), each its own weight."""
        weight_dim = 1 if self.layout == "conv1d" else 0
        for suffix, dim in ((".weight", weight_dim), (".bias", 0)):
            self.splits[name + suffix] = Split(dim, tuple(f"{name}{suffix}{PART}{part}" for part in parts))
        for part, p_out in parts.items():
            rows, columns = _axis(p_out, "out"), _axis(p_in, "in")
            self.axes[f"{name}.weight{PART}{part}"] = (columns, rows) if self.layout == "conv1d" else (rows, columns)
            self._reads(f"{name}.weight{PART}{part}", p_in, name, self.layout == "conv1d")
            self.axes[f"{name}.bias{PART}{part}"] = (rows,)

    def norm(self, name: str, p: str | None) -> None:
        self.axes[f"{name}.weight"] = (_axis(p, "norm"),)
        self.axes[f"{name}.bias"] = (_axis(p, "norm"),)

    def embed(self, name: str, p: str | None) -> None:
        self.axes[f"{name}.weight"] = (None, _axis(p, "out"))  # (vocab, hidden): each row a vector of features

    def vector(self, name: str, p: str | None) -> None:
        self.axes[name] = (_axis(p, "out"),)

    def tie(self, alias: str, source: str, reads: bool = False) -> None:
        self.ties[alias] = source
        self.axes[alias] = self.axes[source]
        if reads and self.reading_norm is not None:  # no `inputs` entry: a tie keeps its source's value
            self.norm_readers[self.reading_norm].append(alias)


def input_features(group: str, module: str) -> str:
    """The feature set of ``module``'s input, which carries ``group``'s features (`PermutationSpec.inputs`)."""
    return f"{group}/input:{module}"


def _layer_weights(build: _SpecBuilder, family: Family, layer: str, i: int) -> None:
    attn, ff = f"attn.{i}", f"ff.{i}"
    pre = family.norm_placement == "pre"
    # keys meet queries in QKᵀ, so they read the qk subspace (M⁻ᵀ) while queries carry it (M)
    projections = {"query": Axis(attn, "out", "qk"), "key": Axis(attn, "in", "qk"), "value": Axis(attn, "out", "vo")}
    build.read_by(f"{layer}.{family.norms[0]}" if pre else None)
    if family.fused_attention:
        build.fused_dense(f"{layer}.{family.attention}", projections, RESIDUAL)
    else:
        for module, axis in zip(family.attention, projections.values()):
            build.dense(f"{layer}.{module}", axis, RESIDUAL)
    build.dense(f"{layer}.{family.attention_out}", RESIDUAL, Axis(attn, "in", "vo"))
    build.read_by(f"{layer}.{family.norms[1]}" if pre else None)
    build.dense(f"{layer}.{family.ff_in}", ff, RESIDUAL)
    build.read_by(None)
    build.dense(f"{layer}.{family.ff_out}", RESIDUAL, ff)
    for norm in family.norms:
        build.norm(f"{layer}.{norm}", RESIDUAL)


def _head_weights(build: _SpecBuilder, family: Family, prefix: str, head: str, config: Any) -> None:
    word_embeddings = f"{prefix}{family.embeddings[0]}.weight"
    tied = bool(getattr(config, "tie_word_embeddings", True))
    # a pre-LN model's heads read the final LayerNorm; a LayerNorm inside a head is read by what follows it
    build.read_by(prefix + family.final_norm if family.final_norm else None)
    for weight in family.heads[head]:
        name = weight.name.format(base=prefix)
        if isinstance(weight, Dense):
            build.dense(name, weight.out, weight.reads, weight.bias, layout="linear")
        elif isinstance(weight, Norm):
            build.norm(name, RESIDUAL)
            build.read_by(name)
        elif isinstance(weight, Vector):
            build.vector(name, None)
        elif tied:
            # the tie gives the decoder the embeddings' ``out`` role, although it reads the stream (``in``): one
            # tensor takes one transform, so only alignments with M⁻ᵀ = M (permutations, orthogonal maps) keep it
            build.tie(f"{name}.weight", word_embeddings, reads=True)
            if weight.shared_bias:
                build.tie(f"{name}.bias", weight.shared_bias)
            elif weight.bias:
                build.vector(f"{name}.bias", None)
        else:  # untied (transformers unties a shared decoder bias then too): own weights, vocab rows unaligned
            build.dense(name, None, RESIDUAL, weight.bias, layout="linear")


def _groups(config: Any, family: Family) -> dict[str, PermGroup]:
    heads, d_ff = config.num_attention_heads, family.intermediate_size(config)
    groups: dict[str, PermGroup] = {}
    for i in range(config.num_hidden_layers):
        groups[f"ff.{i}"] = PermGroup(f"ff.{i}", "ff", d_ff)
        groups[f"attn.{i}"] = PermGroup(f"attn.{i}", "attn", config.hidden_size, heads, ATTENTION_SUBSPACES)
    groups[RESIDUAL] = PermGroup(RESIDUAL, "res", config.hidden_size)
    return groups


def _projection_points(family: Family, layer: str) -> dict[str, FeaturePoint]:
    if family.fused_attention:
        module = f"{layer}.{family.attention}"
        count = len(ATTENTION_PROJECTIONS)
        return {p: FeaturePoint(module, "output", (index, count)) for index, p in enumerate(ATTENTION_PROJECTIONS)}
    return {p: FeaturePoint(f"{layer}.{m}", "output") for p, m in zip(ATTENTION_PROJECTIONS, family.attention)}


def _residual_points(config: Any, family: Family, prefix: str) -> tuple[FeaturePoint, ...]:
    """Post-LN: the stream is each LayerNorm's output. Pre-LN: the stream is what each LayerNorm reads."""
    layers = [prefix + family.layer.format(i=i) for i in range(config.num_hidden_layers)]
    if family.norm_placement == "post":
        first = [FeaturePoint(prefix + family.embeddings_norm, "output")] if family.embeddings_norm else []
        return tuple(first + [FeaturePoint(f"{layer}.{norm}", "output") for layer in layers for norm in family.norms])
    readers = [FeaturePoint(f"{layer}.{norm}", "input") for layer in layers for norm in family.norms]
    return tuple(readers + [FeaturePoint(prefix + family.final_norm, "input")])


def _points(config: Any, family: Family, prefix: str) -> dict[str, tuple[FeaturePoint, ...]]:
    points: dict[str, tuple[FeaturePoint, ...]] = {}
    for i in range(config.num_hidden_layers):
        layer = prefix + family.layer.format(i=i)
        points[f"ff.{i}"] = (FeaturePoint(f"{layer}.{family.ff_out}", "input"),)
        points[f"ff.{i}/pre"] = (FeaturePoint(f"{layer}.{family.ff_in}", "output"),)  # before the activation
        points[f"attn.{i}"] = (FeaturePoint(f"{layer}.{family.attention_out}", "input"),)
        for projection, point in _projection_points(family, layer).items():
            points[f"attn.{i}/{projection}"] = (point,)
    points[RESIDUAL] = _residual_points(config, family, prefix)
    return points


def _check_config(config: Any, name: str, family: Family) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != family.model_type:
        raise UnsupportedModel(f"{name} expects a {family.model_type!r} config, got model_type {model_type!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ArchitectureMismatch(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
        )
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise UnsupportedModel(f"position_embedding_type {position!r} is not supported; only 'absolute' is")


def _fields(config: Any, name: str, family: Family, heads: list[str]) -> tuple[tuple[str, Any], ...]:
    fields: list[tuple[str, Any]] = [("family", family.name), ("architecture", name)]
    fields += [(f, getattr(config, f, None)) for f in _SHAPE_FIELDS if f != "intermediate_size"]
    fields += [("intermediate_size", family.intermediate_size(config))]
    fields += [(f, getattr(config, f, None)) for f in family.shape_fields]
    fields += [("heads", tuple(heads))]
    if any(isinstance(w, Decoder) for head in heads for w in family.heads[head]):
        fields.append(("tie_word_embeddings", bool(getattr(config, "tie_word_embeddings", True))))
    if getattr(config, "num_labels", None) is not None and name == family.classes.get(SEQUENCE_CLASSIFICATION):
        fields.append(("num_labels", config.num_labels))
    return tuple(fields)


def spec_from_config(
    config: Any, model_class_or_arch: str | type, pooler: bool | None = None
) -> PermutationSpec:
    """Build the permutation spec of a model of any registered family from its HF config.

    Args:
        config: an HF config of the class's family — layer count, sizes and heads are read from it.
        model_class_or_arch: the HF class (or its name), e.g. ``BertForMaskedLM``; fixes family, prefix and heads.
        pooler: whether the model has a pooler (``BertModel(add_pooling_layer=False)`` has none); ``None`` takes
            the class's default.

    Returns:
        The `PermutationSpec` with names relative to a model of that class.

    Raises:
        UnsupportedModel: the class or config is not one the family records know.
    """
    name = model_class_or_arch if isinstance(model_class_or_arch, str) else model_class_or_arch.__name__
    family = family_of_class(name)
    _check_config(config, name, family)
    heads = [h for h in family.class_heads[name] if h != "pooler" or pooler is not False]
    if pooler and "pooler" not in heads and "pooler" in family.heads:
        heads.insert(0, "pooler")
    prefix = family.prefix(name)
    build = _SpecBuilder(family.layout)
    for embedding in family.embeddings:
        build.embed(prefix + embedding, RESIDUAL)
    if family.embeddings_norm:
        build.norm(prefix + family.embeddings_norm, RESIDUAL)
    for i in range(config.num_hidden_layers):
        _layer_weights(build, family, prefix + family.layer.format(i=i), i)
    if family.final_norm:
        build.norm(prefix + family.final_norm, RESIDUAL)
    for head in heads:
        _head_weights(build, family, prefix, head, config)
    readers = {norm: tuple(weights) for norm, weights in build.norm_readers.items() if weights}
    points = _points(config, family, prefix)
    for weight, (_, features) in build.inputs.items():
        points[features] = (FeaturePoint(features.partition("/input:")[2], "input"),)
    return PermutationSpec(
        name, build.axes, _groups(config, family), points, build.ties,
        _fields(config, name, family, heads), prefix, build.splits, family, readers, inputs=build.inputs,
    )


def spec_for_model(model: torch.nn.Module) -> PermutationSpec:
    """Build the spec of an HF model instance and check it against the model's state dict.

    Raises:
        UnsupportedModel: the model's class has no family record, or it has weights the spec does not know.
        ArchitectureMismatch: the state dict's shapes disagree with the config.
    """
    name = type(model).__name__
    family = family_of_class(name)
    pooler_module = "pooler" in family.heads and _get_module(model, family.prefix(name) + "pooler")
    spec = spec_from_config(model.config, name, pooler=bool(pooler_module))
    state = model.state_dict()
    spec.check_state_dict(state)
    untied = [a for a, s in spec.ties.items() if a in state and state[a].data_ptr() != state[s].data_ptr()]
    if untied:
        raise ArchitectureMismatch(f"{untied[0]} is not tied to {spec.ties[untied[0]]} although the config ties them")
    return spec


def spec_for_pair(model_a: torch.nn.Module, model_b: torch.nn.Module) -> PermutationSpec:
    """The spec of two models that must share one architecture (`ArchitectureMismatch` names the first difference)."""
    spec_a, spec_b = spec_for_model(model_a), spec_for_model(model_b)
    spec_a.check_compatible(spec_b, "model_a and model_b")
    return spec_a


def _get_module(model: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None
