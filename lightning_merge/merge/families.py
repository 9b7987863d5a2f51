"""Model families as data: what an HF architecture looks like to the merger, one `Family` record per family.

A record names the modules of one family (templates relative to the base model, ``{i}`` = layer index), where its
LayerNorms sit (``post``: they normalize the residual stream itself; ``pre``: they only read it), how its dense
weights are laid out (``nn.Linear`` is (out, in); GPT-2's ``Conv1D`` is (in, out)), whether query, key and value are
one fused projection, whether it takes token types, which HF class serves which task, and the weights of each task
head. `lightning_merge.merge.spec` builds permutation specs from these records; model loading, the objectives and the
Lightning modules read them too, so nothing else names a family's modules. Adding a family is one record here (and
its tiny config in the tests' factory); see ``docs/architecture.md``.

Head weights are declared with four small kinds: `Dense` (reads or writes the residual stream, or neither), `Norm`
(a LayerNorm over the stream), `Vector` (an unaligned vector, e.g. a per-vocab bias) and `Decoder` (the LM decoder,
tied to the word embeddings unless the config unties them). ``{base}`` in a head weight's name is the base model's
prefix (``bert.``, or nothing in the bare base model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from lightning_merge.errors import UnsupportedModel

RESIDUAL = "res"

MASKED_LM, CAUSAL_LM, SEQUENCE_CLASSIFICATION, BASE = "masked_lm", "causal_lm", "sequence_classification", "base"
LM_TASKS = (MASKED_LM, CAUSAL_LM)


@dataclass(frozen=True)
class Dense:
    """A dense layer of a head: ``out``/``reads`` are ``"res"`` when its rows write / its columns read the stream."""

    name: str
    out: str | None
    reads: str | None
    bias: bool = True


@dataclass(frozen=True)
class Norm:
    """A LayerNorm of a head over the residual stream (its gain and bias move with the stream's permutation)."""

    name: str


@dataclass(frozen=True)
class Vector:
    """A vector no group acts on (a per-vocab decoder bias)."""

    name: str


@dataclass(frozen=True)
class Decoder:
    """The LM decoder: tied to the word embeddings unless the config unties them.

    ``shared_bias`` names the head vector the decoder's bias is tied to (BERT, RoBERTa); ``bias`` says whether the
    decoder has a bias at all (GPT-2's ``lm_head`` has none).
    """

    name: str
    shared_bias: str | None = None
    bias: bool = True


HeadWeight = Dense | Norm | Vector | Decoder


@dataclass(frozen=True)
class Family:
    """One model family, as data (see the module doc).

    Attributes:
        name: our name of the family (``bert``, ``gpt2``, ...).
        model_type: the HF config's ``model_type``.
        base: the base model's attribute in the task classes (HF's ``base_model_prefix``).
        classes: task (``base``, ``masked_lm``, ``causal_lm``, ``sequence_classification``) -> HF class name.
        class_heads: HF class name -> the heads it carries (keys of ``heads``), in build order.
        heads: head name -> its weights.
        embeddings: embedding modules that write the stream, the word embeddings first, then positions.
        embeddings_norm: the LayerNorm over the summed embeddings, or None.
        layer: the template of one layer's module.
        attention: query, key and value modules (inside a layer), or one fused module (``c_attn``).
        attention_out: the attention output projection.
        ff_in, ff_out: the feed-forward layers.
        norms: the layer's LayerNorms, in order (post: after attention, after FF; pre: before attention, before FF).
        final_norm: the LayerNorm after the last layer (pre-LN families), or None.
        norm_placement: ``post`` (the norms normalize the stream) or ``pre`` (they only read it).
        layout: ``linear`` (weights (out, in)) or ``conv1d`` (weights (in, out)) for the layers' dense weights.
        token_types: whether the model takes ``token_type_ids``.
        ff_size: the config field of the FF width, and the multiple of the hidden size when it is None (GPT-2).
        lm_head: modules applied in order to the base model's hidden states to get LM logits.
    """

    name: str
    model_type: str
    base: str
    classes: Mapping[str, str]
    class_heads: Mapping[str, tuple[str, ...]]
    heads: Mapping[str, tuple[HeadWeight, ...]]
    embeddings: tuple[str, ...]
    embeddings_norm: str | None
    layer: str
    attention: tuple[str, str, str] | str
    attention_out: str
    ff_in: str
    ff_out: str
    norms: tuple[str, ...]
    final_norm: str | None = None
    norm_placement: Literal["post", "pre"] = "post"
    layout: Literal["linear", "conv1d"] = "linear"
    token_types: bool = True
    ff_size: tuple[str, int | None] = ("intermediate_size", None)
    lm_head: tuple[str, ...] = ()
    shape_fields: tuple[str, ...] = field(default=("max_position_embeddings",))

    def prefix(self, class_name: str) -> str:
        """Where the base model sits in a model of ``class_name``: ``bert.`` (``""`` in the bare base model)."""
        return "" if class_name == self.classes[BASE] else f"{self.base}."

    @property
    def fused_attention(self) -> bool:
        return isinstance(self.attention, str)

    def intermediate_size(self, config: Any) -> int:
        """The FF width of a config of this family."""
        name, multiple = self.ff_size
        value = getattr(config, name, None)
        return value if value is not None else multiple * config.hidden_size

    def orthogonal_residual_refusal(self) -> str | None:
        """Why an orthogonal residual map cannot keep this family's function, or None when it can."""
        if self.norm_placement == "post":
            return (f"{self.name} is post-LayerNorm: its LayerNorm gains scale the residual stream elementwise, and "
                    "only a permutation commutes with them; use res (a permutation) for it")
        if self.embeddings_norm is not None:
            return (f"{self.name} normalizes the summed embeddings with a LayerNorm ({self.embeddings_norm}) whose "
                    "gain scales the residual stream elementwise; use res (a permutation) for it")
        return None


_BERT_LAYER = dict(
    embeddings_norm="embeddings.LayerNorm",
    layer="encoder.layer.{i}",
    attention=("attention.self.query", "attention.self.key", "attention.self.value"),
    attention_out="attention.output.dense",
    ff_in="intermediate.dense",
    ff_out="output.dense",
)
_POOLER = (Dense("{base}pooler.dense", None, RESIDUAL),)  # its tanh output feeds the classifier, unaligned
_ROBERTA_HEADS = {
    "pooler": _POOLER,
    "classifier": (Dense("classifier.dense", None, RESIDUAL), Dense("classifier.out_proj", None, None)),
    "mlm": (Dense("lm_head.dense", RESIDUAL, RESIDUAL), Norm("lm_head.layer_norm"), Vector("lm_head.bias"),
            Decoder("lm_head.decoder", shared_bias="lm_head.bias")),
}


def _roberta_classes(prefix: str) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    classes = {BASE: f"{prefix}Model", MASKED_LM: f"{prefix}ForMaskedLM",
               SEQUENCE_CLASSIFICATION: f"{prefix}ForSequenceClassification"}
    heads = {classes[BASE]: ("pooler",), classes[MASKED_LM]: ("mlm",),
             classes[SEQUENCE_CLASSIFICATION]: ("classifier",)}
    return classes, heads


BERT = Family(
    name="bert",
    model_type="bert",
    base="bert",
    classes={BASE: "BertModel", MASKED_LM: "BertForMaskedLM", SEQUENCE_CLASSIFICATION: "BertForSequenceClassification"},
    class_heads={"BertModel": ("pooler",), "BertForMaskedLM": ("mlm",),
                 "BertForSequenceClassification": ("pooler", "classifier")},
    heads={
        "pooler": _POOLER,
        "classifier": (Dense("classifier", None, None),),
        # the decoder reads the transform's output against vocab rows in the stream's basis (tied or not), so the
        # transform's output moves with the residual permutation too
        "mlm": (Dense("cls.predictions.transform.dense", RESIDUAL, RESIDUAL),
                Norm("cls.predictions.transform.LayerNorm"), Vector("cls.predictions.bias"),
                Decoder("cls.predictions.decoder", shared_bias="cls.predictions.bias")),
    },
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    lm_head=("cls",),
    shape_fields=("max_position_embeddings", "type_vocab_size"),
    **_BERT_LAYER,
)

ROBERTA = Family(
    name="roberta",
    model_type="roberta",
    base="roberta",
    classes=_roberta_classes("Roberta")[0],
    class_heads=_roberta_classes("Roberta")[1],
    heads=_ROBERTA_HEADS,
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    norms=("attention.output.LayerNorm", "output.LayerNorm"),
    lm_head=("lm_head",),
    shape_fields=("max_position_embeddings", "type_vocab_size", "pad_token_id"),  # positions start after padding
    **_BERT_LAYER,
)

# RoBERTa with its LayerNorms moved before attention and FF, and one after the last layer
ROBERTA_PRELAYERNORM = replace(
    ROBERTA,
    name="roberta-prelayernorm",
    model_type="roberta-prelayernorm",
    base="roberta_prelayernorm",
    classes=_roberta_classes("RobertaPreLayerNorm")[0],
    class_heads=_roberta_classes("RobertaPreLayerNorm")[1],
    norms=("attention.LayerNorm", "intermediate.LayerNorm"),
    final_norm="LayerNorm",
    norm_placement="pre",
)

DISTILBERT = Family(
    name="distilbert",
    model_type="distilbert",
    base="distilbert",
    classes={BASE: "DistilBertModel", MASKED_LM: "DistilBertForMaskedLM",
             SEQUENCE_CLASSIFICATION: "DistilBertForSequenceClassification"},
    class_heads={"DistilBertModel": (), "DistilBertForMaskedLM": ("mlm",),
                 "DistilBertForSequenceClassification": ("classifier",)},
    heads={
        "classifier": (Dense("pre_classifier", None, RESIDUAL), Dense("classifier", None, None)),
        "mlm": (Dense("vocab_transform", RESIDUAL, RESIDUAL), Norm("vocab_layer_norm"), Decoder("vocab_projector")),
    },
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings"),
    embeddings_norm="embeddings.LayerNorm",
    layer="transformer.layer.{i}",
    attention=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
    attention_out="attention.out_lin",
    ff_in="ffn.lin1",
    ff_out="ffn.lin2",
    norms=("sa_layer_norm", "output_layer_norm"),
    token_types=False,
    ff_size=("hidden_dim", None),
    lm_head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
)

GPT2 = Family(
    name="gpt2",
    model_type="gpt2",
    base="transformer",
    classes={BASE: "GPT2Model", CAUSAL_LM: "GPT2LMHeadModel", SEQUENCE_CLASSIFICATION: "GPT2ForSequenceClassification"},
    class_heads={"GPT2Model": (), "GPT2LMHeadModel": ("lm",), "GPT2ForSequenceClassification": ("score",)},
    heads={"lm": (Decoder("lm_head", bias=False),), "score": (Dense("score", None, RESIDUAL, bias=False),)},
    embeddings=("wte", "wpe"),
    embeddings_norm=None,
    layer="h.{i}",
    attention="attn.c_attn",
    attention_out="attn.c_proj",
    ff_in="mlp.c_fc",
    ff_out="mlp.c_proj",
    norms=("ln_1", "ln_2"),
    final_norm="ln_f",
    norm_placement="pre",
    layout="conv1d",
    token_types=False,
    ff_size=("n_inner", 4),
    lm_head=("lm_head",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (BERT, ROBERTA, DISTILBERT, ROBERTA_PRELAYERNORM, GPT2)}
ARCHITECTURES: dict[str, Family] = {cls: f for f in FAMILIES.values() for cls in f.class_heads}


def family_of_class(class_name: str) -> Family:
    """The family of an HF class name (`UnsupportedModel` lists the supported classes)."""
    if class_name not in ARCHITECTURES:
        raise UnsupportedModel(f"no permutation spec for {class_name}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[class_name]


def family_of_model_type(model_type: str | None) -> Family:
    """The family of an HF config's ``model_type`` (`UnsupportedModel` lists the supported ones)."""
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    known = ", ".join(f.model_type for f in FAMILIES.values())
    raise UnsupportedModel(f"model_type {model_type!r} is not a supported family; supported: {known}")


def get_family(name: str) -> Family:
    """A family by our name (`UnsupportedModel` lists them)."""
    if name not in FAMILIES:
        raise UnsupportedModel(f"unknown model family {name!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def model_inputs(batch: Mapping[str, Any], family: Family) -> dict[str, Any]:
    """The entries of ``batch`` a model of ``family`` takes (DistilBERT and GPT-2 take no token types)."""
    keys = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    return {k: batch[k] for k in keys if k in batch and (k != "token_type_ids" or family.token_types)}
