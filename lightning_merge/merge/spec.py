"""The permutation spec: which permutation group acts on which axis of which weight, as data.

A spec is built once per model from its HF config (`bert_spec`) or from the model itself (`spec_for_model`). Weight
and module names are relative to the model passed in, so the ``bert.`` prefix of ``BertForMaskedLM`` and
``BertForSequenceClassification`` is part of the names. Everything that is model-family specific lives in two tables:
`FAMILIES` (module-name templates of a family) and `ARCHITECTURES` (HF class name -> family, prefix, heads).

Groups (each indexes the feature axis it acts on; `lightning_merge.merge.alignment` says how alignments act):

- ``ff.{i}``: the d_ff intermediate features of layer i (rows + bias of ``intermediate.dense``, columns of
  ``output.dense``).
- ``attn.{i}``: the d concatenated per-head context features of layer i, head-aware (``num_heads`` blocks of
  ``head_dim``): rows + bias of query, key and value share it (so QKᵀ is unchanged), columns of the attention output.
  Two subspaces: ``qk`` (query and key rows) and ``vo`` (value rows, output columns); a permutation moves both the
  same way, a per-head linear alignment may map them differently.
- ``res``: one permutation of the whole residual stream.

Every permuted axis is an `Axis`: its group, its role and its subspace. The role says how a linear map M of the
group's features acts on it: ``out`` axes carry the features (rows and biases of the layers that write them,
embedding columns: transformed by M), ``in`` axes read them (input columns, and the key rows that meet the queries
in QKᵀ: transformed by M⁻ᵀ), ``norm`` axes scale them elementwise (LayerNorm gains and biases: only a permutation
commutes with them). For a permutation M⁻ᵀ = M, so every role is the same gather.

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

GROUP_KINDS = ("ff", "attn", "res")
RESIDUAL = "res"
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
    """Where a group's features are read: the ``input`` (first positional arg) or ``output`` of ``module``."""

    module: str
    source: Literal["input", "output"]

    @property
    def key(self) -> str:
        return f"{self.module}:{self.source}"


@dataclass(frozen=True)
class FamilyNames:
    """Module-name templates of one model family, relative to the base model (``{i}`` = layer index).

    Head names (``pooler`` ... ``mlm_bias``) are relative to the full model; ``pooler`` is under the base prefix.
    """

    word_embeddings: str
    position_embeddings: str
    token_type_embeddings: str
    embeddings_norm: str
    layer: str
    query: str
    key: str
    value: str
    attention_out: str
    attention_norm: str
    ff_in: str
    ff_out: str
    ff_norm: str
    pooler: str
    classifier: str
    mlm_transform: str
    mlm_norm: str
    mlm_decoder: str
    mlm_bias: str


BERT_NAMES = FamilyNames(
    word_embeddings="embeddings.word_embeddings",
    position_embeddings="embeddings.position_embeddings",
    token_type_embeddings="embeddings.token_type_embeddings",
    embeddings_norm="embeddings.LayerNorm",
    layer="encoder.layer.{i}",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attention_out="attention.output.dense",
    attention_norm="attention.output.LayerNorm",
    ff_in="intermediate.dense",
    ff_out="output.dense",
    ff_norm="output.LayerNorm",
    pooler="pooler.dense",
    classifier="classifier",
    mlm_transform="cls.predictions.transform.dense",
    mlm_norm="cls.predictions.transform.LayerNorm",
    mlm_decoder="cls.predictions.decoder",
    mlm_bias="cls.predictions.bias",
)

FAMILIES: dict[str, FamilyNames] = {"bert": BERT_NAMES}


@dataclass(frozen=True)
class Architecture:
    """An HF model class: its family, where the base model sits (``prefix``) and which heads it carries."""

    family: str
    prefix: str
    heads: tuple[str, ...]


ARCHITECTURES: dict[str, Architecture] = {
    "BertModel": Architecture("bert", "", ("pooler",)),
    "BertForMaskedLM": Architecture("bert", "bert.", ("mlm",)),
    "BertForSequenceClassification": Architecture("bert", "bert.", ("pooler", "classifier")),
}

# Config fields that fix every shape the spec touches, in the order a mismatch is reported.
_SHAPE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
    "type_vocab_size",
)


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
        base_prefix: where the base model sits in the full model (``"bert."``; ``""`` for a bare ``BertModel``).
    """

    architecture: str
    axes: Mapping[str, tuple[Axis | None, ...]]
    groups: Mapping[str, PermGroup]
    points: Mapping[str, tuple[FeaturePoint, ...]]
    ties: Mapping[str, str] = field(default_factory=dict)
    fields: tuple[tuple[str, Any], ...] = ()
    base_prefix: str = ""

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
    """Small helpers that declare weights: ``dense``, ``norm``, ``embed``, ``tie`` (git-re-basin style)."""

    def __init__(self) -> None:
        self.axes: dict[str, tuple[Axis | None, ...]] = {}
        self.ties: dict[str, str] = {}

    def dense(self, name: str, p_out: GroupRef, p_in: GroupRef, bias: bool = True) -> None:
        rows = _axis(p_out, "out")
        self.axes[f"{name}.weight"] = (rows, _axis(p_in, "in"))  # torch Linear weight is (out, in)
        if bias:
            self.axes[f"{name}.bias"] = (rows,)

    def norm(self, name: str, p: str | None) -> None:
        self.axes[f"{name}.weight"] = (_axis(p, "norm"),)
        self.axes[f"{name}.bias"] = (_axis(p, "norm"),)

    def embed(self, name: str, p: str | None) -> None:
        self.axes[f"{name}.weight"] = (None, _axis(p, "out"))  # (vocab, hidden): each row a vector of features

    def vector(self, name: str, p: str | None) -> None:
        self.axes[name] = (_axis(p, "out"),)

    def tie(self, alias: str, source: str) -> None:
        self.ties[alias] = source
        self.axes[alias] = self.axes[source]


def _layer_weights(build: _SpecBuilder, names: FamilyNames, layer: str, i: int) -> None:
    attn, ff = f"attn.{i}", f"ff.{i}"
    # keys meet queries in QKᵀ, so they read the qk subspace (M⁻ᵀ) while queries carry it (M)
    build.dense(f"{layer}.{names.query}", Axis(attn, "out", "qk"), RESIDUAL)
    build.dense(f"{layer}.{names.key}", Axis(attn, "in", "qk"), RESIDUAL)
    build.dense(f"{layer}.{names.value}", Axis(attn, "out", "vo"), RESIDUAL)
    build.dense(f"{layer}.{names.attention_out}", RESIDUAL, Axis(attn, "in", "vo"))
    build.norm(f"{layer}.{names.attention_norm}", RESIDUAL)
    build.dense(f"{layer}.{names.ff_in}", ff, RESIDUAL)
    build.dense(f"{layer}.{names.ff_out}", RESIDUAL, ff)
    build.norm(f"{layer}.{names.ff_norm}", RESIDUAL)


def _pooler_head(build: _SpecBuilder, names: FamilyNames, prefix: str, config: Any) -> None:
    # The pooler reads the residual stream; its tanh output feeds the classifier in its own (unpermuted) basis.
    build.dense(prefix + names.pooler, None, RESIDUAL)


def _classifier_head(build: _SpecBuilder, names: FamilyNames, prefix: str, config: Any) -> None:
    build.dense(names.classifier, None, None)


def _mlm_head(build: _SpecBuilder, names: FamilyNames, prefix: str, config: Any) -> None:
    # The decoder reads the transform's output against vocab rows in the residual basis (tied or not), so the
    # transform's output must move with the residual permutation too.
    build.dense(names.mlm_transform, RESIDUAL, RESIDUAL)
    build.norm(names.mlm_norm, RESIDUAL)
    build.vector(names.mlm_bias, None)
    if getattr(config, "tie_word_embeddings", True):
        # the tie gives the decoder the embeddings' ``out`` role, although it reads the stream (``in``): one tensor
        # can take only one transform, so only alignments with M⁻ᵀ = M (permutations, orthogonal maps) keep the tie
        build.tie(f"{names.mlm_decoder}.weight", f"{prefix}{names.word_embeddings}.weight")
        build.tie(f"{names.mlm_decoder}.bias", names.mlm_bias)
    else:  # untied (transformers also unties the decoder bias then): its own weights, vocab rows unpermuted
        build.dense(names.mlm_decoder, None, RESIDUAL)


HEAD_BUILDERS = {"pooler": _pooler_head, "classifier": _classifier_head, "mlm": _mlm_head}


def _groups(config: Any) -> dict[str, PermGroup]:
    heads = config.num_attention_heads
    groups: dict[str, PermGroup] = {}
    for i in range(config.num_hidden_layers):
        groups[f"ff.{i}"] = PermGroup(f"ff.{i}", "ff", config.intermediate_size)
        groups[f"attn.{i}"] = PermGroup(f"attn.{i}", "attn", config.hidden_size, heads, ATTENTION_SUBSPACES)
    groups[RESIDUAL] = PermGroup(RESIDUAL, "res", config.hidden_size)
    return groups


def _points(config: Any, names: FamilyNames, prefix: str) -> dict[str, tuple[FeaturePoint, ...]]:
    points: dict[str, tuple[FeaturePoint, ...]] = {}
    residual = [FeaturePoint(prefix + names.embeddings_norm, "output")]
    for i in range(config.num_hidden_layers):
        layer = prefix + names.layer.format(i=i)
        points[f"ff.{i}"] = (FeaturePoint(f"{layer}.{names.ff_out}", "input"),)
        points[f"attn.{i}"] = (FeaturePoint(f"{layer}.{names.attention_out}", "input"),)
        for projection, module in zip(ATTENTION_PROJECTIONS, (names.query, names.key, names.value)):
            points[f"attn.{i}/{projection}"] = (FeaturePoint(f"{layer}.{module}", "output"),)
        residual += [
            FeaturePoint(f"{layer}.{names.attention_norm}", "output"),
            FeaturePoint(f"{layer}.{names.ff_norm}", "output"),
        ]
    points[RESIDUAL] = tuple(residual)
    return points


def _architecture(model_class_or_arch: str | type) -> tuple[str, Architecture]:
    name = model_class_or_arch if isinstance(model_class_or_arch, str) else model_class_or_arch.__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModel(f"no permutation spec for {name}; supported: {', '.join(ARCHITECTURES)}")
    return name, ARCHITECTURES[name]


def _check_config(config: Any, name: str, arch: Architecture) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type != arch.family:
        raise UnsupportedModel(f"{name} expects a {arch.family!r} config, got model_type {model_type!r}")
    if config.hidden_size % config.num_attention_heads:
        raise ArchitectureMismatch(
            f"hidden_size {config.hidden_size} is not divisible by num_attention_heads {config.num_attention_heads}"
        )
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise UnsupportedModel(f"position_embedding_type {position!r} is not supported; only 'absolute' is")


def bert_spec(
    config: Any, model_class_or_arch: str | type = "BertModel", pooler: bool | None = None
) -> PermutationSpec:
    """Build the permutation spec of a BERT-family model from its HF config.

    Args:
        config: an HF config (``BertConfig``) — layer count, sizes and heads are read from it.
        model_class_or_arch: the HF class (or its name), e.g. ``BertForMaskedLM``; fixes prefix and heads.
        pooler: whether the model has a pooler (``BertModel(add_pooling_layer=False)`` has none); ``None`` takes
            the class's default.

    Returns:
        The `PermutationSpec` with names relative to a model of that class.

    Raises:
        UnsupportedModel: the class or config is not one the spec tables know.
    """
    name, arch = _architecture(model_class_or_arch)
    _check_config(config, name, arch)
    names, prefix = FAMILIES[arch.family], arch.prefix
    heads = [h for h in arch.heads if h != "pooler" or pooler is not False]
    if pooler and "pooler" not in heads:
        heads.insert(0, "pooler")
    build = _SpecBuilder()
    for embedding in (names.word_embeddings, names.position_embeddings, names.token_type_embeddings):
        build.embed(prefix + embedding, RESIDUAL)
    build.norm(prefix + names.embeddings_norm, RESIDUAL)
    for i in range(config.num_hidden_layers):
        _layer_weights(build, names, prefix + names.layer.format(i=i), i)
    for head in heads:
        HEAD_BUILDERS[head](build, names, prefix, config)
    fields = [("architecture", name)] + [(f, getattr(config, f, None)) for f in _SHAPE_FIELDS]
    fields += [("pooler", "pooler" in heads)]
    if "mlm" in heads:
        fields.append(("tie_word_embeddings", bool(getattr(config, "tie_word_embeddings", True))))
    if "classifier" in heads:
        fields.append(("num_labels", config.num_labels))
    points = _points(config, names, prefix)
    return PermutationSpec(name, build.axes, _groups(config), points, build.ties, tuple(fields), prefix)


def spec_for_model(model: torch.nn.Module) -> PermutationSpec:
    """Build the spec of an HF model instance and check it against the model's state dict.

    Raises:
        UnsupportedModel: the model's class is not in `ARCHITECTURES` or it has weights the spec does not know.
        ArchitectureMismatch: the state dict's shapes disagree with the config.
    """
    name, arch = _architecture(type(model))
    pooler_module = arch.prefix + FAMILIES[arch.family].pooler
    has_pooler = _get_module(model, pooler_module) is not None
    spec = bert_spec(model.config, name, pooler=has_pooler)
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
