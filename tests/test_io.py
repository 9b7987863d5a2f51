"""Atomic writes: failures for lack of space or permission are one OutputError line and leave no temp file;
interrupted writes' leftovers are found and removed; verified cache files."""

from __future__ import annotations

import errno
import os

import pytest

from lightning_merge import io
from lightning_merge.errors import OutputError


def test_a_full_disk_during_a_write_is_one_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    def full(fd, mode):
        handle = real_fdopen(fd, mode)
        handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr(io.os, "fdopen", full)
    with pytest.raises(OutputError, match=f"cannot write {tmp_path / 'x.json'}: No space left on device; free some"):
        io.atomic_write_text(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_hidden(tmp_path):
    with pytest.raises(OSError) as raised, io.output_errors(tmp_path):
        raise OSError(errno.EIO, "I/O error")
    assert not isinstance(raised.value, OutputError)


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    (tmp_path / ".merged.a1b2.tmp").mkdir()
    (tmp_path / ".results.json.123.tmp").write_text("half")
    (tmp_path / ".merged.old.77").mkdir()
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / ".hidden_notes").write_text("mine")
    removed = io.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".merged.a1b2.tmp", ".merged.old.77", ".results.json.123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_notes", "results.json"]


def test_cached_arrays_are_built_once_and_rebuilt_when_damaged(tmp_path):
    import numpy as np

    builds = []

    def build():
        builds.append(1)
        return {"ids": np.arange(6, dtype=np.int32).reshape(2, 3), "labels": np.array([0.5, 1.5])}

    path = tmp_path / "c.npz"
    first, again = io.cached_arrays(path, build), io.cached_arrays(path, build)
    assert len(builds) == 1 and again.keys() == first.keys() == {"ids", "labels"}
    assert all(np.array_equal(again[k], first[k]) and again[k].dtype == first[k].dtype for k in first)
    path.write_bytes(path.read_bytes()[:-10])  # cut short
    assert np.array_equal(io.cached_arrays(path, build)["ids"], first["ids"]) and len(builds) == 2


def test_verified_cache_files(tmp_path):
    path = io.write_verified(tmp_path / "c.bin", b"payload")
    assert io.read_verified(path) == b"payload"
    path.write_bytes(b"paylo")
    messages = []
    assert io.read_verified(path, messages.append) is None
    assert not path.exists() and "does not match its recorded digest" in messages[0]
    assert io.read_verified(tmp_path / "absent.bin") is None
