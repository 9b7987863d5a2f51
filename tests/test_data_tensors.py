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


def test_length_grouped_order_batches_similar_lengths_per_seed_epoch_and_rank(monkeypatch) -> None:
    from lightning_merge.data.tensors import EpochShuffle

    lengths = torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()

    def epoch(seed: int, epoch: int = 0, rank: int = 0, world: int = 1) -> list[int]:
        sampler = EpochShuffle(400, seed, lengths, batch_size=4)
        monkeypatch.setattr(sampler, "_world", lambda: (rank, world))
        sampler.set_epoch(epoch)
        return list(sampler)

    def padding(order: list[int]) -> int:
        batches = ([lengths[i] for i in order[j:j + 4]] for j in range(0, len(order), 4))
        return sum(len(b) * max(b) - sum(b) for b in batches)

    order = epoch(1)
    assert sorted(order) == list(range(400)) and order == epoch(1)
    assert order != epoch(2) and order != epoch(1, epoch=1)
    assert padding(order) < padding(torch.randperm(400).tolist()) / 5
    shares = [epoch(1, rank=r, world=2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == list(range(400))
    assert all(padding(share) < padding(torch.randperm(400)[:200].tolist()) / 5 for share in shares)  # per rank too


def test_a_grouped_loader_resumes_in_the_same_order() -> None:
    lengths = [(7 * i) % 13 for i in range(22)]
    uninterrupted = [batch["x"] for batch in ResumableLoader(rows(), batch_size=4, seed=3, lengths=lengths)]
    first = ResumableLoader(rows(), batch_size=4, seed=3, lengths=lengths)
    seen = [batch["x"] for _, batch in zip(range(2), first)]
    resumed = ResumableLoader(rows(), batch_size=4, seed=3, lengths=lengths)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(seen + list(b["x"] for b in resumed), uninterrupted, strict=True))
