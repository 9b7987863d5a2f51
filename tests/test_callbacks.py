"""The MergeCallback's reduction of the statistics across ranks."""

from __future__ import annotations

import torch

from lightning_merge.callbacks import _sum_across_ranks


class IdentityStrategy:
    """A single device: `reduce` returns its input (as Lightning's SingleDeviceStrategy does)."""

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return tensor


class TwoEqualRanks:
    """Two ranks that hold the same sums, reduced into a new tensor (a strategy that does not reduce in place)."""

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return tensor * 2


def test_sums_are_reduced_in_place_without_a_second_copy() -> None:
    sums = [torch.arange(6.0, dtype=torch.float64).reshape(2, 3), torch.ones(3, dtype=torch.float64)]
    storages = [t.untyped_storage().data_ptr() for t in sums]

    _sum_across_ranks(IdentityStrategy(), sums)
    assert torch.equal(sums[0], torch.arange(6.0, dtype=torch.float64).reshape(2, 3))

    _sum_across_ranks(TwoEqualRanks(), sums)
    assert torch.equal(sums[0], 2 * torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    assert torch.equal(sums[1], torch.full((3,), 2.0, dtype=torch.float64))
    # the statistics keep their own tensors: nothing holds the sums twice while the permutations are fitted
    assert [t.untyped_storage().data_ptr() for t in sums] == storages
