"""The resumable shuffling loader: an order fixed by (seed, epoch), and a checkpointed position to resume from."""

from __future__ import annotations

import torch

from lightning_merge.data.tensors import ResumableLoader, TensorDictDataset


def rows(count: int = 22) -> TensorDictDataset:
    return TensorDictDataset({"x": torch.arange(count)})


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    loader = ResumableLoader(rows(), batch_size=4, seed=7)
    first = torch.cat([batch["x"] for batch in loader])
    assert sorted(first.tolist()) == list(range(22)) and len(loader) == 6
    assert torch.equal(torch.cat([b["x"] for b in ResumableLoader(rows(), batch_size=4, seed=7)]), first)
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat([batch["x"] for batch in loader]), first)


def test_a_loader_given_the_state_continues_the_epoch_where_the_first_stopped():
    uninterrupted = [batch["x"] for batch in ResumableLoader(rows(), batch_size=4, seed=3)]
    first = ResumableLoader(rows(), batch_size=4, seed=3)
    iterator = iter(first)
    seen = [next(iterator)["x"] for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batches": 2}
    resumed = ResumableLoader(rows(), batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert len(resumed) == len(first)  # Lightning counts the whole epoch; the iterator ends early instead
    rest = [batch["x"] for batch in resumed]
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, uninterrupted, strict=True))
    assert resumed.state_dict() == {"epoch": 0, "batches": 6}
    assert len([batch for batch in resumed]) == 6  # the next epoch is whole again


def test_ranks_share_an_epoch_in_equal_disjoint_parts(monkeypatch):
    from lightning_merge.data.tensors import EpochShuffle

    shares = []
    for rank in range(3):
        sampler = EpochShuffle(22, seed=5)
        monkeypatch.setattr(sampler, "_world", lambda rank=rank: (rank, 3))
        assert len(sampler) == 8
        shares.append(list(sampler))
    assert all(len(share) == 8 for share in shares)
    assert sorted(set().union(*map(set, shares))) == list(range(22))  # every index, two repeated to pad


def test_spread_indices_cover_the_data_in_order() -> None:
    from lightning_merge.data.tensors import spread_indices

    assert spread_indices(10, 3).tolist() == [0, 4, 9] and spread_indices(3, 5).tolist() == [0, 1, 2]
    assert spread_indices(4, None).tolist() == [0, 1, 2, 3]
