"""release_freed_memory: free heap pages go back to the OS (glibc), and nothing breaks elsewhere."""

from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch

from lightning_merge.memory import _malloc_trim, release_freed_memory

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


@pytest.mark.skipif(_malloc_trim() is None, reason="needs glibc's malloc_trim")
def test_freed_tensors_between_live_ones_leave_the_resident_set() -> None:
    # a large mmapped block, freed, raises glibc's mmap threshold, so the 2 MiB tensors below come from the heap
    del_me = torch.ones(24 * 2**20 // 4)
    del del_me
    tensors = [torch.ones(2**19) for _ in range(64)]  # 64 x 2 MiB, touched
    kept = tensors[1::2]  # every other one stays alive: the freed ones are holes the heap cannot shrink past
    del tensors
    before = resident_mib()
    assert release_freed_memory()
    after = resident_mib()
    assert before - after >= 32, f"resident {before:.0f} -> {after:.0f} MiB after freeing 64 MiB between live tensors"
    assert all(t.sum() == 2**19 for t in kept)  # the live tensors are untouched


class _Cycle:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.me = self  # like a recorder whose callback is its own bound method


def test_tensors_held_only_by_a_reference_cycle_are_freed(no_automatic_gc) -> None:
    tensor = torch.ones(2**20)
    freed = weakref.ref(tensor)
    cycle = _Cycle(tensor)
    del tensor, cycle
    assert freed() is not None  # unreachable, but reference counting alone never frees a cycle
    release_freed_memory()
    assert freed() is None


def test_release_is_harmless_without_glibc(monkeypatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    _malloc_trim.cache_clear()
    try:
        assert release_freed_memory() is False
    finally:
        _malloc_trim.cache_clear()
