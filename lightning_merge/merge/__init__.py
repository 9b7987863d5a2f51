"""The merge math: spec, feature statistics, matching, alignments, methods, interpolation (plain PyTorch + scipy).

No Lightning import here: everything is usable from Python on any two HF models of a registered family (BERT,
RoBERTa, DistilBERT, RoBERTa-PreLayerNorm, GPT-2; `lightning_merge.merge.families`).
"""

from lightning_merge.merge.alignment import (
    Alignment,
    HeadLinear,
    Orthogonal,
    Permutation,
    apply_alignments,
    load_alignments,
    permutations,
    save_alignments,
)
from lightning_merge.merge.families import FAMILIES, Family
from lightning_merge.merge.features import (
    FeatureRecorder,
    PairStatisticsRecorder,
    StatisticsRecorder,
    collect_joint_statistics,
    collect_statistics,
)
from lightning_merge.merge.fold import fold_layer_norms
from lightning_merge.merge.interpolate import interpolate_state_dicts, lambda_grid, load_state_dict_tied, loss_barrier
from lightning_merge.merge.method import FitInputs, MergeMethod
from lightning_merge.merge.methods import METHODS, fit_methods, get_method
from lightning_merge.merge.permute import invert_permutation, random_permutations
from lightning_merge.merge.spec import Axis, PermutationSpec, spec_for_model, spec_for_pair, spec_from_config
from lightning_merge.merge.stats import JointStatistics, MergeStatistics, PairStatistics

__all__ = [
    "FAMILIES",
    "METHODS",
    "Alignment",
    "Axis",
    "Family",
    "FeatureRecorder",
    "FitInputs",
    "HeadLinear",
    "JointStatistics",
    "MergeMethod",
    "MergeStatistics",
    "Orthogonal",
    "PairStatistics",
    "PairStatisticsRecorder",
    "Permutation",
    "StatisticsRecorder",
    "PermutationSpec",
    "apply_alignments",
    "collect_joint_statistics",
    "collect_statistics",
    "fit_methods",
    "fold_layer_norms",
    "get_method",
    "interpolate_state_dicts",
    "invert_permutation",
    "lambda_grid",
    "load_alignments",
    "load_state_dict_tied",
    "loss_barrier",
    "permutations",
    "random_permutations",
    "save_alignments",
    "spec_for_model",
    "spec_for_pair",
    "spec_from_config",
]
