"""Merge methods by name: one registry (`METHODS`) and a small grammar of names; `fit_methods` fits several.

A method is one class (see `lightning_merge.merge.method.MergeMethod`) in its own module plus one entry here; no code
outside this registry branches on a method's name. Names (`get_method`):

- a registered name, optionally with options: ``vanilla``, ``permute``, ``weight_matching``,
  ``learned[init=permute,steps=1500,attn=linear]`` (``name[key=value,...]``; every option has a default); the joint
  methods of N models ``to_reference[method=ff+attn+res]``, ``merge_many[groups=ff+attn+res,by=activations]``,
  ``cycle_consistent[groups=ff+attn+res]`` (`lightning_merge.merge.joint_methods`); the fusion methods
  ``ot[groups=ff+attn+res,reg=0.05]``, ``repair[on=ff+attn+res]`` and ``regmean[on=ff+attn+res,alpha=0.9]``
  (`lightning_merge.merge.fusion`), ``zip[groups=ff+attn+res,alpha=0.3,beta=0.125]`` (`lightning_merge.merge.zipit`);
- a path method after the alignment it composes with: ``ff+attn+res+repair``, ``weight_matching+regmean[alpha=1]``;
- or activation matching composed per group kind, parts joined by ``+`` in any order, each at most once::

      ff                                                  feed-forward groups, one assignment per layer
      attn[head_perm | monotonic | ignore_heads | linear]  attention groups (default head_perm)
      res[all | first | last]                             the residual stream (default all)

  e.g. ``ff``, ``ff+attn[monotonic]``, ``res[last]``, ``ff+attn+res``, ``ff+attn[linear]+res``.

`fit_methods` fits several methods on one `FitInputs`: a (group, variant) assignment that several methods share is
solved once, a method used as another's starting point (``learned[init=...]``) is fitted once, and independent
assignments run on a few threads (scipy's ``linear_sum_assignment`` and torch's kernels release the GIL).
"""

from __future__ import annotations

import dataclasses
import re
import time
import typing
from collections.abc import Mapping
from typing import Any

from lightning_merge.errors import ConfigError, UnknownNameError
from lightning_merge.merge.activation_matching import (
    GROUP_ALIGNERS,
    UNSUPPORTED_VARIANTS,
    ActivationMatching,
    FullPermutation,
)
from lightning_merge.merge.alignment import Alignment
from lightning_merge.merge.fusion import OptimalTransport, RegMean, Repair
from lightning_merge.merge.joint_methods import CycleConsistent, JointInputs, JointMethod, MergeMany, ToReference
from lightning_merge.merge.learned import Learned
from lightning_merge.merge.method import FitInputs, MergeMethod, Vanilla
from lightning_merge.merge.paths import InterpolationPath
from lightning_merge.merge.weight_matching import WeightMatching
from lightning_merge.merge.zipit import ZipIt

METHODS: dict[str, type[MergeMethod]] = {
    "vanilla": Vanilla,
    "permute": FullPermutation,
    "weight_matching": WeightMatching,
    "learned": Learned,
    "to_reference": ToReference,
    "merge_many": MergeMany,
    "cycle_consistent": CycleConsistent,
    "ot": OptimalTransport,
    "repair": Repair,
    "regmean": RegMean,
    "zip": ZipIt,
}

_CALL = re.compile(r"^(?P<head>\w+)(?:\[(?P<args>.*)\])?$", re.S)


def known_names() -> str:
    """A one-line description of every accepted name, for error messages and ``--help``."""
    kinds = [kind + (f"[{'|'.join(v)}]" if any(v) else "") for kind, v in GROUP_ALIGNERS.items()]
    return f"{', '.join(METHODS)}; or groups {', '.join(kinds)} joined by '+', e.g. ff+attn[monotonic]+res[last]"


def get_method(name: str) -> MergeMethod:
    """The method ``name`` asks for: a registered name with options, or the group syntax (see the module doc).

    Raises:
        UnknownNameError: the name, a group kind, a variant or an option is unknown, or a group is repeated.
        ConfigError: an option's value is invalid.
    """
    name = name.strip()
    parts = _split_top_level(name, "+")
    call = _CALL.match(parts[0].strip()) if len(parts) == 1 else None
    last = _CALL.match(parts[-1].strip()) if len(parts) > 1 else None
    if last and last["head"] in METHODS and METHODS[last["head"]].changes_path:
        return _path_on(METHODS[last["head"]], last["args"], "+".join(parts[:-1]).strip(), name)
    if call and call["head"] in METHODS:
        method_class = METHODS[call["head"]]
        return method_class(name, _parse_options(method_class, call["args"], name))
    variants: dict[str, str] = {}
    for part in parts:
        kind, variant = _parse_part(part.strip(), name)
        if kind in variants:
            raise UnknownNameError(f"method {name!r} names group {kind!r} twice; known: {known_names()}")
        variants[kind] = variant
    return ActivationMatching(name, variants)


def _path_on(method_class: type[MergeMethod], args: str | None, alignment: str, name: str) -> MergeMethod:
    """``<alignment>+repair[...]``: the path method with ``on`` the alignment before it."""
    options = _parse_options(method_class, args, name)
    if options.on != method_class.Options.on:
        raise ConfigError(f"method {name!r} names its alignment twice (before '+' and as on=); give it once")
    return method_class(name, dataclasses.replace(options, on=alignment))


def _parse_part(part: str, name: str) -> tuple[str, str]:
    match = _CALL.match(part)
    if not match or match["head"] not in GROUP_ALIGNERS:
        raise UnknownNameError(f"unknown merge method {name!r}; known: {known_names()}")
    kind, variant = match["head"], match["args"]
    variants = GROUP_ALIGNERS[kind]
    if variant is None:
        return kind, next(iter(variants))
    if variant not in variants or not variant:
        allowed = ", ".join(v for v in variants if v) or "none"
        if variant in UNSUPPORTED_VARIANTS.get(kind, {}):
            why = UNSUPPORTED_VARIANTS[kind][variant]
            raise ConfigError(f"method {name!r}: group {kind!r} cannot take a {variant} alignment: {why}; use {kind}"
                              + (f"[{allowed.replace(', ', '|')}]" if allowed != "none" else ""))
        raise UnknownNameError(f"unknown variant {variant!r} of group {kind!r} in {name!r}; variants: {allowed}")
    return kind, variant


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside brackets (``learned[init=ff+attn]`` is one part)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _parse_options(method_class: type[MergeMethod], args: str | None, name: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(method_class.Options)}
    values: dict[str, Any] = {}
    for item in _split_top_level(args, ",") if args and args.strip() else []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise UnknownNameError(f"method {name!r}: unknown option {item.strip()!r}; options: {known}")
        if key in values:
            raise ConfigError(f"method {name!r}: option {key!r} is given twice; give it once")
        values[key] = _convert(text.strip(), typing.get_type_hints(method_class.Options)[key], name, key)
    return method_class.Options(**values)


def _convert(text: str, kind: type, name: str, key: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError(text)
            return text.lower() == "true"
        return kind(text)
    except ValueError as err:
        raise ConfigError(f"method {name!r}: option {key}={text!r} is not a valid {kind.__name__}") from err


def fit_methods(
    methods: Mapping[str, MergeMethod], inputs: FitInputs, timings: dict[str, float] | None = None,
    paths: dict[str, InterpolationPath] | None = None, references: dict[str, dict[str, Alignment]] | None = None,
) -> dict[str, dict[str, Alignment]]:
    """Alignments of model B by every method (name -> group -> alignment), sharing work between them (module doc).

    ``timings``, if given, receives each method's fit time in seconds (shared work counts for the first method);
    ``paths``, if given, receives the path of every method that changes it (`MergeMethod.fit_path`);
    ``references``, if given, receives model A's alignments of every method that transforms A too (ZipIt!).
    """
    out = {}
    for name, method in methods.items():
        start = time.perf_counter()
        if isinstance(method, JointMethod) and method.moves_reference:
            reference, out[name] = method.fit_joint(JointInputs.of_pair(inputs).view(method.needs))
            if references is not None:
                references[name] = reference
        else:
            out[name] = inputs.alignments_of(method)
        path = method.fit_path(inputs.view(method.needs), out[name]) if method.changes_path else None
        if path is not None and paths is not None:
            paths[name] = path
        if timings is not None:
            timings[name] = time.perf_counter() - start
    return out
