"""Datasets and loaders over tensors already in memory (no `datasets` needed, so scripts without it can use them),
and a shuffling loader that a resumed run continues where the killed one stopped."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def spread_indices(total: int, wanted: int | None) -> np.ndarray:
    """At most ``wanted`` indices of ``range(total)``, evenly spread over it and in order (all of them if ``wanted``
    is None or no smaller), so a small sample still covers the whole data, whatever order it is in."""
    if wanted is None or wanted >= total:
        return np.arange(total)
    return np.linspace(0, total - 1, wanted).round().astype(np.int64)


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts (the default collate stacks them into a batch dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


class EpochShuffle(DistributedSampler):
    """Every index once per epoch, in an order fixed by (seed, epoch): a resumed run sees the same order.

    Lightning calls `set_epoch` at the start of every training epoch. Under DDP each rank takes every world-th index
    of the epoch's order (padded by repeats to equal shares, so ranks step together); being a `DistributedSampler`,
    Lightning keeps it rather than putting its own in. `skip` drops the first indices of the rank's next iteration
    only (a run resumed in the middle of an epoch); the length stays the epoch's, as Lightning counts it.

    Given the rows' ``lengths`` (and the ``batch_size``), the order is transformers' length-grouped one: shuffled,
    then sorted by length within groups of 50 batches (of all ranks together), so a batch pads little; the order of
    the batches themselves runs long to short within each group.
    """

    def __init__(self, size: int, seed: int, lengths: Sequence[int] | None = None, batch_size: int = 1) -> None:
        super().__init__(range(size), num_replicas=1, rank=0, shuffle=True, seed=seed)
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} rows")
        self.size, self.skip = size, 0
        self.lengths, self.batch_size = lengths, batch_size

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        return math.ceil(self.size / self._world()[1])

    def __iter__(self) -> Iterator[int]:
        rank, world = self._world()
        generator = torch.Generator().manual_seed((self.seed + 1_000_003 * self.epoch) % 2**63)
        order = self._order(generator, world)
        order += order[: len(self) * world - self.size]  # equal shares for every rank
        share = order[rank::world][self.skip :]
        self.skip = 0
        return iter(share)

    def _order(self, generator: torch.Generator, world: int) -> list[int]:
        if self.lengths is None or self.size == 0:
            return torch.randperm(self.size, generator=generator).tolist()
        from transformers.trainer_pt_utils import get_length_grouped_indices  # slow to import; only where grouped

        return get_length_grouped_indices(self.lengths, self.batch_size * world, generator=generator)


class ResumableLoader(DataLoader):
    """A shuffling loader whose position goes into Lightning's checkpoints (`state_dict`: epoch and batches handed
    out); loaded into a new loader, the epoch continues at the next batch, in the same order.

    Args:
        dataset: map-style dataset.
        batch_size: rows per batch.
        seed: fixes the order of every epoch (with the epoch number).
        collate_fn: turns rows into a batch; it should not draw from global random state, which a resumed run
            does not restore (see `lightning_merge.data.mlm.SeededMasking`).
        num_workers: DataLoader worker processes.
        lengths: each row's length, to batch rows of similar length together (`EpochShuffle`).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, collate_fn: Callable | None = None, num_workers: int = 0,
        lengths: Sequence[int] | None = None,
    ) -> None:
        sampler = EpochShuffle(len(dataset), seed, lengths, batch_size)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler,
                         collate_fn=collate_fn, num_workers=num_workers, persistent_workers=num_workers > 0)
        self._handed_out = 0
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        self.sampler.skip = self._resume_at * self.batch_size
        self._handed_out, self._resume_at = self._resume_at, 0
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._resume_at = state["batches"]
