"""Pinned offline sources: fetch once, reuse the cache without network, re-fetch corrupt files, fail on bad hashes."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest

from lightning_merge.data import offline
from lightning_merge.data.offline import PinnedMember, PinnedSource, fetch
from lightning_merge.errors import SourceError, UnknownNameError

MEMBER = "fakepkg/data/corpus.txt"
GOOD = b"the pinned corpus\n"


@pytest.fixture
def fake_source(monkeypatch):
    source = PinnedSource("fakepkg==1.0", (PinnedMember(MEMBER, hashlib.sha256(GOOD).hexdigest()),))
    monkeypatch.setitem(offline.OFFLINE_SOURCES, "fake", source)
    return source


def _wheel_maker(content: bytes, calls: list):
    """A stand-in for ``_download_wheel``: writes a wheel holding ``content`` and records the call."""

    def download(source, dest):
        calls.append(source.requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "fakepkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(MEMBER, content)
        return wheel

    return download


def _no_network(*args, **kwargs):
    raise AssertionError("the network (pip download) was used although the cache is warm")


def test_fetch_then_reuse_without_network(fake_source, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(offline, "_download_wheel", _wheel_maker(GOOD, calls))
    path = fetch("fake", tmp_path)
    assert (
        path.read_bytes() == GOOD and path == tmp_path / "sources" / "fake" / "corpus.txt" and calls == ["fakepkg==1.0"]
    )
    monkeypatch.setattr(offline, "_download_wheel", _no_network)
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert fetch("fake", tmp_path) == path


def test_cache_root_from_environment(fake_source, tmp_path, monkeypatch):
    monkeypatch.setenv(offline.CACHE_ENV, str(tmp_path / "env-cache"))
    monkeypatch.setattr(offline, "_download_wheel", _wheel_maker(GOOD, []))
    assert fetch("fake").parent == tmp_path / "env-cache" / "sources" / "fake"


def test_corrupt_cache_is_refetched(fake_source, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(offline, "_download_wheel", _wheel_maker(GOOD, calls))
    path = fetch("fake", tmp_path)
    path.write_bytes(b"truncated")
    assert fetch("fake", tmp_path).read_bytes() == GOOD and len(calls) == 2


def test_hash_mismatch_after_refetch(fake_source, tmp_path, monkeypatch):
    cached = tmp_path / "sources" / "fake" / "corpus.txt"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"corrupt")
    calls: list = []
    monkeypatch.setattr(offline, "_download_wheel", _wheel_maker(b"a changed package", calls))
    with pytest.raises(SourceError, match="corpus.txt from fakepkg-1.0-py3-none-any.whl fails its sha256 check"):
        fetch("fake", tmp_path)
    assert calls and cached.read_bytes() == b"corrupt"  # re-fetched, and the bad copy was not written
    assert [p.name for p in cached.parent.iterdir()] == ["corpus.txt"]  # no temp leftovers


def test_download_failure_is_source_error(fake_source, tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for fakepkg==1.0\n")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(SourceError, match="could not download fakepkg==1.0 .*No matching distribution"):
        fetch("fake", tmp_path)


def test_binary_wheels_get_platform_flags(tmp_path, monkeypatch):
    commands = []

    def pip(cmd, **kwargs):
        commands.append(cmd)
        (tmp_path / "gensim-4.4.0-cp311-manylinux_2_28_x86_64.whl").touch()
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip)
    wheel = offline._download_wheel(offline.OFFLINE_SOURCES["wikipedia"], tmp_path)
    assert wheel.name.startswith("gensim-4.4.0") and "--no-deps" in commands[0]
    assert "--platform" in commands[0] and commands[0][-1] == "gensim==4.4.0"


def test_unknown_source():
    with pytest.raises(UnknownNameError, match="unknown offline source 'nope'; known: minilm, rotten_tomatoes"):
        fetch("nope")


def test_real_wikipedia_dump_is_pinned():
    """The real source (PyPI on a cold cache, else the warm cache): its bytes match DATA.md."""
    path = fetch("wikipedia")
    member = offline.OFFLINE_SOURCES["wikipedia"].members[0]
    assert path.stat().st_size == 1695871 and offline.sha256_file(path) == member.sha256
