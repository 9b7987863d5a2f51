"""`learned`: alignments learned against the interpolated model's loss (plain PyTorch; the framework runs the loop).

Git Re-Basin's straight-through estimator (Ainsworth et al., ICLR 2023, §3.3): a free estimate W̃ of B's aligned
weights is trained; each step projects it onto the permutations of B (`weight_matching` of W̃ against B, warm-started
from the last step's permutations), evaluates the model at θ(λ) = (1−λ)θ_A + λ·π(θ_B) with λ ~ U(λ_min, λ_max),
and passes the loss's gradient through the projection to W̃ as if the projection were the identity. The result is
always a permutation, so B stays exact.

With ``linear_attention`` each attention head also gets two learned invertible maps on top of its permutation —
T_qk (query rows; T_qk⁻ᵀ on key rows) and T_vo (value rows; T_vo⁻¹ on output columns) — parametrised as
T = T₀·exp(A) so they stay invertible; gradients reach them directly, and the result is a `HeadLinear` alignment,
exact for B as well. The head pairing stays the one the starting alignment chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_merge.errors import ConfigError
from lightning_merge.merge.alignment import Alignment, HeadLinear, Permutation, transform_state_dict
from lightning_merge.merge.matching import head_pairing, whole_head_permutation
from lightning_merge.merge.method import LOSS, WEIGHTS, FitInputs, MergeMethod
from lightning_merge.merge.spec import ATTENTION_SUBSPACES, PermGroup, PermutationSpec
from lightning_merge.merge.weight_matching import weight_matching

LEARNED = (
    "Ainsworth et al., Git Re-Basin, ICLR 2023 (straight-through estimator), as used by Theus et al., Generalized "
    "Linear Mode Connectivity for Transformers, NeurIPS 2025, https://arxiv.org/abs/2506.22712"
)

LossFunction = Callable[[Mapping[str, torch.Tensor], Mapping], torch.Tensor]
# The final projection (`alignments`) runs weight matching to convergence, or this many passes.
FINAL_PASSES = 100


class LearnedAlignment(nn.Module):
    """The trainable state of a learned alignment; ``forward(batch)`` is the loss of one step.

    Args:
        spec: the models' spec.
        weights_a: A's parameters (by the names the loss function takes).
        weights_b: B's parameters, same names, in B's own basis.
        start: the alignment it starts from (group -> `Permutation` or `HeadLinear`); groups absent start as identity.
        loss: (parameters, batch) -> mean loss of the model with those parameters.
        linear_attention: learn per-head linear maps of the attention groups instead of permuting them.
        lambdas: (λ_min, λ_max) of the uniform λ of each step.
        seed: seeds λ and the visiting order of the projection.
        passes: coordinate-descent passes of each step's projection, warm-started from the last step's
            permutations (which W̃ has moved only slightly from); the projection is a step's main cost beside the
            forward and backward pass.
    """

    def __init__(
        self,
        spec: PermutationSpec,
        weights_a: Mapping[str, torch.Tensor],
        weights_b: Mapping[str, torch.Tensor],
        start: Mapping[str, Alignment],
        loss: LossFunction,
        linear_attention: bool = False,
        lambdas: tuple[float, float] = (0.4, 0.6),
        seed: int = 0,
        passes: int = 1,
    ) -> None:
        super().__init__()
        self.passes = passes
        self.spec = spec
        self._loss = loss  # a plain callable: the model behind it is not part of this module's parameters
        weights_a, weights_b = spec.split(weights_a), spec.split(weights_b)  # fused projections in parts
        self.names = [name for name in weights_a if torch.is_floating_point(weights_a[name])]
        self.lambdas = lambdas
        self.generator = torch.Generator().manual_seed(seed)
        linear = spec.groups_of_kind(["attn"]) if linear_attention else []
        self.permuted_groups = [name for name in spec.groups if name not in linear]
        for i, name in enumerate(self.names):  # buffers follow the module to its device; not saved
            self.register_buffer(f"a{i}", weights_a[name].detach().clone(), persistent=False)
            self.register_buffer(f"b{i}", weights_b[name].detach().clone(), persistent=False)
        starts = {g: starting_head_linear(start.get(g), spec.groups[g]) for g in linear}
        self.head_perms = {g: starts[g].perm for g in linear}
        self.start_maps = {(g, s): starts[g].maps[s] for g in linear for s in ATTENTION_SUBSPACES}
        self.log_maps = nn.ParameterDict(  # exp(0) = I: training starts from the starting alignment
            {_map_key(g, s): nn.Parameter(torch.zeros_like(m)) for (g, s), m in self.start_maps.items()}
        )
        self.perms = {g: _starting_permutation(start.get(g), spec.groups[g]) for g in self.permuted_groups}
        estimate = transform_state_dict(self._weights("b"), spec, {**self.perms, **self._maps(detach=True)})
        # W̃ of the weights a permuted group acts on: the projection reads only those (q/k/v biases with linear
        # attention have none, and their maps learn directly)
        permuted = set(self.permuted_groups)
        self.estimate_names = [name for name in self.names
                               if any(axis is not None and axis.group in permuted for axis in spec.axes.get(name, ()))]
        self.estimate = nn.ParameterList([nn.Parameter(estimate[n].detach().clone()) for n in self.estimate_names])
        self._b64: tuple[torch.device, dict[str, torch.Tensor]] | None = None

    def _weights(self, side: str) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{side}{i}") for i, name in enumerate(self.names)}

    def _maps(self, detach: bool = False) -> dict[str, HeadLinear]:
        out = {}
        for group, head_perm in self.head_perms.items():
            maps = {}
            for subspace in ATTENTION_SUBSPACES:
                log_map = self.log_maps[_map_key(group, subspace)]
                log_map = log_map.detach() if detach else log_map
                start = self.start_maps[(group, subspace)].to(log_map.device, log_map.dtype)
                maps[subspace] = start @ torch.linalg.matrix_exp(log_map)
            out[group] = HeadLinear(head_perm, maps)
        return out

    def _weights_b_float64(self) -> dict[str, torch.Tensor]:
        """B's weights in float64 on the module's device, made once: the projection compares W̃ with them each step."""
        device = self.b0.device
        if self._b64 is None or self._b64[0] != device:
            self._b64 = (device, {name: tensor.double() for name, tensor in self._weights("b").items()})
        return self._b64[1]

    def project(self, max_passes: int | None = None) -> None:
        """Move the permutations to the ones nearest the current estimate W̃ (weight matching, warm-started)."""
        with torch.no_grad():
            estimate = dict(zip(self.estimate_names, self.estimate))
            self.perms = weight_matching(
                self.spec, estimate, self._weights_b_float64(), groups=self.permuted_groups, init=self.perms,
                fixed=self._maps(detach=True), max_passes=max_passes or self.passes, generator=self.generator,
            )

    def forward(self, batch: Mapping) -> torch.Tensor:
        """The loss of θ(λ) for a random λ, differentiable in W̃ (straight through) and in the per-head maps."""
        self.project()
        aligned_b = transform_state_dict(self._weights("b"), self.spec, {**self.perms, **self._maps()})
        for name, estimate in zip(self.estimate_names, self.estimate):
            aligned_b[name] = aligned_b[name] + (estimate - estimate.detach())  # value: projection; gradient: W̃
        low, high = self.lambdas
        lam = low + (high - low) * torch.rand((), generator=self.generator).item()
        weights_a = self._weights("a")
        params = {name: torch.lerp(weights_a[name], aligned_b[name], lam) for name in self.names}
        return self._loss(self.spec.join(params), batch)

    def alignments(self) -> dict[str, Alignment]:
        """The learned alignment: permutations of the permuted groups, `HeadLinear` of the linear ones."""
        self.project(max_passes=FINAL_PASSES)
        maps = {g: HeadLinear(a.perm, {s: m.detach().cpu() for s, m in a.maps.items()})
                for g, a in self._maps(detach=True).items()}
        return {**{g: Permutation(p.perm.cpu()) for g, p in self.perms.items()}, **maps}


def _map_key(group: str, subspace: str) -> str:
    return f"{group.replace('.', '_')}_{subspace}"  # ParameterDict keys cannot hold dots


def _starting_permutation(alignment: Alignment | None, group: PermGroup) -> Permutation:
    if alignment is None:
        return Permutation(torch.arange(group.size))
    if not isinstance(alignment, Permutation):
        raise ConfigError(f"the starting alignment of group {group.name!r} is a {alignment.kind}, which permutations "
                          "alone would lose; learn it with attn=linear, or start from a permutation method")
    return alignment


def starting_head_linear(alignment: Alignment | None, group: PermGroup) -> HeadLinear:
    """A starting alignment of an attention group as whole-head pairing + per-head maps (float64).

    A permutation's within-head order becomes per-head permutation matrices; a `HeadLinear` is kept as it is.
    """
    heads, head_dim = group.num_heads, group.head_dim
    identity = torch.eye(head_dim, dtype=torch.float64).expand(heads, head_dim, head_dim)
    if alignment is None:
        return HeadLinear(torch.arange(group.size), {s: identity.clone() for s in ATTENTION_SUBSPACES})
    if isinstance(alignment, HeadLinear):
        maps = {s: alignment.maps.get(s, identity).double().clone() for s in ATTENTION_SUBSPACES}
        return HeadLinear(alignment.perm, maps)
    within = alignment.perm.reshape(heads, head_dim) % head_dim  # position j of head h takes B's dim within[h][j]
    gather = torch.zeros(heads, head_dim, head_dim, dtype=torch.float64)
    gather.scatter_(2, within[:, :, None], 1.0)  # row j picks B's dim within[h][j]
    head_perm = whole_head_permutation(head_pairing(alignment.perm, heads), head_dim)
    return HeadLinear(head_perm, {s: gather.clone() for s in ATTENTION_SUBSPACES})


class Learned(MergeMethod):
    """B's permutations (and, with ``attn=linear``, per-head linear maps) learned against the loss of the
    interpolated model, by Git Re-Basin's straight-through estimator, starting from another method's alignment."""

    reference = LEARNED
    summary = "straight-through permutations (+ per-head linear maps) trained on the interpolated model's loss"

    @dataclass(frozen=True)
    class Options:
        init: str = ""  # the method it starts from; "": permute, or ff+attn[linear]+res with attn=linear
        steps: int = 500
        lr: float = 3e-3
        attn: str = "perm"  # "perm": heads permuted; "linear": per-head invertible maps learned too
        lambda_min: float = 0.4  # λ of each step ~ U(lambda_min, lambda_max)
        lambda_max: float = 0.6
        seed: int = 0
        passes: int = 1  # coordinate-descent passes of each step's projection onto B's permutations

    # attention mode -> the starting method when ``init`` is not given
    ATTENTION_MODES = {"perm": "permute", "linear": "ff+attn[linear]+res"}

    def __init__(self, name: str, options: Any = None) -> None:
        super().__init__(name, options)
        opts = self.options
        if opts.steps < 1:
            raise ConfigError(f"method {name!r}: steps={opts.steps} must be at least 1, e.g. learned[steps=1000]")
        if opts.passes < 1:
            raise ConfigError(f"method {name!r}: passes={opts.passes} must be at least 1")
        if not (math.isfinite(opts.lr) and opts.lr > 0):
            raise ConfigError(f"method {name!r}: lr={opts.lr} must be a positive number, e.g. learned[lr=0.003]")
        if opts.attn not in self.ATTENTION_MODES:
            raise ConfigError(f"method {name!r}: attn={opts.attn!r}; choose one of {', '.join(self.ATTENTION_MODES)}")
        if not 0 <= opts.lambda_min <= opts.lambda_max <= 1:
            raise ConfigError(f"method {name!r}: need 0 <= lambda_min <= lambda_max <= 1")
        from lightning_merge.merge.methods import get_method  # the registry imports this module

        self.init = get_method(opts.init or self.ATTENTION_MODES[opts.attn])
        if isinstance(self.init, Learned) or not self.init.function_preserving:
            raise ConfigError(f"method {name!r}: init={opts.init!r} must be a function-preserving, non-learned method")
        if not self.init.learnable_start:
            raise ConfigError(f"method {name!r}: init={opts.init!r} fits an orthogonal residual map, which a learned "
                              "alignment (permutations and per-head maps) cannot start from; use res or res[all]")

    @property
    def needs(self) -> frozenset[str]:
        return self.init.needs | {WEIGHTS, LOSS}

    @property
    def function_preserving(self) -> bool:
        return True

    @property
    def permutations_only(self) -> bool:
        return self.options.attn == "perm" and self.init.permutations_only

    def statistics_features(self, spec: PermutationSpec) -> list[str]:
        return self.init.statistics_features(spec)

    def check_spec(self, spec: PermutationSpec) -> None:
        self.init.check_spec(spec)

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        described["options"]["init"] = self.init.name  # the resolved start, also when it was the default
        return described

    def fit(self, inputs: FitInputs) -> dict[str, Alignment]:
        opts = self.options
        weights_a, weights_b = inputs.weights
        training = inputs.training
        module = LearnedAlignment(
            inputs.spec, weights_a, weights_b, inputs.alignments_of(self.init), training.loss,
            linear_attention=opts.attn == "linear", lambdas=(opts.lambda_min, opts.lambda_max), seed=opts.seed,
            passes=opts.passes,
        )
        training.optimise(module, opts.steps, opts.lr, self.name)
        return module.alignments()
