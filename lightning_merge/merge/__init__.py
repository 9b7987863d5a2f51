"""The merge math: permutation spec, feature statistics, matching, permuting, interpolation (plain PyTorch + scipy).

No Lightning import here: everything is usable from Python on any two HF BERT models.
"""

from lightning_merge.merge.features import FeatureRecorder, PairStatisticsRecorder, collect_statistics
from lightning_merge.merge.interpolate import (
    InterpolationPath,
    interpolate_state_dicts,
    lambda_grid,
    load_state_dict_tied,
    loss_barrier,
)
from lightning_merge.merge.methods import METHODS, MergeMethod, fit_methods, get_method
from lightning_merge.merge.permute import apply_permutations, invert_permutation, random_permutations
from lightning_merge.merge.spec import PermutationSpec, bert_spec, spec_for_model, spec_for_pair
from lightning_merge.merge.stats import MergeStatistics, PairStatistics

__all__ = [
    "METHODS",
    "FeatureRecorder",
    "InterpolationPath",
    "MergeMethod",
    "MergeStatistics",
    "PairStatistics",
    "PairStatisticsRecorder",
    "PermutationSpec",
    "apply_permutations",
    "bert_spec",
    "collect_statistics",
    "fit_methods",
    "get_method",
    "interpolate_state_dicts",
    "invert_permutation",
    "lambda_grid",
    "load_state_dict_tied",
    "loss_barrier",
    "random_permutations",
    "spec_for_model",
    "spec_for_pair",
]
