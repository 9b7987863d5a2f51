"""A dataset over tensors already in memory; it needs no `datasets`, so scripts that run without it can use it."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, returned as dicts (the default collate stacks them into a batch dict)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}
